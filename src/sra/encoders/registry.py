"""Encoder names → how to build them. ``--encoder`` choices come from :data:`ENCODERS`.

Widths and resolutions are known here without loading anything, so the model (whose REPA head
ends in the encoder's width) can be configured before the encoder's weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sra.encoders.base import Encoder
from sra.errors import SraError, choice_error

KINDS = ("timm", "digits")


@dataclass(frozen=True)
class EncoderSpec:
    """One registered encoder."""

    name: str
    kind: str  # "timm" (a timm ViT) or "digits" (the digits positive control)
    width: int  # E, the token width
    resolution: int  # default input side (pixels)
    patch: int  # pixels per token side at that resolution
    arch: str = ""  # timm architecture
    tag: str = ""  # timm pretrained tag (weights from the hub)
    model_kwargs: dict = field(default_factory=dict)  # timm constructor overrides (tiny tests)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise choice_error("encoder kind", self.kind, KINDS)


# DINOv2 sizes: (short name, timm size word, width E).
_DINOV2 = (("s", "small", 384), ("b", "base", 768), ("l", "large", 1024))
ENCODERS: dict[str, EncoderSpec] = {
    f"dinov2-vit-{s}14": EncoderSpec(f"dinov2-vit-{s}14", "timm", width, resolution=224, patch=14,
                                     arch=f"vit_{word}_patch14_dinov2", tag="lvd142m")
    for s, word, width in _DINOV2
}
ENCODERS["digits-classifier"] = EncoderSpec("digits-classifier", "digits", 48, resolution=16, patch=4)
# REPA's own --enc-type spellings.
ALIASES = {f"dinov2-vit-{s}": f"dinov2-vit-{s}14" for s, _, _ in _DINOV2}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    """Add (or replace) an encoder by name, e.g. a tiny one for tests."""
    ENCODERS[spec.name] = spec
    return spec


def encoder_spec(name: str) -> EncoderSpec:
    """The spec of a registered name (REPA's ``dinov2-vit-b`` spelling accepted)."""
    spec = ENCODERS.get(ALIASES.get(name, name))
    if spec is None:
        raise choice_error("encoder", name, sorted(ENCODERS))
    return spec


def encoder_width(name: str) -> int:
    """E of a registered encoder, without loading it."""
    return encoder_spec(name).width


def build_encoder(name: str, weights: str | None = None, resolution: int | None = None) -> Encoder:
    """A frozen, ready encoder (CPU, eval mode) by name; ``weights`` a local file (offline use),
    ``resolution`` the input side (default: the encoder's own)."""
    spec = encoder_spec(name)
    res = spec.resolution if resolution is None else int(resolution)
    if spec.kind == "digits":
        from sra.encoders.digits import build_digits_encoder

        encoder: Encoder = build_digits_encoder(spec.name, res, weights)
    else:
        from sra.encoders.vit import build_timm_vit

        encoder = build_timm_vit(spec.name, spec.arch, spec.tag, res, spec.patch,
                                 dict(spec.model_kwargs), weights)
    if encoder.width != spec.width:
        raise SraError(f"encoder {spec.name} gives {encoder.width}-wide tokens, its registry entry "
                       f"says {spec.width}")
    return encoder

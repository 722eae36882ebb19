"""Model names → architecture. CLI choices come from :data:`MODEL_NAMES`.

A name is ``{family}-{size}/{patch}``: family ``SiT`` (flow matching, continuous t ∈ [0, 1],
velocity output) or ``DiT`` (DDPM, integer t ∈ 0..999, learned-sigma output with 2× channels);
sizes S/B/L/XL (docs/method.md §2.1) and patches 2/4/8. Custom dims go through :class:`ModelConfig` directly.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from sra.errors import SraError, choice_error

FAMILIES = ("SiT", "DiT")
# size → (depth, hidden_size, num_heads)
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCHES = (2, 4, 8)
# Projector heads on the student's block-s tokens (``ap_head``): "sra" Linear(D, P)–SiLU–
# Linear(P, D) (docs/method.md §2.2); "repa" Linear(D, P)–SiLU–Linear(P, P)–SiLU–Linear(P, E)
# toward an external encoder of width E = ``head_out`` (docs/method.md §9.3); "repa-conv" iREPA's
# one 3×3 convolution on the token grid from D to E (docs/method.md §9.4).
HEADS = ("sra", "repa", "repa-conv")
REPA_PROJECTOR_DIM = 2048  # REPA's projector width
MODEL_NAMES: tuple[str, ...] = tuple(
    f"{fam}-{size}/{p}" for fam in FAMILIES for size in SIZES for p in PATCHES
)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes a transformer's parameters (and therefore its state dict)."""

    family: str = "SiT"  # "SiT" or "DiT"
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    input_size: int = 32  # latent spatial size (H == W)
    in_channels: int = 4
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    projector_dim: int | None = None  # head hidden width; None → 2·hidden_size (SRA) / 2048 (REPA)
    use_head: bool = True  # build the projector head (``ap_head``)
    head: str = "sra"  # which head: "sra" (out D), "repa" or "repa-conv" (out ``head_out``)
    head_out: int | None = None  # REPA head output width E (the encoder's); None for SRA

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise choice_error("model family", self.family, FAMILIES)
        if self.hidden_size % self.num_heads:
            raise SraError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_size % 4:
            raise SraError(f"hidden_size must be a multiple of 4 (2-D sin-cos), got {self.hidden_size}")
        if self.input_size % self.patch_size:
            raise SraError(
                f"input size {self.input_size} is not divisible by patch size {self.patch_size}"
            )
        for name in ("depth", "num_heads", "patch_size", "input_size", "in_channels", "num_classes"):
            if getattr(self, name) < 1:
                raise SraError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.head not in HEADS:
            raise choice_error("projector head", self.head, HEADS)
        if self.head != "sra" and (self.head_out is None or self.head_out < 1):
            raise SraError(f"the REPA head needs its output width (the encoder's), got {self.head_out}")
        if self.projector_dim is not None and self.projector_dim < 1:
            raise SraError(f"projector dim must be ≥ 1, got {self.projector_dim}")

    @property
    def learn_sigma(self) -> bool:
        """DiT predicts ε and the variance interpolation value; SiT predicts velocity only."""
        return self.family == "DiT"

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        """The projector head's hidden width."""
        if self.projector_dim:
            return self.projector_dim
        return REPA_PROJECTOR_DIM if self.head == "repa" else 2 * self.hidden_size

    @property
    def head_out_dim(self) -> int:
        """Width of the head's output tokens: D for SRA, the encoder's E for REPA / iREPA."""
        return self.hidden_size if self.head == "sra" else self.head_out

    def check_blocks(self, blocks, what: str = "block") -> None:
        """Raise a one-line error unless every block number is in 1..depth (the one place this
        range is checked: the model's forward, the alignment blocks, the PCA figure)."""
        for b in blocks:
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.depth:
                raise SraError(f"{what} {b!r} is outside 1..{self.depth} (the model's depth)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


_NAME_RE = re.compile(r"^(SiT|DiT)-(S|B|L|XL)/(\d+)$")


def model_config(name: str, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of a registered name, with keyword overrides
    (``input_size``, ``in_channels``, ``num_classes``, ``qk_norm``, …)."""
    m = _NAME_RE.match(name or "")
    if not m or int(m.group(3)) not in PATCHES:
        raise choice_error("model", name, MODEL_NAMES)
    depth, hidden, heads = SIZES[m.group(2)]
    cfg = ModelConfig(family=m.group(1), depth=depth, hidden_size=hidden, num_heads=heads,
                      patch_size=int(m.group(3)))
    try:
        return replace(cfg, **overrides)
    except TypeError as exc:
        raise SraError(f"bad model override: {exc}") from None


def parse_name(name: str) -> tuple[str, str, int]:
    """(family, size, patch) of a registered model name."""
    m = _NAME_RE.match(name or "")
    if not m:
        raise choice_error("model", name, MODEL_NAMES)
    return m.group(1), m.group(2), int(m.group(3))


@dataclass(frozen=True)
class ModelSpec:
    """Which network: a registry name plus the few fields that depend on the data."""

    name: str = "SiT-XL/2"
    qk_norm: bool = False
    fused_attn: bool = True
    # Custom dims for tiny models (None → from the registry name).
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None

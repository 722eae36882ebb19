"""DINOv2 (and any timm ViT) as a frozen patch-token encoder, loaded through timm.

Why timm (not ``transformers``' ``Dinov2Model``): timm needs nothing this project does not
already install but PyYAML (torch, torchvision, huggingface_hub, safetensors), while
``transformers`` brings tokenizers, regex and a much larger, faster-moving API for one vision
backbone. timm's ``vit_base_patch14_dinov2.lvd142m`` is DINOv2-B/14 with Meta's weights, fetched
as safetensors from the HF hub by timm's own loader; timm's checkpoint filter also reads Meta's
original ``dinov2_vitb14_pretrain.pth`` layout and resamples the position table to the input
size, and ``forward_features`` ends with the final LayerNorm, i.e. DINOv2's normalised patch
tokens (what REPA aligns to) after the class/register tokens are dropped.

Weights: from the hub (``pretrained=True``: timm reads the hub's safetensors, or a ``.bin`` with
``weights_only=True``), or ``--encoder-weights FILE`` read as tensors only (safetensors, or
``torch.load(weights_only=True)``: no pickled code runs) and loaded strictly.
Input: images in [-1, 1] → [0, 1] → bicubic resize to the encoder's resolution (224 for
DINOv2: 16×16 tokens) → ImageNet mean/std.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from sra.checkpoints.safe import check_state_dict, load_safetensors, safe_torch_load
from sra.checkpoints.weights import load_state_dict_strict
from sra.encoders.base import Encoder, resize_images, to_channels
from sra.errors import SraError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WRAPPERS = ("model", "state_dict", "module")  # dicts some checkpoints nest their weights in


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local weights file (safetensors or a tensors-only torch file);
    anything else is one :class:`SraError` line naming the file."""
    p = Path(path)
    if not p.is_file():
        raise SraError(f"--encoder-weights {p}: no such file")
    try:
        if p.suffix == ".safetensors":
            sd = load_safetensors(p)
        else:
            sd = safe_torch_load(p)
            for key in _WRAPPERS:  # e.g. {"model": {...}, "epoch": 3}: the weights are inside
                if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                    sd = sd[key]
        return check_state_dict(sd, str(p))
    except SraError as exc:
        raise SraError(f"--encoder-weights {exc}") from None


class TimmViTEncoder(Encoder):
    """A timm Vision Transformer's final patch tokens (prefix tokens dropped), frozen."""

    def __init__(self, net: nn.Module, name: str, resolution: int,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.net = net
        self.name = name
        self.input_resolution = resolution
        self.width = int(net.embed_dim)
        self.patch = int(net.patch_embed.patch_size[0])
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.freeze()

    @property
    def grid(self) -> int:
        return self.input_resolution // self.patch

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] → patch tokens (N, (res/patch)², E)."""
        x = (to_channels(images.float(), 3) + 1) / 2  # [0, 1]
        x = resize_images(x, self.input_resolution, "bicubic")
        x = (x - self.mean) / self.std
        feats = self.net.forward_features(x)  # (N, prefix + T, E), after the final norm
        return feats[:, self.net.num_prefix_tokens:]


def build_timm_vit(name: str, arch: str, tag: str, resolution: int, patch: int,
                   model_kwargs: dict, weights: str | None = None) -> TimmViTEncoder:
    """The timm ViT ``arch`` at ``resolution`` with weights from ``weights`` (a local file) or,
    without one, timm's pretrained ``arch.tag`` from the hub."""
    import timm

    if resolution % patch:
        raise SraError(f"encoder resolution {resolution} is not a multiple of {name}'s patch "
                       f"size {patch} (e.g. {resolution // patch * patch or patch})")
    kwargs = dict(model_kwargs, img_size=resolution, num_classes=0)
    if weights is not None:
        sd = read_tensors(weights)  # checked before building: a bad file costs nothing
        net = timm.create_model(arch, pretrained=False, **kwargs)
        try:
            from timm.models.vision_transformer import checkpoint_filter_fn

            # Converts Meta's original DINOv2 layout; resamples pos_embed to this resolution.
            sd = checkpoint_filter_fn(dict(sd), net)
        except Exception as exc:  # a foreign dict can fail anywhere inside the converter
            raise SraError(f"--encoder-weights {weights}: not {name} weights "
                           f"({first_line(exc, with_type=True, limit=200)})") from None
        load_state_dict_strict(net, sd, f"--encoder-weights {weights}")
    else:
        try:
            net = timm.create_model(f"{arch}.{tag}" if tag else arch, pretrained=True, **kwargs)
        except Exception as exc:  # offline, hub errors, missing cache: all one line
            raise SraError(
                f"cannot load the pretrained {name} weights through timm "
                f"({first_line(exc, with_type=True, limit=160)}); offline, pass "
                f"--encoder-weights FILE (timm's {arch}.{tag} model.safetensors or Meta's .pth)"
            ) from None
    return TimmViTEncoder(net, name, resolution)

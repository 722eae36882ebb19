"""Inception-v3 features exactly where the ADM evaluation suite reads them.

The network is torch-fidelity's port of the TensorFlow "2015-12-05" Inception graph
(``FeatureExtractorInceptionV3``): uint8 images at any size go in, it resizes them to 299×299 the
TF1 way (bilinear, no antialiasing, ``align_corners=False``) and scales (x − 128)/128 itself.
From one forward pass we read:

- ``pool``: ``pool_3`` (N, 2048) — FID, precision/recall;
- ``logits``: the 1008 logits without the bias (``logits_unbiased``) — Inception Score;
- ``spatial``: ``mixed_6/conv`` — the 1×1 branch of the third 17×17 block (torch-fidelity's
  ``Mixed_6d.branch1x1``, after its batch-norm and ReLU) — made channels-last, first 7 channels,
  flattened: (N, 7·17·17 = 2023) — sFID.

Weights come from torch-fidelity's URL (fetched once through :mod:`sra.artefacts`, registry name
``inception-2015-12-05``, its published hash prefix checked) or a local
``.pth``/``.pt`` or ``.safetensors`` file holding the state dict. Nothing is downloaded at import.
Every weights file, downloaded or not, is read as tensors only (safetensors, or ``torch.load`` with
``weights_only=True``) and loaded into a network we build ourselves: torch-fidelity's own loader
unpickles with ``weights_only=False``, so a crafted file handed to it would run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from sra.devices import resolve_device
from sra.errors import SraError, first_line

# torch-fidelity's conversion of the TF "2015-12-05" graph (the graph the ADM suite runs).
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
POOL_DIM = 2048
LOGITS_DIM = 1008
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv …
SPATIAL_GRID = 17  # … on its 17×17 grid
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_GRID * SPATIAL_GRID  # 2023
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF "mixed_6/conv" (mixed, mixed_1.. count from Mixed_5b)
_FEATURES = ("2048", "logits_unbiased")


def spatial_features(mixed6_conv: torch.Tensor) -> torch.Tensor:
    """sFID vector from the ``mixed_6/conv`` activation (N, C, 17, 17) in PyTorch's NCHW layout.

    TF computes NHWC, and the ADM suite takes ``spatial[..., :7]`` of the (N, 17, 17, C) tensor and
    flattens it, so the vector is ordered (h, w, c). We must permute to channels-last *before*
    slicing: slicing NCHW ``[..., :7]`` would cut the width axis, and ``[:, :7]`` then flattening
    gives a (c, h, w) order whose statistics do not match the published reference ``mu_s``/``sigma_s``.
    """
    if mixed6_conv.dim() != 4 or mixed6_conv.shape[1] < SPATIAL_CHANNELS:
        raise SraError(
            f"mixed_6/conv activation must be (N, C>={SPATIAL_CHANNELS}, H, W), got {tuple(mixed6_conv.shape)}"
        )
    nhwc = mixed6_conv.permute(0, 2, 3, 1)  # (N, 17, 17, C)
    return nhwc[..., :SPATIAL_CHANNELS].reshape(nhwc.shape[0], -1)  # (N, 2023)


def is_url(weights: str | os.PathLike) -> bool:
    """Whether ``weights`` names a download (http/https) rather than a local file."""
    return str(weights).startswith(("http://", "https://"))


def resolve_weights(weights: str | os.PathLike = INCEPTION_URL) -> Path:
    """Local path of the Inception state dict: ``weights`` itself, or a URL / registry name
    fetched once through :mod:`sra.artefacts` (cached, resumable, hash-checked when known)."""
    from sra.artefacts import is_remote, resolve

    weights = str(weights)
    if is_remote(weights):
        return resolve(weights, what="Inception weights")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise SraError(
            f"Inception weights file not found: {path} "
            "(pass a local .pth/.safetensors file or a URL to --inception-weights)"
        )
    return path


def weights_id(weights: str | os.PathLike = INCEPTION_URL) -> str:
    """A short stable id of the weights, used to key cached statistics.

    A URL is identified by itself (torch-fidelity's URL carries the file's hash); a local file by the
    SHA-256 of its content, so a changed file never reuses stale statistics.
    """
    weights = str(weights)
    h = hashlib.sha256()
    if is_url(weights) or weights.startswith("hf://"):
        h.update(weights.encode())
    else:
        with open(Path(weights).expanduser(), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """Disable TF32 (on by default for cuDNN convolutions) so GPU features stay close to TF's fp32."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------------------------
# Safe weights loading: tensors only, into a network built without reading any file.


def _bare_inception() -> nn.Module:
    """torch-fidelity's Inception-v3 architecture with fresh (untrained) modules, built without
    reading any weights file: its ``__init__`` always loads a state dict, so we hand it an empty
    one serialised here in memory and ignore it."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        _building = True

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if self._building:  # the parent's __init__ loading its (empty) file: keep fresh modules
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    empty = io.BytesIO()
    torch.save({}, empty)  # our own bytes: nothing foreign is ever unpickled here
    empty.seek(0)
    net = _Unloaded("inception-v3-compat", list(_FEATURES), feature_extractor_weights_path=empty)
    net._building = False
    return net


def load_inception_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an Inception state dict as tensors only: ``.safetensors`` via safetensors, anything else
    via ``torch.load(weights_only=True)``. Any failure is one :class:`SraError` line naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise SraError(f"Inception weights file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise SraError(f"{path} is not a readable safetensors file ({first_line(exc, with_type=True)})") from None
    else:
        with open(path, "rb") as f:
            magic = f.read(4)
        # torch.save writes a ZIP (PK..) or, in the legacy format, a pickle (protocol byte 0x80)
        if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
            raise SraError(f"{path} is not a torch or safetensors weights file (unknown header {magic!r})")
        try:
            with warnings.catch_warnings():  # torch's pickle-protocol chatter is not the user's concern
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch's message advises weights_only=False, i.e. running the file's code: never relay it.
            raise SraError(
                f"{path} holds pickled objects other than tensors; refusing to load it (it could run "
                "code): save the Inception weights as a plain state dict of tensors or as .safetensors"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError,
                ImportError, IndexError, KeyError, UnicodeDecodeError) as exc:
            raise SraError(f"{path} is not a readable torch state dict, perhaps truncated "
                           f"({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise SraError(f"{path} is not a state dict (a mapping of names to tensors), got {type(state).__name__}")
    return state


def build_inception(state_dict: dict[str, torch.Tensor], where: str | os.PathLike = "state dict") -> nn.Module:
    """torch-fidelity's Inception-v3 (pool_3 + unbiased logits) with ``state_dict`` loaded strictly.

    Keys and shapes are compared first so a wrong file gets one line saying what differs.
    """
    net = _bare_inception()
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state_dict[k].shape)} "
                         f"vs {tuple(expected[k].shape)})")
        raise SraError(
            f"{where} is not an Inception-v3 state dict in torch-fidelity's layout: {'; '.join(parts)}"
        )
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise SraError(f"{where}: cannot load the Inception-v3 state dict ({first_line(exc, with_type=True)})") from None
    return net.float().requires_grad_(False).eval()


class InceptionFeatures(nn.Module):
    """ADM-suite Inception features: ``forward(uint8 (N, 3, H, W)) -> {"pool", "spatial", "logits"}``.

    ``weights``: torch-fidelity's URL (default) or a local state-dict file.
    """

    def __init__(self, weights: str | os.PathLike = INCEPTION_URL, device: str | torch.device | None = None):
        super().__init__()
        path = resolve_weights(weights)
        self.net = build_inception(load_inception_state_dict(path), where=path)
        self.weights = str(weights)
        self._spatial: torch.Tensor | None = None
        # torch-fidelity exposes no mixed_6/conv output: catch it with a hook during the one pass.
        self.net.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)
        self.to(resolve_device(device))
        self.eval()

    def _keep_spatial(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._spatial = output

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 images (N, 3, H, W) at any size → float32 ``pool`` (N, 2048), ``spatial`` (N, 2023),
        ``logits`` (N, 1008)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise SraError(
                f"Inception expects uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        with _full_precision():
            pool, logits = self.net(images.to(self.device))
        spatial = spatial_features(self._spatial)
        self._spatial = None
        return {"pool": pool.float(), "spatial": spatial.float(), "logits": logits.float()}


def save_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomly initialised Inception-v3 state dict (torch-fidelity's layout) to ``path``.

    For tests and smoke runs where the real weights cannot be downloaded. He-normal convolutions and
    identity batch-norms keep activations O(1) through the depth, so the features are informative.
    A ``.safetensors`` path is written as safetensors, anything else with ``torch.save``.
    """
    net = _bare_inception()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features**0.5)
                m.bias.zero_()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path

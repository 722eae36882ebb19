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

Weights come from torch-fidelity's URL (downloaded once into the torch hub cache) or a local
``.pth`` file holding the state dict. Nothing is downloaded at import.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from sra.errors import SraError

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
    """Local path of the Inception state dict: ``weights`` itself, or a URL downloaded once into
    ``$TORCH_HOME/hub/checkpoints`` (torch.hub's cache)."""
    weights = str(weights)
    if not is_url(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise SraError(
                f"Inception weights file not found: {path} (pass a local .pth or a URL to --inception-weights)"
            )
        return path
    target = Path(torch.hub.get_dir()) / "checkpoints" / weights.rstrip("/").rsplit("/", 1)[-1]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights, str(target), progress=True)
        except Exception as exc:  # network errors come in many types; report them as one line
            raise SraError(
                f"could not download Inception weights from {weights} ({type(exc).__name__}: {exc}); "
                "download the file elsewhere and pass its local path to --inception-weights"
            ) from None
    return target


def weights_id(weights: str | os.PathLike = INCEPTION_URL) -> str:
    """A short stable id of the weights, used to key cached statistics.

    A URL is identified by itself (torch-fidelity's URL carries the file's hash); a local file by the
    SHA-256 of its content, so a changed file never reuses stale statistics.
    """
    weights = str(weights)
    h = hashlib.sha256()
    if is_url(weights):
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


class InceptionFeatures(nn.Module):
    """ADM-suite Inception features: ``forward(uint8 (N, 3, H, W)) -> {"pool", "spatial", "logits"}``.

    ``weights``: torch-fidelity's URL (default) or a local state-dict file.
    """

    def __init__(self, weights: str | os.PathLike = INCEPTION_URL, device: str | torch.device | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = resolve_weights(weights)
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", list(_FEATURES), feature_extractor_weights_path=str(path)
            )
        except (RuntimeError, KeyError, EOFError, OSError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SraError(f"{path} is not an Inception-v3 state dict usable by torch-fidelity ({first_line})") from None
        self.weights = str(weights)
        self._spatial: torch.Tensor | None = None
        # torch-fidelity exposes no mixed_6/conv output: catch it with a hook during the one pass.
        self.net.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        self.to(device)
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
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        """Builds the architecture without loading anything (the parent's ``__init__`` always loads)."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the fresh modules; the real weights are drawn below

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    net = _Unloaded("inception-random", list(_FEATURES), feature_extractor_weights_path=empty)
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
    torch.save(net.state_dict(), path)
    return path

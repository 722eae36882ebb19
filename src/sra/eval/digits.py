"""The bundled digits' own metric: a small CNN classifier trained by the project.

Inception features mean little on 16×16 one-channel digits, so digits get:

- ``fd``: the Fréchet distance between the classifier's penultimate features (the 128-d hidden
  layer, before its ReLU) of the samples and of all 1797 real digits;
- ``acc``: for class-conditional samples, the share the classifier assigns to the requested class.

The classifier trains once (fixed seed, a held-out split reports its own accuracy; a few seconds on
a laptop CPU) and is cached as safetensors under ``$SRA_CACHE_DIR`` (default ``~/.cache/sra``)
together with the real digits' feature statistics.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sra.atomic import atomic_path
from sra.data.digits import DIGITS_CLASSES, DIGITS_SIZE, load_digits_arrays
from sra.errors import SraError, first_line
from sra.eval.metrics import feature_statistics, frechet_distance

CACHE_ENV = "SRA_CACHE_DIR"
CLASSIFIER_FILE = "digits_classifier_v1.safetensors"
MIN_TEST_ACC = 0.95  # a classifier below this is a bug, not a metric


@dataclass(frozen=True)
class DigitsClassifierConfig:
    """How the digit classifier is built and trained (changing it needs a new cache file name)."""

    width: int = 16  # channels of the first conv stage (the second has 2×)
    feat_dim: int = 128  # penultimate (feature) width
    seed: int = 0
    test_fraction: float = 0.15  # held out to report the classifier's own accuracy
    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    train_threads: int = 1  # the net is tiny: more threads only spin (5× slower on a busy 2-core box)
    max_shift: int = 1  # random translation (pixels) during training, for robustness to samples


def cache_dir() -> Path:
    """The project's cache directory: ``$SRA_CACHE_DIR`` or ``~/.cache/sra``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sra").expanduser()


def default_classifier_path() -> Path:
    """Where the digit classifier is cached: ``cache_dir() / CLASSIFIER_FILE``."""
    return cache_dir() / CLASSIFIER_FILE


class DigitsClassifier(nn.Module):
    """Conv(1→w)·pool · Conv(w→2w)·pool · Linear(→feat) · ReLU · Linear(→10), on (N, 1, 16, 16)."""

    def __init__(self, cfg: DigitsClassifierConfig = DigitsClassifierConfig(), size: int = DIGITS_SIZE):
        super().__init__()
        w = cfg.width
        self.convs = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, w, 8, 8)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 2w, 4, 4)
        )
        self.fc = nn.Linear(2 * w * (size // 4) ** 2, cfg.feat_dim)
        self.head = nn.Linear(cfg.feat_dim, DIGITS_CLASSES)
        # Real-digit feature statistics, filled after training; saved with the weights.
        self.register_buffer("ref_mu", torch.zeros(cfg.feat_dim, dtype=torch.float64))
        self.register_buffer("ref_sigma", torch.zeros(cfg.feat_dim, cfg.feat_dim, dtype=torch.float64))
        self.test_acc: float | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 16, 16) in [-1, 1] → penultimate features (N, feat_dim), before the ReLU."""
        return self.fc(self.convs(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 16, 16) → class logits (N, 10)."""
        return self.head(F.relu(self.features(x)))


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to the uint8 grid (what a saved sample holds), staying in [-1, 1].

    Applied to real digits and to samples alike, so a float tensor from the training loop and the
    same images read back from an npz get the same numbers.
    """
    return ((images.float() + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background −1 fills the border)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, 1, h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, 1, h, w)
    return out.gather(3, cols)


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def train_digits_classifier(
    cfg: DigitsClassifierConfig = DigitsClassifierConfig(), progress: bool = False
) -> DigitsClassifier:
    """Train the classifier on the sklearn digits (CPU, deterministic for a seed).

    Holds out ``cfg.test_fraction`` of the digits (stratified permutation) to measure its accuracy
    (``model.test_acc``), then stores the feature statistics of all real digits in the model.
    Gradients are switched on here, whatever the caller's context: the first evaluation may well
    happen under ``torch.no_grad()`` or ``torch.inference_mode()`` (e.g. inside a sampling loop).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _train(cfg, progress)


def _train(cfg: DigitsClassifierConfig, progress: bool) -> DigitsClassifier:
    """:func:`train_digits_classifier` proper (gradients already enabled by the caller)."""
    images, labels = load_digits_arrays()
    x = quantize(torch.from_numpy(images))  # (N, 1, 16, 16)
    y = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(cfg.seed)
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(DIGITS_CLASSES):  # stratified hold-out
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test_mask[idx[: round(len(idx) * cfg.test_fraction)]] = True
    x_tr, y_tr, x_te, y_te = x[~test_mask], y[~test_mask], x[test_mask], y[test_mask]

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train_threads)
    try:
        model = _fit(cfg, x_tr, y_tr, gen, progress)
    finally:
        torch.set_num_threads(threads)
    model.test_acc = float((_batched(model, x_te).argmax(1) == y_te).float().mean())
    mu, sigma = feature_statistics(_batched(model.features, x).double().numpy())
    model.ref_mu.copy_(torch.from_numpy(mu))
    model.ref_sigma.copy_(torch.from_numpy(sigma))
    return model


def _fit(
    cfg: DigitsClassifierConfig, x_tr: torch.Tensor, y_tr: torch.Tensor, gen: torch.Generator, progress: bool
) -> DigitsClassifier:
    """The training loop proper (AdamW, one-cycle schedule, random shifts); returns the model in eval mode."""
    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DigitsClassifier(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(y_tr) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    model.train()
    for _ in tqdm(range(cfg.epochs), desc="digits classifier", disable=not progress):
        order = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(model(_random_shift(x_tr[b], cfg.max_shift, gen)), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def save_digits_classifier(
    model: DigitsClassifier, path: str | os.PathLike, cfg: DigitsClassifierConfig
) -> Path:
    """Write weights + real-digit statistics as safetensors (atomically: temp file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"config": json.dumps(asdict(cfg)), "test_acc": repr(model.test_acc)}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata=meta)
    return path


class _UnusableCache(Exception):
    """The cached classifier file cannot be used (message: why)."""


def _read_classifier(path: Path) -> DigitsClassifier:
    """Load a cached classifier; raise :class:`_UnusableCache` for a damaged or foreign file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        cfg = DigitsClassifierConfig(**json.loads(meta["config"]))
        model = DigitsClassifier(cfg)
        model.load_state_dict(load_file(str(path)))
        test_acc = meta.get("test_acc")
        model.test_acc = float(test_acc) if test_acc not in (None, "None") else None
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        # SafetensorError: truncated/random bytes; the rest: valid safetensors of another layout
        raise _UnusableCache(first_line(exc, with_type=True)) from None
    return model.eval()


def load_digits_classifier(
    path: str | os.PathLike | None = None, *, train_if_missing: bool = True, progress: bool = False,
    config: DigitsClassifierConfig | None = None,
) -> DigitsClassifier:
    """The cached classifier (CPU, eval mode).

    A missing cache file is trained and written (atomically); a damaged or foreign one is retrained
    and overwritten with a warning (it is only a cache). With ``train_if_missing=False`` both raise
    :class:`SraError` instead. ``config`` (with its own ``path``) trains another classifier than
    the scoring one, e.g. the REPA positive control's encoder; None → the scoring classifier's.
    """
    path = Path(path) if path is not None else default_classifier_path()
    if path.is_file():
        try:
            return _read_classifier(path)
        except _UnusableCache as exc:
            if not train_if_missing:
                raise SraError(f"{path} is not a digit classifier of this version ({exc})") from None
            warnings.warn(f"cached digit classifier {path} is unusable ({exc}); retraining it", RuntimeWarning)
    elif not train_if_missing:
        raise SraError(f"digit classifier not found: {path}")
    cfg = config if config is not None else DigitsClassifierConfig()
    model = train_digits_classifier(cfg, progress=progress)
    if model.test_acc < MIN_TEST_ACC:
        raise RuntimeError(f"digit classifier reached only {model.test_acc:.3f} held-out accuracy")
    try:
        save_digits_classifier(model, path, cfg)
    except OSError as exc:  # an unwritable cache must not stop an evaluation
        warnings.warn(f"{exc}; the digit classifier is used without being cached", RuntimeWarning)
    return model


def digits_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Samples in any of the accepted layouts → float (N, 1, 16, 16) in [-1, 1].

    Accepts uint8 in [0, 255] or float in [-1, 1]; NHWC (ADM npz: (N, H, W, 1|3)) or NCHW
    (N, 1|3, H, W); three channels are averaged (the sampler repeats the gray channel); other sizes
    are resized bilinearly to 16×16.
    """
    x = torch.as_tensor(images)
    if x.dim() == 3:  # (N, H, W)
        x = x[:, None]
    if x.dim() != 4:
        raise SraError(f"digit samples must be (N, H, W, C) or (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)  # NHWC → NCHW
    if x.shape[1] not in (1, 3):
        raise SraError(f"digit samples must have 1 or 3 channels, got shape {tuple(x.shape)}")
    x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
    x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (DIGITS_SIZE, DIGITS_SIZE):
        x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    return x


def digits_metrics(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None = None,
    *,
    classifier: DigitsClassifier | None = None,
    batch_size: int = 1024,
) -> dict:
    """Digit-classifier metrics of samples: ``{"fd", "acc", "n"}``.

    ``images``: (N, 1, 16, 16) in [-1, 1] (any layout :func:`digits_input` accepts); ``labels``: the
    classes the samples were conditioned on, or None (then ``acc`` is None). Samples are rounded to
    the uint8 grid first, like the real digits' statistics. Safe to call under ``torch.no_grad()``:
    a classifier trained here trains with gradients on; only the forward passes below drop them.
    """
    with torch.no_grad():  # inputs may carry grad (e.g. straight from a model); never needed here
        x = quantize(digits_input(images).detach().cpu())
    if len(x) < 2:
        raise SraError(f"digits metrics need at least 2 samples, got {len(x)}")
    # Checked before loading: a bad call must not cost a classifier training first.
    y = None
    if labels is not None:
        y = torch.as_tensor(labels).long().cpu().flatten()
        if len(y) != len(x):
            raise SraError(f"got {len(y)} labels for {len(x)} digit samples")
    model = classifier if classifier is not None else load_digits_classifier()
    model = model.eval()
    device = next(model.parameters()).device
    feats, preds = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            h = model.features(x[i : i + batch_size].to(device))
            feats.append(h.double().cpu())
            preds.append(model.head(F.relu(h)).argmax(1).cpu())
    mu, sigma = feature_statistics(torch.cat(feats).numpy())
    fd = frechet_distance(mu, sigma, model.ref_mu.cpu().numpy(), model.ref_sigma.cpu().numpy())
    acc = None if y is None else float((torch.cat(preds) == y).float().mean())
    return {"fd": fd, "acc": acc, "n": len(x)}

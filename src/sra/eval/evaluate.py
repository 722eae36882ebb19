"""Evaluate a batch of samples the way the ADM suite does: npz in, metrics dict (and JSON) out.

Input format (ADM, read and validated by :mod:`sra.data.adm_npz`): an ``.npz`` whose ``arr_0`` is
uint8 (N, H, W, 3) (1-channel images are repeated to 3). The reference npz may also hold ``mu``,
``sigma`` (pool_3) and ``mu_s``, ``sigma_s`` (spatial); when present they are used as stored, not
recomputed from its images.

Inception activations are cached beside each npz (``NAME.stats-<weights id>.npz``: pool features,
logits and both statistics) and reused while the npz's size and mtime are unchanged, so evaluating
another sample batch against the same reference costs one pass over the new samples only.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sra.atomic import atomic_path, atomic_write_json
from sra.data.adm_npz import (
    IMAGES_KEY, LABELS_KEY, STAT_PAIRS, NpzImages, check_images_npz, check_npz_file, check_reference_npz,
    npz_array_info, npz_keys, to_rgb_uint8,
)
from sra.errors import SraError
from sra.eval import metrics as M

CACHE_VERSION = 1


@dataclass
class EvalConfig:
    """What ``sra eval`` computes and how."""

    samples: Path
    ref: str | Path | None = None  # ADM reference batch (path, registry name, hf://, URL)
    digits: bool = False  # digit-classifier metrics instead of Inception ones
    inception_weights: str | None = None  # URL or local file; None = torch-fidelity's URL
    batch_size: int = 100
    device: str | None = None  # None: cuda if available
    is_split_size: int = M.IS_SPLIT_SIZE
    pr_k: int = M.PR_K
    cache: bool = True  # read/write activation caches beside the npz files
    out: Path | None = None  # metrics JSON; None = beside the samples
    progress: bool = True


# --------------------------------------------------------------------------------------------
# Inception activations and their cache.


def compute_activations(
    images: NpzImages, extractor, batch_size: int = 100, progress: bool = True, desc: str = "inception"
) -> dict[str, np.ndarray]:
    """Run the extractor over all images: ``pool`` (N, 2048), ``logits`` (N, 1008) float32, and the
    statistics of ``pool`` and ``spatial`` (``mu``, ``sigma``, ``mu_s``, ``sigma_s``).

    Spatial features (N, 2023) are only needed for their statistics; keeping them is cheap (they
    are the size of the pool features) and lets the covariance be computed in float64 at once.
    """
    import torch
    from tqdm.auto import tqdm

    pool, spatial, logits = [], [], []
    n_batches = (len(images) + batch_size - 1) // batch_size
    for batch in tqdm(images.batches(batch_size), total=n_batches, desc=desc, disable=not progress):
        x = torch.from_numpy(to_rgb_uint8(batch)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        out = extractor(x)
        pool.append(out["pool"].cpu().numpy())
        spatial.append(out["spatial"].cpu().numpy())
        logits.append(out["logits"].cpu().numpy())
    if not pool:
        raise SraError(f"{images.path} holds no images")
    acts = {"pool": np.concatenate(pool), "logits": np.concatenate(logits)}
    spatial_all = np.concatenate(spatial)
    acts["mu"], acts["sigma"] = M.feature_statistics(acts["pool"])
    acts["mu_s"], acts["sigma_s"] = M.feature_statistics(spatial_all)
    return acts


def cache_path(npz: Path, wid: str) -> Path:
    """Where the activations of ``npz`` under weights ``wid`` are cached."""
    return npz.with_name(f"{npz.stem}.stats-{wid}.npz")


def _source_meta(npz: Path, wid: str) -> dict:
    st = npz.stat()
    return {"version": CACHE_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "weights_id": wid}


def load_cached(npz: Path, wid: str) -> dict[str, np.ndarray] | None:
    """The cached activations of ``npz`` if present and made from this very file and weights."""
    path = cache_path(npz, wid)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["meta"])) != _source_meta(npz, wid):
                return None
            return {k: z[k] for k in z.files if k != "meta"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # a damaged cache is recomputed, never trusted


def save_cached(npz: Path, wid: str, acts: dict[str, np.ndarray]) -> Path | None:
    """Write the cache atomically; an unwritable directory only costs a warning."""
    path = cache_path(npz, wid)
    try:
        with atomic_path(path, suffix=".tmp.npz") as tmp:  # np.savez insists on ".npz"
            np.savez(tmp, meta=np.array(json.dumps(_source_meta(npz, wid))), **acts)
    except OSError as exc:
        warnings.warn(f"{exc}; the Inception activations are not cached", RuntimeWarning)
        return None
    return path


def batch_activations(
    npz: Path, extractor, wid: str, cfg: EvalConfig, desc: str
) -> dict[str, np.ndarray] | None:
    """Activations of the images in ``npz`` (cached), or None if the npz holds no ``arr_0``."""
    if IMAGES_KEY not in npz_keys(npz):
        return None
    if cfg.cache and (acts := load_cached(npz, wid)) is not None:
        return acts
    acts = compute_activations(NpzImages(npz), extractor(), cfg.batch_size, cfg.progress, desc)
    if cfg.cache:
        save_cached(npz, wid, acts)
    return acts


# --------------------------------------------------------------------------------------------
# Orchestration.


def reference_statistics(
    ref: Path, ref_acts: dict[str, np.ndarray] | None
) -> tuple[dict[str, np.ndarray], str]:
    """The reference's (mu, sigma) and (mu_s, sigma_s): each pair as stored in the npz when present
    (ADM uses the published statistics, not ones recomputed from the images), else from its images.

    Returns the four arrays and where they came from: "stored", "computed" or "mixed".
    """
    with np.load(ref) as z:
        stored = {k: z[k] for pair in STAT_PAIRS for k in pair if k in z.files}
    stats, sources = {}, set()
    for pair in STAT_PAIRS:
        if all(k in stored for k in pair):
            stats.update((k, stored[k]) for k in pair)
            sources.add("stored")
        elif ref_acts is not None:
            stats.update((k, ref_acts[k]) for k in pair)
            sources.add("computed")
        else:
            raise SraError(
                f"reference {ref} holds neither images ('arr_0') nor the statistics {' and '.join(pair)}"
            )
    return stats, sources.pop() if len(sources) == 1 else "mixed"


def evaluate_inception(cfg: EvalConfig) -> dict:
    """FID, sFID, Inception Score, precision and recall of ``cfg.samples`` against ``cfg.ref``."""
    from sra.artefacts import ARTEFACTS, resolve
    from sra.eval.inception import (
        INCEPTION_URL, POOL_DIM, SPATIAL_DIM, InceptionFeatures, is_url, resolve_weights, weights_id,
    )

    # Both npz files are checked (headers only) before any weights are read or downloaded, so an
    # offline user with a bad npz hears about the npz, not about the network.
    samples = check_npz_file(cfg.samples, "samples")
    check_images_npz(samples, "samples")
    ref = check_reference_npz(resolve(cfg.ref, what="--ref"), (POOL_DIM, SPATIAL_DIM))
    weights = cfg.inception_weights or INCEPTION_URL
    if weights in ARTEFACTS:  # a registry name means its URL (the stats cache is keyed by it)
        weights = ARTEFACTS[weights].url
    if not is_url(weights):
        resolve_weights(weights)  # a missing local file fails here, before any work
    wid = weights_id(weights)

    net = None

    def extractor():  # built lazily: fully cached runs never load the network
        nonlocal net
        if net is None:
            net = InceptionFeatures(weights, device=cfg.device)
        return net

    ref_acts = batch_activations(ref, extractor, wid, cfg, "reference")
    ref_stats, ref_stats_source = reference_statistics(ref, ref_acts)

    acts = batch_activations(samples, extractor, wid, cfg, "samples")

    results: dict = {
        "inception_score": M.inception_score(acts["logits"], cfg.is_split_size),
        "fid": M.frechet_distance(acts["mu"], acts["sigma"], ref_stats["mu"], ref_stats["sigma"]),
        "sfid": M.frechet_distance(acts["mu_s"], acts["sigma_s"], ref_stats["mu_s"], ref_stats["sigma_s"]),
        "precision": None,
        "recall": None,
    }
    if ref_acts is not None:
        results["precision"], results["recall"] = M.precision_recall(ref_acts["pool"], acts["pool"], cfg.pr_k)
    else:
        warnings.warn(f"reference {ref} has no images: precision/recall skipped", RuntimeWarning)
    results.update(
        num_samples=int(len(acts["pool"])),
        num_ref=None if ref_acts is None else int(len(ref_acts["pool"])),
        ref_stats=ref_stats_source,
        samples=str(samples),
        ref=str(ref),
        inception_weights=str(weights),
        is_split_size=cfg.is_split_size,
        pr_k=cfg.pr_k,
    )
    return results


def load_digit_samples(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``arr_0`` images (uint8 or float, NHWC or NCHW) and ``labels`` (or None) from an npz.

    Validated before the digit classifier is loaded (or trained): (N, H, W), (N, H, W, 1|3) or
    (N, 1|3, H, W), N >= 2, uint8 or finite floats; ``labels`` integers, one per image.
    """
    path = check_npz_file(path, "samples")
    shape, dtype = npz_array_info(path, IMAGES_KEY)
    if not (len(shape) == 3 or (len(shape) == 4 and (shape[-1] in (1, 3) or shape[1] in (1, 3)))):
        raise SraError(f"samples {path}: '{IMAGES_KEY}' of shape {shape} is not a batch of digit images; "
                       "expected (N, H, W), (N, H, W, 1|3) or (N, 1|3, H, W)")
    if dtype != np.uint8 and dtype.kind != "f":
        raise SraError(f"samples {path}: '{IMAGES_KEY}' must be uint8 in [0, 255] or float in [-1, 1], got {dtype}")
    if shape[0] < 2 or min(shape[1:]) < 1:
        raise SraError(f"samples {path}: digits metrics need at least 2 non-empty images, got shape {shape}")
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z[IMAGES_KEY]
            labels = z[LABELS_KEY] if LABELS_KEY in z.files else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise SraError(f"samples {path}: cannot read ({type(exc).__name__})") from None
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise SraError(f"samples {path}: '{IMAGES_KEY}' holds NaN or infinite values")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.reshape(-1).shape[0] != shape[0]:
            raise SraError(f"samples {path}: '{LABELS_KEY}' must hold one integer class per image "
                           f"({shape[0]}), got {labels.dtype} {labels.shape}")
        from sra.data.digits import DIGITS_CLASSES

        if labels.size and (labels.min() < 0 or labels.max() >= DIGITS_CLASSES):
            raise SraError(f"samples {path}: '{LABELS_KEY}' must be digit classes 0..{DIGITS_CLASSES - 1}, "
                           f"got values in [{labels.min()}, {labels.max()}]")
    return images, labels


def evaluate_digits(cfg: EvalConfig) -> dict:
    """Digit-classifier Fréchet distance (and class accuracy when the npz has ``labels``)."""
    from sra.eval.digits import digits_metrics, load_digits_classifier

    images, labels = load_digit_samples(cfg.samples)
    clf = load_digits_classifier(progress=cfg.progress)
    m = digits_metrics(images, labels, classifier=clf)
    return {
        "digits_fd": m["fd"],
        "digits_acc": m["acc"],
        "num_samples": m["n"],
        "classifier_test_acc": clf.test_acc,
        "samples": str(cfg.samples),
    }


def default_out(samples: Path) -> Path:
    """``SAMPLES.metrics.json`` beside the samples."""
    samples = Path(samples)
    return samples.with_name(f"{samples.stem}.metrics.json")


def evaluate(cfg: EvalConfig) -> dict:
    """Compute the metrics ``cfg`` asks for, write them as JSON and return them."""
    results = evaluate_digits(cfg) if cfg.digits else evaluate_inception(cfg)
    results["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    out = Path(cfg.out) if cfg.out is not None else default_out(cfg.samples)
    atomic_write_json(out, results)  # never a torn metrics file, even if killed mid-write
    results["json"] = str(out)
    return results


_TABLE_ROWS = (
    ("inception_score", "Inception Score", "{:.3f}"),
    ("fid", "FID", "{:.4f}"),
    ("sfid", "sFID", "{:.4f}"),
    ("precision", "Precision", "{:.4f}"),
    ("recall", "Recall", "{:.4f}"),
    ("digits_fd", "Digits FD", "{:.4f}"),
    ("digits_acc", "Digits class acc.", "{:.4f}"),
    ("classifier_test_acc", "Classifier held-out acc.", "{:.4f}"),
    ("num_samples", "Samples", "{:d}"),
    ("num_ref", "Reference images", "{:d}"),
)


def format_table(results: dict) -> str:
    """The metrics present in ``results`` as a two-column text table (None shown as "n/a")."""
    rows = [(label, "n/a" if results[key] is None else fmt.format(results[key]))
            for key, label, fmt in _TABLE_ROWS if key in results]
    w1 = max(len("metric"), *(len(r[0]) for r in rows))
    w2 = max(len("value"), *(len(r[1]) for r in rows))
    lines = [f"{'metric':<{w1}}  {'value':>{w2}}", f"{'-' * w1}  {'-' * w2}"]
    lines += [f"{a:<{w1}}  {b:>{w2}}" for a, b in rows]
    return "\n".join(lines)

"""Sample-quality metrics on feature arrays, computed as the ADM evaluation suite does.

Pure numpy/scipy: no network, no torch. Every function takes plain arrays so the same code serves
Inception features (FID, sFID, IS, precision/recall) and the digit classifier's features.

- :func:`feature_statistics`: mean and (unbiased) covariance of an (N, D) feature array.
- :func:`frechet_distance`: ‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2·(Σ1Σ2)^½) with the robust square root of the
  ADM suite (retry with a small diagonal offset when the root is not finite; a large imaginary part
  is an error).
- :func:`inception_score`: exp(E[KL(p(y|x) ‖ p(y))]) per chunk of ``split_size`` samples, averaged.
- :func:`precision_recall`: k-NN manifold precision/recall (Kynkäänniemi et al.), blockwise so that
  50K × 10K × 2048 fits in memory.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from sra.errors import SraError

SQRTM_EPS = 1e-6  # diagonal offset of the ADM retry when sqrtm(Σ1Σ2) is not finite
IMAG_ATOL = 1e-3  # largest tolerated imaginary part on the diagonal of sqrtm(Σ1Σ2)
IS_SPLIT_SIZE = 5000  # ADM: IS over chunks of 5000 samples (10 splits for 50K)
PR_K = 3  # ADM: radius = distance to the k-th neighbour besides self (4th including self)
PR_BLOCK = 4096  # rows/columns per block of the pairwise-distance computation


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), both float64, of features (N, D)."""
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise SraError(f"need at least 2 feature vectors of shape (N, D) for statistics, got {feats.shape}")
    mu = feats.mean(axis=0, dtype=np.float64)
    sigma = np.cov(feats, rowvar=False).astype(np.float64, copy=False)
    return mu, np.atleast_2d(sigma)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's matrix square root; a separate function so the retry path can be exercised."""
    return linalg.sqrtm(a)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = SQRTM_EPS
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as the ADM evaluator computes it.

    If sqrtm(Σ1Σ2) is not finite (nearly singular product), retry with ``eps`` added to both
    diagonals. Imaginary parts from round-off are dropped; a diagonal imaginary part above 1e-3
    raises :class:`SraError` (the statistics are not valid covariances).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise SraError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise SraError(
            f"covariances must both be ({mu1.size}, {mu1.size}); got {sigma1.shape} and {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"sqrtm of the covariance product is not finite; adding {eps} to the diagonals", RuntimeWarning
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise SraError("Frechet distance: sqrtm of the covariance product is not finite even with the offset")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL):
            raise SraError(
                f"Frechet distance: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g} "
                "(are the covariances positive semi-definite?)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def inception_score(
    logits_or_probs: np.ndarray, split_size: int = IS_SPLIT_SIZE, *, probs: bool = False
) -> float:
    """Inception Score: mean over consecutive chunks of ``split_size`` rows of exp(E_x KL(p(y|x) ‖ p(y))).

    ``logits_or_probs`` is (N, classes): logits (softmax taken here, in float64 and in log space so a
    zero probability cannot produce NaN) or, with ``probs=True``, class probabilities. The chunks are
    taken in order, the last one possibly shorter — ADM's evaluator does the same (10 chunks at 50K).
    """
    x = np.asarray(logits_or_probs, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise SraError(f"inception_score expects an (N, classes) array, got shape {x.shape}")
    if split_size < 1:
        raise SraError(f"IS split size must be >= 1, got {split_size}")
    if probs:
        with np.errstate(divide="ignore"):
            logp = np.log(x)
    else:
        logp = _log_softmax(x)
    scores = []
    for start in range(0, len(logp), split_size):
        part_logp = logp[start : start + split_size]  # (n, C)
        part_p = np.exp(part_logp)
        with np.errstate(divide="ignore"):
            log_marginal = np.log(part_p.mean(axis=0, keepdims=True))  # (1, C)
        # p·(log p − log p̄) with the convention 0·log 0 = 0
        with np.errstate(invalid="ignore"):
            kl_terms = np.where(part_p > 0, part_p * (part_logp - log_marginal), 0.0)
        scores.append(np.exp(kl_terms.sum(axis=1).mean()))
    return float(np.mean(scores))


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _sq_distances(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b)), clamped at 0 against round-off."""
    d = a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]
    return np.maximum(d, 0.0, out=d)


def manifold_radii(feats: np.ndarray, k: int = PR_K, block: int = PR_BLOCK) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour besides itself, (N,).

    That is the (k+1)-th smallest distance with the point itself (distance 0) included, as in the
    ADM suite. Computed in row × column blocks keeping a running set of the k+1 smallest values, so
    memory is O(block² + N·k) instead of O(N²).
    """
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    n = len(feats)
    if k < 1:
        raise SraError(f"precision/recall k must be >= 1, got {k}")
    if n < k + 1:
        raise SraError(f"precision/recall with k={k} needs at least {k + 1} feature vectors, got {n}")
    sq = _sq_norms(feats)
    radii = np.empty(n, dtype=np.float32)
    for r0 in range(0, n, block):
        rows = feats[r0 : r0 + block]
        best = np.full((len(rows), k + 1), np.inf, dtype=np.float32)  # running k+1 smallest
        for c0 in range(0, n, block):
            d = _sq_distances(rows, sq[r0 : r0 + block], feats[c0 : c0 + block], sq[c0 : c0 + block])
            cand = np.concatenate([best, d], axis=1)
            best = np.partition(cand, k, axis=1)[:, : k + 1]
        radii[r0 : r0 + block] = best.max(axis=1)
    return radii


def _coverage(
    points: np.ndarray, centres: np.ndarray, centre_radii: np.ndarray, block: int
) -> np.ndarray:
    """For each point, whether it lies in some ball (centre, radius) (boolean (len(points),)).

    Radii are squared distances; a point on the boundary counts as inside (ADM uses ``<=``).
    """
    inside = np.zeros(len(points), dtype=bool)
    p_sq, c_sq = _sq_norms(points), _sq_norms(centres)
    for r0 in range(0, len(points), block):
        rows = points[r0 : r0 + block]
        for c0 in range(0, len(centres), block):
            d = _sq_distances(rows, p_sq[r0 : r0 + block], centres[c0 : c0 + block], c_sq[c0 : c0 + block])
            inside[r0 : r0 + block] |= (d <= centre_radii[None, c0 : c0 + block]).any(axis=1)
    return inside


def precision_recall(
    ref_feats: np.ndarray,
    sample_feats: np.ndarray,
    k: int = PR_K,
    block: int = PR_BLOCK,
    *,
    ref_radii: np.ndarray | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds) of samples against reference features.

    precision = share of samples inside some reference ball; recall = share of reference points
    inside some sample ball; a ball's radius is the distance to its centre's k-th nearest neighbour
    within its own set. ``ref_radii`` (squared, from :func:`manifold_radii`) may be passed to reuse
    them across evaluations.
    """
    ref = np.ascontiguousarray(ref_feats, dtype=np.float32)
    smp = np.ascontiguousarray(sample_feats, dtype=np.float32)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise SraError(f"precision/recall needs (N, D) features of equal D, got {ref.shape} and {smp.shape}")
    r_ref = manifold_radii(ref, k, block) if ref_radii is None else np.asarray(ref_radii, np.float32)
    r_smp = manifold_radii(smp, k, block)
    precision = _coverage(smp, ref, r_ref, block).mean()
    recall = _coverage(ref, smp, r_smp, block).mean()
    return float(precision), float(recall)

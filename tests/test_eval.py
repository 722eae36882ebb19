"""Evaluation: FID/sFID/IS/P-R maths, the sFID layout trap, npz I/O, Inception end to end (random
weights from a local file), caching, the CLI, and the digits classifier metric."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from sra.cli import main as cli_main
from sra.data import adm_npz as A
from sra.errors import SraError
from sra.eval import evaluate as E
from sra.eval import metrics as M
from sra.eval.inception import (
    SPATIAL_DIM,
    InceptionFeatures,
    save_random_inception_weights,
    spatial_features,
    weights_id,
)

# ----------------------------------------------------------------------------- helpers


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _closed_form_fd(mu1, s1, mu2, s2) -> float:
    """W2² between Gaussians via symmetric roots: ‖Δμ‖² + Tr(S1 + S2 − 2 (S1^½ S2 S1^½)^½)."""
    r1 = _psd_sqrt(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * _psd_sqrt(r1 @ s2 @ r1)))


def _images(rng: np.random.Generator, n: int, size: int, lo: int = 0, hi: int = 256) -> np.ndarray:
    return rng.integers(lo, hi, size=(n, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_gaussian_closed_form():
    rng = np.random.default_rng(0)
    for d in (1, 3, 16):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _spd(rng, d), _spd(rng, d)
        expected = _closed_form_fd(mu1, s1, mu2, s2)
        assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-10)
        assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # commuting (diagonal) case: ‖Δμ‖² + Σ (√a − √b)²
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    assert M.frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(3 + 1 + 1)


def test_frechet_distance_of_sample_statistics_converges():
    rng = np.random.default_rng(1)
    d = 4
    mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), _spd(rng, d), _spd(rng, d)
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    est = M.frechet_distance(*M.feature_statistics(x), *M.feature_statistics(y))
    assert est == pytest.approx(_closed_form_fd(mu1, s1, mu2, s2), rel=0.02)


def test_frechet_distance_retries_with_diagonal_offset(monkeypatch):
    rng = np.random.default_rng(2)
    mu, s1, s2 = np.zeros(5), _spd(rng, 5), _spd(rng, 5)
    calls = []
    real = M._sqrtm

    def flaky(a):  # the first root "fails" like a singular product does
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(M, "_sqrtm", flaky)
    with pytest.warns(RuntimeWarning, match="adding 0.001"):
        fd = M.frechet_distance(mu, s1, mu, s2, eps=1e-3)
    off = np.eye(5) * 1e-3
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off))
    expected = np.trace(s1) + np.trace(s2) - 2 * np.trace(real((s1 + off) @ (s2 + off)).real)
    assert fd == pytest.approx(expected)


def test_frechet_distance_rejects_large_imaginary_part_and_bad_shapes():
    with pytest.raises(SraError, match="imaginary"):
        M.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(SraError, match="shape"):
        M.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_on_constructed_logits():
    c = 8
    # every sample uniform → p(y|x) = p(y) → IS = 1
    assert M.inception_score(np.zeros((40, c)), split_size=40) == pytest.approx(1.0)
    # one-hot predictions spread evenly over the classes → IS = number of classes
    onehot = np.eye(c)[np.arange(40) % c]
    assert M.inception_score(onehot, split_size=40, probs=True) == pytest.approx(c)
    # confident logits approach the same; a per-row constant shift changes nothing
    logits = 60.0 * onehot
    assert M.inception_score(logits, split_size=40) == pytest.approx(c, rel=1e-6)
    assert M.inception_score(logits + np.arange(40)[:, None], split_size=40) == pytest.approx(c, rel=1e-6)
    # splits are consecutive chunks and the scores are averaged: chunk 1 all class 0 (IS 1),
    # chunk 2 evenly over 4 classes (IS 4) → 2.5
    probs = np.concatenate([np.eye(c)[np.zeros(20, int)], np.eye(c)[np.arange(20) % 4]])
    assert M.inception_score(probs, split_size=20, probs=True) == pytest.approx(2.5)
    # logits vs. their softmax agree
    rng = np.random.default_rng(3)
    lg = rng.standard_normal((30, 5)) * 3
    p = np.exp(lg) / np.exp(lg).sum(1, keepdims=True)
    assert M.inception_score(lg, 7) == pytest.approx(M.inception_score(p, 7, probs=True))


# ----------------------------------------------------------------------------- precision / recall


def _embed(points_1d: list[float], dim: int, rng: np.random.Generator) -> np.ndarray:
    """Points on a line, rotated into ``dim`` dimensions and shifted (distances preserved)."""
    x = np.zeros((len(points_1d), dim))
    x[:, 0] = points_1d
    return x @ ortho_group.rvs(dim, random_state=7) + rng.standard_normal(dim)


def test_precision_recall_known_answer():
    rng = np.random.default_rng(4)
    # ref 0..9: with k=3 the radii are 3 at the ends and 2 inside.
    # samples: 0.5..3.5 (inside ref balls) + a far cluster 50..53 → precision 4/8.
    # sample radii 3,2,2,3 cover ref points 0..6 → recall 7/10.
    ref_1d = [float(i) for i in range(10)]
    smp_1d = [0.5, 1.5, 2.5, 3.5, 50, 51, 52, 53]
    both = _embed(ref_1d + smp_1d, 6, rng)
    ref, smp = both[:10], both[10:]
    radii = np.array([3, 2, 2, 2, 2, 2, 2, 2, 2, 3.0])
    np.testing.assert_allclose(M.manifold_radii(ref, k=3), radii**2, rtol=1e-4)  # squared, as ADM
    p, r = M.precision_recall(ref, smp, k=3)
    assert (p, r) == (pytest.approx(0.5), pytest.approx(0.7))
    assert M.precision_recall(smp, ref, k=3) == (pytest.approx(0.7), pytest.approx(0.5))
    assert M.precision_recall(ref, ref, k=3) == (1.0, 1.0)
    assert M.precision_recall(ref, smp[4:], k=3) == (0.0, 0.0)
    with pytest.raises(SraError, match="at least 4"):
        M.precision_recall(ref, smp[:3], k=3)


def test_precision_recall_blocked_equals_brute_force():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((120, 16)).astype(np.float32)
    smp = (rng.standard_normal((90, 16)) * 1.3 + 0.4).astype(np.float32)

    def brute(a, b, k):
        d_aa = ((a[:, None] - a[None]) ** 2).sum(-1)
        d_bb = ((b[:, None] - b[None]) ** 2).sum(-1)
        ra, rb = np.sort(d_aa, 1)[:, k], np.sort(d_bb, 1)[:, k]
        d_ab = ((a[:, None] - b[None]) ** 2).sum(-1)  # (A, B)
        return (d_ab <= ra[:, None]).any(0).mean(), (d_ab <= rb[None]).any(1).mean(), ra

    p_ref, r_ref, radii = brute(ref, smp, 3)
    np.testing.assert_allclose(M.manifold_radii(ref, 3, block=7), radii, rtol=1e-4)
    for block in (7, 64, 4096):
        p, r = M.precision_recall(ref, smp, 3, block=block)
        assert (p, r) == (pytest.approx(p_ref), pytest.approx(r_ref))
    assert 0 < p_ref < 1 and 0 < r_ref < 1  # the case is not degenerate


# ----------------------------------------------------------------------------- sFID layout


def test_spatial_features_are_channels_last_first_seven():
    n, c = 2, 192
    x = torch.arange(n * c * 17 * 17, dtype=torch.float32).reshape(n, c, 17, 17)  # NCHW, like torch
    v = spatial_features(x)
    assert v.shape == (n, SPATIAL_DIM) == (n, 2023)
    # ADM: spatial[..., :7] of the NHWC tensor, flattened → (h, w, c) order
    adm = x.numpy().transpose(0, 2, 3, 1)[..., :7].reshape(n, -1)
    np.testing.assert_array_equal(v.numpy(), adm)
    assert torch.equal(v[0, :7], x[0, :7, 0, 0])  # first entries: channels 0..6 of pixel (0, 0)
    # the traps: NCHW [..., :7] slices the *width* axis; NCHW [:, :7] flattens in (c, h, w) order
    assert x[..., :7].reshape(n, -1).shape[1] == c * 17 * 7 != SPATIAL_DIM
    wrong = x[:, :7].reshape(n, -1)
    assert wrong.shape == v.shape and not torch.equal(wrong, v)


def test_spatial_layout_matters_against_reference_statistics():
    # Channel c has mean c; the reference mean (computed the ADM way) is then (0..6) tiled per
    # pixel. The NCHW-flattened vector has the same numbers in another order → its mean is far
    # from the reference, so sFID against published mu_s would be nonsense.
    rng = np.random.default_rng(6)
    acts = torch.from_numpy(rng.standard_normal((64, 192, 17, 17)).astype(np.float32) * 0.1)
    acts += torch.arange(192, dtype=torch.float32)[None, :, None, None]
    mu_ref = acts.numpy().transpose(0, 2, 3, 1)[..., :7].reshape(64, -1).mean(0)
    mu_right = spatial_features(acts).numpy().mean(0)
    mu_wrong = acts[:, :7].reshape(64, -1).numpy().mean(0)
    assert np.sum((mu_right - mu_ref) ** 2) < 1e-10
    assert np.sum((mu_wrong - mu_ref) ** 2) > 1000


# ----------------------------------------------------------------------------- Inception (random weights)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The random Inception is the slow part here; on a busy 2-core box one thread is ~5× faster
    than two spinning ones. Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> str:
    return str(save_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth", seed=0))


@pytest.fixture(scope="module")
def inception(inception_weights) -> InceptionFeatures:
    return InceptionFeatures(inception_weights, device="cpu")


def test_inception_features_shapes_hook_and_resize(inception):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    rng = np.random.default_rng(8)
    x = torch.from_numpy(_images(rng, 2, 24)).permute(0, 3, 1, 2)
    out = inception(x)
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["spatial"].shape == (2, 2023)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert (out["pool"][0] - out["pool"][1]).abs().max() > 0  # different images → different features
    # The hook catches mixed_6/conv = Mixed_6d.branch1x1 after its BN+ReLU: recompute it by hand.
    net = inception.net
    with torch.no_grad():
        h = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        h = (h - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                     "Mixed_6b", "Mixed_6c"):
            h = getattr(net, name)(h)
        m6 = net.Mixed_6d.branch1x1(h)  # (N, 192, 17, 17)
    assert m6.shape[1:] == (192, 17, 17)
    torch.testing.assert_close(out["spatial"], spatial_features(m6))
    assert (out["spatial"] >= 0).all()  # post-ReLU
    # native size in, the graph resizes: a flat colour gives the same features at 16 px and 299 px
    flat = inception(torch.full((1, 3, 16, 16), 77, dtype=torch.uint8))["pool"]
    torch.testing.assert_close(flat, inception(torch.full((1, 3, 299, 299), 77, dtype=torch.uint8))["pool"])
    with pytest.raises(SraError, match="uint8"):
        inception(x.float())


def test_inception_weights_errors_and_id(tmp_path, inception_weights):
    with pytest.raises(SraError, match="not found"):
        InceptionFeatures(tmp_path / "missing.pth", device="cpu")
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(SraError, match="not an Inception"):
        InceptionFeatures(bad, device="cpu")
    assert weights_id(inception_weights) == weights_id(inception_weights)
    assert weights_id(inception_weights) != weights_id(bad)
    assert weights_id("https://example.org/a.pth") != weights_id("https://example.org/b.pth")


# ----------------------------------------------------------------------------- npz format


def test_npz_streaming_reader_and_validation(tmp_path):
    rng = np.random.default_rng(9)
    imgs = _images(rng, 23, 8)
    for saver in (np.savez, np.savez_compressed):
        path = tmp_path / f"{saver.__name__}.npz"
        saver(path, arr_0=imgs, labels=np.arange(23))
        reader = A.NpzImages(path)
        assert len(reader) == 23 and reader.dtype == np.uint8
        batches = list(reader.batches(5))
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.concatenate(batches), imgs)
    gray = imgs[..., :1]
    np.testing.assert_array_equal(A.to_rgb_uint8(gray), np.repeat(gray, 3, -1))
    with pytest.raises(SraError, match="uint8"):
        A.to_rgb_uint8(imgs.astype(np.float32))
    with pytest.raises(SraError, match="uint8"):
        A.to_rgb_uint8(imgs.transpose(0, 3, 1, 2))  # NCHW is not the ADM layout
    np.savez(tmp_path / "nokey.npz", images=imgs)
    with pytest.raises(SraError, match="arr_0"):
        A.NpzImages(tmp_path / "nokey.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SraError, match="not an npz"):
        A.NpzImages(tmp_path / "junk.npz")


# ----------------------------------------------------------------------------- end to end


def _lowrank_sqrtm(p: np.ndarray) -> np.ndarray:
    """A stand-in for scipy's sqrtm, exact for the low-rank products of these tiny tests.

    A 2048² Schur sqrtm costs 10–30 s on a 2-core box; with n ≪ 2048 images Σ1Σ2 has rank < n, and
    with Q an orthonormal basis of its range (P = QQᵀP), the nonzero eigenvalues of P are those of
    QᵀPQ, so Q·sqrtm(QᵀPQ)·Qᵀ has the right trace (all the distance uses). The real sqrtm path is
    checked against closed forms above.
    """
    from scipy import linalg

    g = np.random.default_rng(0).standard_normal((p.shape[0], 32))
    q, _ = np.linalg.qr(p @ g)  # range(P) has dim < 32 here
    return q @ linalg.sqrtm(q.T @ p @ q) @ q.T


@pytest.fixture
def fast_sqrtm(monkeypatch):
    monkeypatch.setattr(M, "_sqrtm", _lowrank_sqrtm)


def _cfg(samples, ref, weights, **kw) -> E.EvalConfig:
    base = dict(samples=samples, ref=ref, inception_weights=weights, batch_size=4, device="cpu",
                is_split_size=3, pr_k=3, progress=False)
    base.update(kw)
    return E.EvalConfig(**base)


def test_evaluate_end_to_end_with_cache(tmp_path, inception_weights, monkeypatch, fast_sqrtm):
    rng = np.random.default_rng(10)
    ref_imgs = _images(rng, 6, 16, 0, 160)
    smp_imgs = _images(rng, 6, 16, 60, 256)
    ref, smp = tmp_path / "ref.npz", tmp_path / "samples.npz"
    np.savez(ref, arr_0=ref_imgs)
    np.savez(smp, arr_0=smp_imgs[..., :1])  # 1-channel samples are accepted (repeated to RGB)

    res = E.evaluate(_cfg(smp, ref, inception_weights))
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert np.isfinite(res[key]), key
    assert res["fid"] > 0 and res["sfid"] > 0 and res["inception_score"] >= 1.0
    assert res["num_samples"] == 6 and res["num_ref"] == 6 and res["ref_stats"] == "computed"
    saved = json.loads((tmp_path / "samples.metrics.json").read_text())
    assert saved["fid"] == res["fid"] and res["json"] == str(tmp_path / "samples.metrics.json")
    wid = weights_id(inception_weights)
    assert E.cache_path(smp, wid).is_file() and E.cache_path(ref, wid).is_file()
    cached = E.load_cached(smp, wid)
    assert cached["pool"].shape == (6, 2048) and cached["logits"].shape == (6, 1008)
    assert cached["mu_s"].shape == (2023,) and cached["sigma_s"].shape == (2023, 2023)
    # the numbers are the metrics of the cached activations
    assert res["inception_score"] == pytest.approx(M.inception_score(cached["logits"], 3))
    ref_pool = E.load_cached(ref, wid)["pool"]
    assert (res["precision"], res["recall"]) == M.precision_recall(ref_pool, cached["pool"], 3)

    # the second run is served from the caches: the network must not even be built
    def boom(*a, **k):
        raise AssertionError("Inception should not run when activations are cached")

    monkeypatch.setattr("sra.eval.inception.InceptionFeatures", boom)
    again = E.evaluate(_cfg(smp, ref, inception_weights, out=tmp_path / "again.json"))
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert again[key] == res[key]
    # a rewritten sample file invalidates its cache
    np.savez(smp, arr_0=ref_imgs)
    with pytest.raises(AssertionError, match="should not run"):
        E.evaluate(_cfg(smp, ref, inception_weights))


def test_evaluate_identical_sets_and_stored_reference_stats(tmp_path, inception_weights, fast_sqrtm):
    rng = np.random.default_rng(11)
    imgs = _images(rng, 6, 16)
    path = tmp_path / "same.npz"
    np.savez(path, arr_0=imgs)
    res = E.evaluate(_cfg(path, path, inception_weights, out=tmp_path / "m.json"))
    assert abs(res["fid"]) < 1e-3 and abs(res["sfid"]) < 1e-3
    assert res["precision"] == 1.0 and res["recall"] == 1.0
    acts = E.load_cached(path, weights_id(inception_weights))

    # Stored mu/sigma/mu_s/sigma_s win over the reference images (ADM behaviour): shift the stored
    # mean by 3 along one axis → FID = 9 exactly, whatever the 4 images there would give.
    shift = np.zeros(2048)
    shift[0] = 3.0
    ref = tmp_path / "ref_stored.npz"
    np.savez(ref, arr_0=_images(rng, 4, 16), mu=acts["mu"] + shift, sigma=acts["sigma"],
             mu_s=acts["mu_s"], sigma_s=acts["sigma_s"])
    res2 = E.evaluate(_cfg(path, ref, inception_weights, out=tmp_path / "m2.json"))
    assert res2["ref_stats"] == "stored" and res2["num_ref"] == 4
    assert res2["fid"] == pytest.approx(9.0, abs=1e-3) and abs(res2["sfid"]) < 1e-3
    # a stats-only reference still gives FID/sFID; P/R is skipped with a warning
    stats_only = tmp_path / "stats_only.npz"
    np.savez(stats_only, mu=acts["mu"], sigma=acts["sigma"], mu_s=acts["mu_s"], sigma_s=acts["sigma_s"])
    with pytest.warns(RuntimeWarning, match="precision/recall skipped"):
        res3 = E.evaluate(_cfg(path, stats_only, inception_weights, out=tmp_path / "m3.json"))
    assert abs(res3["fid"]) < 1e-3 and res3["precision"] is None and res3["num_ref"] is None
    # only one stored pair: that pair is used, the other comes from the images
    ref4 = tmp_path / "ref_mixed.npz"
    np.savez(ref4, arr_0=imgs, mu_s=acts["mu_s"] + 1.0, sigma_s=acts["sigma_s"])
    stats, source = E.reference_statistics(ref4, acts)
    assert source == "mixed" and stats["mu"] is acts["mu"]
    np.testing.assert_array_equal(stats["mu_s"], acts["mu_s"] + 1.0)
    np.savez(ref4, mu=acts["mu"], sigma=acts["sigma"])  # no images, no spatial statistics
    with pytest.raises(SraError, match="mu_s and sigma_s"):
        E.reference_statistics(ref4, None)


def test_cli_eval_table_and_errors(tmp_path, inception_weights, capsys, fast_sqrtm):
    rng = np.random.default_rng(12)
    np.savez(tmp_path / "s.npz", arr_0=_images(rng, 4, 16))
    np.savez(tmp_path / "r.npz", arr_0=_images(rng, 4, 16))
    code = cli_main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"),
                     "--inception-weights", inception_weights, "--device", "cpu", "--batch-size", "4",
                     "--is-split-size", "2", "--no-progress", "--no-cache", "--out", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert not list(tmp_path.glob("*.stats-*.npz"))  # --no-cache writes nothing
    for label in ("FID", "sFID", "Inception Score", "Precision", "Recall"):
        assert label in out
    assert json.loads((tmp_path / "out.json").read_text())["num_samples"] == 4

    assert cli_main(["eval", str(tmp_path / "s.npz")]) == 2
    assert "--ref" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "nope.npz")]) == 2
    err = capsys.readouterr().err
    assert "nope.npz" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"),
                     "--inception-weights", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err


# ----------------------------------------------------------------------------- digits metric


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """Train the digit classifier once for this module into its own cache folder.

    Nothing is shared with other modules, and SRA_CACHE_DIR is not left pointing here: a test that
    wants this cache through the default path sets the variable itself (conftest gives every test
    its own empty cache dir).
    """
    from sra.eval import digits as D

    cache = tmp_path_factory.mktemp("digits-cache")
    t0 = time.perf_counter()
    clf = D.load_digits_classifier(cache / D.CLASSIFIER_FILE)
    return {"dir": cache, "path": cache / D.CLASSIFIER_FILE, "clf": clf, "seconds": time.perf_counter() - t0}


def _use_cache(monkeypatch, digits_cache) -> None:
    """Point SRA_CACHE_DIR at the module's trained cache and forbid any retraining."""
    from sra.eval import digits as D

    monkeypatch.setenv(D.CACHE_ENV, str(digits_cache["dir"]))
    monkeypatch.setattr(D, "train_digits_classifier", lambda *a, **k: pytest.fail("retrained despite cache"))


def test_digits_classifier_trains_caches_and_reloads(digits_cache, monkeypatch):
    from sra.eval import digits as D

    clf = digits_cache["clf"]
    assert clf.test_acc > D.MIN_TEST_ACC
    path = digits_cache["path"]
    assert path.is_file() and not [f for f in digits_cache["dir"].iterdir() if f != path]  # no temp left
    _use_cache(monkeypatch, digits_cache)
    assert D.default_classifier_path() == path
    again = D.load_digits_classifier()
    assert again.test_acc == pytest.approx(clf.test_acc)
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(again(x), clf(x))
    torch.testing.assert_close(again.ref_sigma, clf.ref_sigma)


def test_digits_metrics_trains_under_no_grad_with_empty_cache(tmp_path, monkeypatch):
    """The first evaluation often runs inside no_grad/inference_mode: training must still work."""
    from sra.data.digits import load_digits_arrays
    from sra.eval import digits as D

    monkeypatch.setenv(D.CACHE_ENV, str(tmp_path))
    images, labels = load_digits_arrays()
    x, y = torch.from_numpy(images[:200]), torch.from_numpy(labels[:200])
    with torch.no_grad():
        first = D.digits_metrics(x, y)
    assert np.isfinite(first["fd"]) and np.isfinite(first["acc"]) and first["acc"] > 0.9
    assert [f.name for f in tmp_path.iterdir()] == [D.CLASSIFIER_FILE]  # cached, no temp file left
    assert torch.is_grad_enabled()  # the caller's grad mode is untouched afterwards

    monkeypatch.setattr(D, "train_digits_classifier", lambda *a, **k: pytest.fail("retrained despite cache"))
    with torch.inference_mode():
        again = D.digits_metrics(x, y)
    assert again == first


def test_corrupt_cached_classifier_is_retrained_with_a_warning(tmp_path, monkeypatch, digits_cache):
    from safetensors.torch import save_file

    from sra.eval import digits as D

    monkeypatch.setenv(D.CACHE_ENV, str(tmp_path))
    path = tmp_path / D.CLASSIFIER_FILE
    good = digits_cache["path"].read_bytes()
    calls = []

    def fake_train(*a, **k):  # the module's classifier stands in for a (slow) retraining
        calls.append(1)
        return digits_cache["clf"]

    monkeypatch.setattr(D, "train_digits_classifier", fake_train)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    for damaged in (np.random.default_rng(0).bytes(4096), good[: len(good) // 2], foreign.read_bytes()):
        path.write_bytes(damaged)
        with pytest.warns(RuntimeWarning, match="unusable.*retraining"):
            D.digits_metrics(x)
        reread = D.load_digits_classifier(train_if_missing=False)  # overwritten by the retrained one
        torch.testing.assert_close(reread.ref_sigma, digits_cache["clf"].ref_sigma)
        assert sorted(f.name for f in tmp_path.iterdir()) == sorted([D.CLASSIFIER_FILE, foreign.name])
    assert len(calls) == 3
    # without permission to train, a damaged cache is one SraError line naming the file
    path.write_bytes(b"garbage")
    with pytest.raises(SraError, match=f"{path.name} is not a digit classifier") as err:
        D.load_digits_classifier(train_if_missing=False)
    assert "\n" not in str(err.value)


def test_digits_metrics_separate_real_from_noise(digits_cache):
    from sra.data.digits import load_digits_arrays
    from sra.eval.digits import digits_metrics

    clf = digits_cache["clf"]
    images, labels = load_digits_arrays()
    real = digits_metrics(torch.from_numpy(images), torch.from_numpy(labels), classifier=clf)
    assert real["n"] == 1797 and abs(real["fd"]) < 1e-4 and real["acc"] > 0.98
    half = digits_metrics(torch.from_numpy(images[::2]), None, classifier=clf)
    assert half["acc"] is None
    gen = torch.Generator().manual_seed(0)
    noise = digits_metrics(torch.rand(500, 1, 16, 16, generator=gen) * 2 - 1,
                           torch.randint(0, 10, (500,), generator=gen), classifier=clf)
    assert noise["fd"] > 20 * half["fd"] > 0
    assert noise["acc"] < 0.4
    wrong = digits_metrics(torch.from_numpy(images), torch.from_numpy((labels + 1) % 10), classifier=clf)
    assert wrong["acc"] < 0.05
    with pytest.raises(SraError, match="labels"):
        digits_metrics(torch.from_numpy(images[:10]), torch.from_numpy(labels[:9]), classifier=clf)


def test_digits_accepts_npz_layouts_and_cli(digits_cache, tmp_path, capsys, monkeypatch):
    from sra.data.digits import load_digits_arrays
    from sra.eval.digits import digits_metrics

    clf = digits_cache["clf"]
    images, labels = load_digits_arrays()
    images, labels = images[:300], labels[:300]
    u8 = np.round((images + 1) * 127.5).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (N,16,16,1)
    ref = digits_metrics(torch.from_numpy(images), labels, classifier=clf)
    for arr in (u8, np.repeat(u8, 3, -1)):
        got = digits_metrics(arr, labels, classifier=clf)
        assert got["fd"] == pytest.approx(ref["fd"], rel=1e-6, abs=1e-8) and got["acc"] == ref["acc"]

    np.savez(tmp_path / "digits.npz", arr_0=np.repeat(u8, 3, -1), labels=labels)
    _use_cache(monkeypatch, digits_cache)  # the CLI reads the classifier from the default path
    assert cli_main(["eval", "--digits", str(tmp_path / "digits.npz"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Digits FD" in out and "Digits class acc." in out
    saved = json.loads((tmp_path / "digits.metrics.json").read_text())
    assert saved["digits_fd"] == pytest.approx(ref["fd"], rel=1e-6, abs=1e-8)
    assert saved["digits_acc"] == ref["acc"] and saved["classifier_test_acc"] > 0.95

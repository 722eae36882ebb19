"""`sra eval` inputs: Inception weights are read as tensors only (never unpickled code), every bad
input is one error line naming the file, npz files are validated before any weights are touched,
and ``python -m sra`` behaves like ``sra``."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sra import artefacts as A

from sra.cli import main as cli_main
from sra.errors import SraError
from sra.eval import inception as I

BAD_URL = "http://127.0.0.1:9/x.pth"  # the discard port: refused at once, never downloads
_REAL_DOWNLOAD = A._download


class _Payload:
    """Unpickling this runs code: it creates ``marker`` (what a crafted weights file would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _npz_pair(tmp_path, n: int = 4) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    s, r = tmp_path / "s.npz", tmp_path / "r.npz"
    np.savez(s, arr_0=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8))
    np.savez(r, arr_0=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8))
    return str(s), str(r)


def _eval(capsys, *argv: str) -> tuple[int, str]:
    """Run ``sra eval ARGV`` in-process; return the exit code and stderr (stdout discarded)."""
    code = cli_main(["eval", *argv, "--no-progress", "--no-cache", "--device", "cpu"])
    return code, capsys.readouterr().err


def _assert_one_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sra eval: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    assert "weights_only" not in err and "Traceback" not in err


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """Nothing here may download: the download cache is empty and the downloader fails loudly."""
    monkeypatch.setenv("SRA_CACHE_DIR", str(tmp_path / "sra-cache"))

    def refuse(url, *a, **k):
        raise ConnectionRefusedError(f"test: no network ({url})")

    monkeypatch.setattr(A, "_download", refuse)


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    """The expected key → tensor layout (fresh modules, never read from a file)."""
    return I._bare_inception().state_dict()


# ----------------------------------------------------------------------------- safe weights loading


def test_weights_load_as_tensors_from_pth_and_safetensors(tmp_path, inception_state):
    from safetensors.torch import save_file

    pth = I.save_random_inception_weights(tmp_path / "w.pth", seed=1)
    sd = torch.load(pth, map_location="cpu", weights_only=True)
    assert sd.keys() == inception_state.keys()
    st = tmp_path / "w.safetensors"
    save_file(sd, str(st))
    for path in (pth, st):
        net = I.InceptionFeatures(path, device="cpu").net
        for k, v in net.state_dict().items():
            assert torch.equal(v, sd[k]), (path, k)
    assert I.weights_id(pth) != I.weights_id(st)


def test_crafted_pickle_in_weights_never_runs(tmp_path, capsys):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": _Payload(str(marker))}, evil)
    # control: the payload is live, an unsafe load (torch-fidelity's own loader) would run it
    torch.save({"fc.weight": _Payload(str(control))}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert control.exists()

    with pytest.raises(SraError, match="pickled objects other than tensors") as err:
        I.InceptionFeatures(evil, device="cpu")
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    s, r = _npz_pair(tmp_path)
    code, stderr = _eval(capsys, s, "--ref", r, "--inception-weights", str(evil))
    assert code == 2
    _assert_one_line(stderr, "evil.pth", "refusing")
    assert not marker.exists()


def _truncated(path, data: bytes) -> None:
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", ["missing", "truncated-pth", "random-pth", "truncated-safetensors",
                                  "random-safetensors", "wrong-keys", "wrong-shapes", "not-a-dict"])
def test_bad_weights_are_one_line_naming_the_file(tmp_path, capsys, inception_state, case):
    from safetensors.torch import save_file

    rng = np.random.default_rng(1)
    small = {"a": torch.arange(4096, dtype=torch.float32)}
    path = tmp_path / f"{case}.{'safetensors' if 'safetensors' in case else 'pth'}"
    if case == "truncated-pth":
        torch.save(small, path)
        _truncated(path, path.read_bytes())
    elif case == "random-pth":
        path.write_bytes(b"\x00" + rng.bytes(2047))
    elif case == "truncated-safetensors":
        save_file(small, str(path))
        _truncated(path, path.read_bytes())
    elif case == "random-safetensors":
        path.write_bytes(rng.bytes(2048))
    elif case == "wrong-keys":
        torch.save({"foo.weight": torch.zeros(1)}, path)
    elif case == "wrong-shapes":  # the right names, tiny tensors
        torch.save({k: torch.zeros(1) for k in inception_state}, path)
    elif case == "not-a-dict":
        torch.save([torch.zeros(1)], path)
    expected = {"missing": "not found", "wrong-keys": "missing keys", "wrong-shapes": "shape mismatches",
                "not-a-dict": "not a state dict", "truncated-safetensors": "safetensors",
                "random-safetensors": "safetensors", "random-pth": "not a torch",
                "truncated-pth": "not a readable torch state dict"}[case]
    with pytest.raises(SraError, match=expected) as err:
        I.InceptionFeatures(path, device="cpu")
    assert path.name in str(err.value) and "\n" not in str(err.value)
    s, r = _npz_pair(tmp_path)
    code, stderr = _eval(capsys, s, "--ref", r, "--inception-weights", str(path))
    assert code == 2
    _assert_one_line(stderr, path.name, expected)


def test_default_url_path_goes_through_the_safe_loader(tmp_path, monkeypatch, capsys):
    """A downloaded file lands in the download cache and is then read like a local one."""
    def fake_download(url, dst, *a, **k):
        torch.save({"fc.weight": _Payload(str(tmp_path / "pwned"))}, dst)

    monkeypatch.setattr(A, "_download", fake_download)
    url = "https://example.invalid/weights-evil.pth"
    with pytest.raises(SraError, match="weights-evil.pth.*refusing"):
        I.InceptionFeatures(url, device="cpu")
    assert A.cache_path(url).is_file()
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- validate npz first


def _bad_npz(path, case: str) -> None:
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    if case == "float":
        np.savez(path, arr_0=imgs.astype(np.float32))
    elif case == "nchw":
        np.savez(path, arr_0=imgs.transpose(0, 3, 1, 2))
    elif case == "3d":
        np.savez(path, arr_0=imgs[..., 0])
    elif case == "one-image":
        np.savez(path, arr_0=imgs[:1])
    elif case == "no-arr_0":
        np.savez(path, images=imgs)
    elif case == "not-npz":
        path.write_bytes(b"not a zip at all")
    elif case == "truncated":
        np.savez(path, arr_0=imgs)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", ["float", "nchw", "3d", "one-image", "no-arr_0", "not-npz", "truncated"])
@pytest.mark.parametrize("which", ["samples", "ref"])
def test_bad_npz_is_reported_before_any_weights(tmp_path, capsys, monkeypatch, case, which):
    monkeypatch.setattr(I, "build_inception", lambda *a, **k: pytest.fail("Inception built before validation"))
    s, r = _npz_pair(tmp_path)
    bad = tmp_path / "bad.npz"
    _bad_npz(bad, case)
    argv = (str(bad), "--ref", r) if which == "samples" else (s, "--ref", str(bad))
    code, err = _eval(capsys, *argv, "--inception-weights", BAD_URL)
    assert code == 2
    _assert_one_line(err, "bad.npz")
    assert "download" not in err
    # with a local weights file that does not exist either, the npz still comes first
    code, err = _eval(capsys, *argv, "--inception-weights", str(tmp_path / "none.pth"))
    _assert_one_line(err, "bad.npz")


def test_bad_reference_statistics_are_reported_before_any_weights(tmp_path, capsys):
    s, _ = _npz_pair(tmp_path)
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(3), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    code, err = _eval(capsys, s, "--ref", str(ref), "--inception-weights", BAD_URL)
    assert code == 2
    _assert_one_line(err, "ref.npz", "'sigma'", "(2048, 2048)")
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))  # no images and no spatial pair
    code, err = _eval(capsys, s, "--ref", str(ref), "--inception-weights", BAD_URL)
    _assert_one_line(err, "ref.npz", "mu_s and sigma_s")


def test_valid_npz_then_reaches_the_download(tmp_path, capsys, monkeypatch):
    """Control for the tests above: with good npz files the same URL is what fails, in one line."""
    monkeypatch.setattr(A, "_download", _REAL_DOWNLOAD)  # against a refused port
    s, r = _npz_pair(tmp_path)
    code, err = _eval(capsys, s, "--ref", r, "--inception-weights", BAD_URL)
    assert code == 2
    _assert_one_line(err, "download failed", BAD_URL)


# ----------------------------------------------------------------------------- --digits inputs


@pytest.mark.parametrize("case", ["4-channels", "2d", "one-image", "labels-count", "labels-range",
                                  "nan", "int64-images", "missing", "not-npz"])
def test_digits_bad_npz_is_one_line_before_the_classifier(tmp_path, capsys, monkeypatch, case):
    from sra.eval import digits as D

    monkeypatch.setattr(D, "train_digits_classifier", lambda *a, **k: pytest.fail("classifier trained"))
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)
    labels = np.arange(6)
    path = tmp_path / "digits.npz"
    arrays = {
        "4-channels": dict(arr_0=np.repeat(u8, 4, -1)),
        "2d": dict(arr_0=u8.reshape(6, -1)),
        "one-image": dict(arr_0=u8[:1]),
        "labels-count": dict(arr_0=u8, labels=labels[:5]),
        "labels-range": dict(arr_0=u8, labels=labels + 5),
        "nan": dict(arr_0=np.full((6, 16, 16, 1), np.nan, dtype=np.float32)),
        "int64-images": dict(arr_0=u8.astype(np.int64)),
    }.get(case)
    if arrays is not None:
        np.savez(path, **arrays)
    elif case == "not-npz":
        path.write_bytes(b"junk")
    code = cli_main(["eval", "--digits", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    _assert_one_line(err, "digits.npz")


# ----------------------------------------------------------------------------- python -m sra


def _python_m(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", SRA_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "sra", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_python_m_sra_works_like_the_console_script(tmp_path):
    ok = _python_m(tmp_path, "models", "--filter", "SiT-S/2")
    assert ok.returncode == 0, ok.stderr
    assert "SiT-S/2" in ok.stdout
    bad = _python_m(tmp_path, "eval", str(tmp_path / "nonexistent.npz"), "--digits")
    assert bad.returncode == 2
    missing = tmp_path / "nonexistent.npz"
    assert bad.stderr.strip().splitlines() == [f"sra eval: error: samples npz not found: {missing}"]

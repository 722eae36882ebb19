"""Writes the OS refuses — a full disk, a read-only file system — end in one line
``sra CMD: error: cannot write PATH: REASON (N bytes free on that disk)``, with no temporary
file left and every file finished before untouched; a checkpoint refused for lack of space
resumes exactly once space is freed.

The disk is a real tmpfs (mounted as root, filled by a file, remounted read-only). Where the
test may not mount one, the same errors the OS and the libraries raise are injected instead
(the fixture says why in a warning).
"""

from __future__ import annotations

import builtins
import errno
import functools
import hashlib
import http.server
import io
import logging
import os
import re
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import safetensors.torch
from sra import runlock
from sra.cli import main
from sra.models import ModelConfig, build_model
from sra.oserrors import SHORT_WRITE_REASON, LogFileHandler, WriteError
from sra.training import checkpoint as ckpt_mod

TINY = ["--depth", "4", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "4",
        "--block-out-s", "1", "--block-out-t", "3", "--batch-size", "32", "--report-to", "none",
        "--sample-steps", "0", "--grid-samples", "0", "--eval-samples", "0", "--log-every", "2",
        "--checkpoint-steps", "2"]
FULL, READ_ONLY = os.strerror(errno.ENOSPC), os.strerror(errno.EROFS)
FILLER = ".filler"
_PROGRESS = re.compile(r"^[\w ]+: +\d+%\|")  # a tqdm bar
_LEFTOVER = re.compile(r"(\.tmp|\.partial|\.part)$|^\.tmp-|^\.export-")


# -- a disk that can be filled or made read-only ------------------------------------------------
def _mount(root: Path) -> str | None:
    """Mount a 16 MB tmpfs at ``root``; None on success, else why not."""
    if os.environ.get("SRA_TEST_INJECT_WRITE_ERRORS"):  # to check the fallback where mounting works
        return "SRA_TEST_INJECT_WRITE_ERRORS is set"
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "not root or no mount(8)"
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root)],
                         capture_output=True, text=True)
    return None if res.returncode == 0 else (res.stderr.strip() or f"mount exit {res.returncode}")


def _under(path, root: Path) -> bool:
    try:
        return isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).is_relative_to(root)
    except (TypeError, ValueError):
        return False


class Disk:
    """``root``: a real tmpfs (``real``), or a folder whose writes are refused by injection."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root, self.mp = root, monkeypatch
        self.why_not = _mount(root)
        self.real = self.why_not is None
        self.injected: int | None = None  # the errno injected writes fail with
        if not self.real:
            warnings.warn(f"no tmpfs ({self.why_not}): the OS's write errors are injected")
            self._install()

    # real disk ---------------------------------------------------------------------------------
    def fill(self) -> None:
        """No byte left."""
        if not self.real:
            self.injected = errno.ENOSPC
            return
        fd = os.open(self.root / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for chunk in (1 << 20, 4096, 1):
                try:
                    while os.write(fd, b"\0" * chunk):
                        pass
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def read_only(self) -> None:
        if not self.real:
            self.injected = errno.EROFS
            return
        self._close_open_files()
        subprocess.run(["mount", "-o", "remount,ro", str(self.root)], check=True)

    def restore(self) -> None:
        """Space and write access back."""
        if not self.real:
            self.injected = None
            return
        subprocess.run(["mount", "-o", "remount,rw", str(self.root)], check=True)
        (self.root / FILLER).unlink(missing_ok=True)

    def _close_open_files(self) -> None:
        """Locks and log files this process keeps open there (a remount or unmount needs none)."""
        runlock.release_all()
        for logger in (logging.getLogger("sra"), logging.getLogger()):
            for h in list(logger.handlers):
                if isinstance(h, logging.FileHandler) and _under(h.baseFilename, self.root):
                    logger.removeHandler(h)
                    h.close()

    def teardown(self) -> None:
        self._close_open_files()
        if self.real and subprocess.run(["umount", str(self.root)]).returncode:
            subprocess.run(["umount", "-l", str(self.root)])

    # injection -------------------------------------------------------------------------------
    def _refuse(self, path) -> None:
        if self.injected is not None and _under(path, self.root):
            raise OSError(self.injected, os.strerror(self.injected), os.fspath(path))

    def refusing(self, f):
        """``f`` (a file opened before the disk filled), failing its writes as the OS would;
        injection cannot reach files opened earlier otherwise."""
        return f if self.real else _RefusingFile(f, self)

    def _install(self) -> None:
        """Refuse writes under ``root`` as the OS and the libraries do, while ``injected``."""
        real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
        real_torch_save, real_save_file = torch.save, safetensors.torch.save_file
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

        def open_(file, mode="r", *a, **kw):
            if isinstance(mode, str) and set(mode) & set("wax+"):
                self._refuse(file)
            return real_open(file, mode, *a, **kw)

        def os_open(path, flags, *a, **kw):
            if flags & writes:
                self._refuse(path)
            return real_os_open(path, flags, *a, **kw)

        def mkdir(path, *a, **kw):
            # a full disk still makes folders (no data blocks); the OS says EEXIST first
            if self.injected == errno.EROFS and not os.path.exists(path):
                self._refuse(path)
            return real_mkdir(path, *a, **kw)

        def torch_save(obj, f, *a, **kw):
            if self.injected is not None and _under(f, self.root):
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
                                   if self.injected == errno.ENOSPC else
                                   f"[enforce fail at inline_container.cc:747] . open file failed "
                                   f"with strerror: {os.strerror(self.injected)}")
            return real_torch_save(obj, f, *a, **kw)

        def save_file_(tensors, filename, *a, **kw):
            if self.injected is not None and _under(filename, self.root):
                raise SafetensorError(f"Error while serializing: I/O error: "
                                      f"{os.strerror(self.injected)} (os error {self.injected})")
            return real_save_file(tensors, filename, *a, **kw)

        for target, name, fake in [(builtins, "open", open_), (io, "open", open_), (os, "open", os_open),
                                   (os, "mkdir", mkdir), (torch, "save", torch_save),
                                   (safetensors.torch, "save_file", save_file_),
                                   (ckpt_mod, "save_file", save_file_)]:
            self.mp.setattr(target, name, fake)
        from sra.checkpoints import export
        self.mp.setattr(export, "save_file", save_file_)


class _RefusingFile:
    def __init__(self, f, disk: Disk):
        self._f, self._disk = f, disk

    def write(self, data):
        self._disk._refuse(self._f.name)
        return self._f.write(data)

    def flush(self):
        self._disk._refuse(self._f.name)
        return self._f.flush()

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    root = tmp_path / "disk"
    root.mkdir()
    d = Disk(root, monkeypatch)
    yield d
    d.teardown()


def one_error(capsys, command: str, path, reason: str, allow_warnings: bool = False) -> str:
    """The one stderr line, as the issue words it (warnings: ``sra: WARNING`` lines besides)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err, err
    # what is left of each line once progress bars (rewritten in place with \r) are dropped
    lines = [seg for line in err.split("\n") for seg in line.split("\r")
             if seg.strip() and not _PROGRESS.match(seg)]
    if allow_warnings:
        lines = [l for l in lines if not l.lower().startswith("sra: warning")]
    want = rf"sra {command}: error: cannot write {re.escape(str(path))}: {reason} \(\d+ bytes free on that disk\)"
    assert len(lines) == 1 and re.fullmatch(want, lines[0]), err
    return lines[0]


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if _LEFTOVER.search(p.name) and p.name != FILLER)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != FILLER}


# -- training -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at 2 and 4) on an ordinary disk."""
    out = tmp_path_factory.mktemp("ref")
    assert main(["train", *TINY, "--max-train-steps", "4", "--output-dir", str(out),
                 "--exp-name", "ref"]) == 0
    return out / "ref"


def test_full_disk_at_a_checkpoint_then_resume_is_exact(disk, ref_run, monkeypatch, capsys):
    run = disk.root / "cut"
    args = ["train", *TINY, "--max-train-steps", "4", "--output-dir", str(disk.root), "--exp-name", "cut"]
    before = {}
    real_write = ckpt_mod.write_checkpoint_files

    def write_then_fill(tmp_dir, **kw):
        if kw["meta"]["step"] == 4:  # step 2 is written; the disk fills while step 4 is
            before.update(snapshot(run / "checkpoints" / "step-0000002"))
            disk.fill()
        return real_write(tmp_dir, **kw)

    monkeypatch.setattr(ckpt_mod, "write_checkpoint_files", write_then_fill)
    assert main(args) == 2
    one_error(capsys, "train", run / "checkpoints" / "step-0000004", FULL)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]  # no .tmp-step-*
    assert snapshot(run / "checkpoints" / "step-0000002") == before and before  # as it was
    assert leftovers(disk.root) == []

    disk.restore()
    monkeypatch.setattr(ckpt_mod, "write_checkpoint_files", real_write)
    assert main(args + ["--resume", "auto"]) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(ref_run / "checkpoints" / "step-0000004" / name)
        b = load_file(run / "checkpoints" / "step-0000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def checkpoint_on_two_processes(rank: int, tmp: str) -> list[str | None]:
    """(gloo worker) Checkpoint steps 1, 2, 3 of a tiny model; at step 2 rank 1's RNG file and
    at step 3 the main process's weights meet a full disk. What each step raised, per step."""
    import torch.nn as nn
    from accelerate import Accelerator

    acc, run = Accelerator(cpu=True), Path(tmp) / "run"
    model = nn.Linear(2, 2)
    ema = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    real_save, real_save_file = torch.save, ckpt_mod.save_file

    def torch_save(obj, f, *a, **kw):
        if step == 2 and Path(f).name == "rng-1.pt":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 12")
        return real_save(obj, f, *a, **kw)

    def save_file(tensors, f, *a, **kw):
        if step == 3:
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")
        return real_save_file(tensors, f, *a, **kw)

    torch.save, ckpt_mod.save_file = torch_save, save_file
    said = []
    for step in (1, 2, 3):
        try:
            ckpt_mod.save_checkpoint(acc, run, step, model, ema, opt, {"step": step, "data": {}},
                                     keep_last=5, milestone_every=0)
            said.append(None)
        except Exception as exc:
            said.append(f"{type(exc).__name__}: {exc}")
    return said


def test_a_refused_checkpoint_write_on_one_process_stops_every_process(tmp_path):
    from gloo import run_processes

    results = run_processes(checkpoint_on_two_processes, str(tmp_path), out=tmp_path / "res")
    step2 = tmp_path / "run" / "checkpoints" / "step-0000002"
    step3 = tmp_path / "run" / "checkpoints" / "step-0000003"
    free = r"\(\d+ bytes free on that disk\)"
    r0, r1 = results
    assert r0[0] is None and r1[0] is None  # step 1 written
    assert re.fullmatch(rf"WriteError: cannot write {re.escape(str(step2))}: {SHORT_WRITE_REASON} {free}", r1[1])
    assert r0[1] == f"SraError: process 1: {r1[1][len('WriteError: '):]}"  # nobody waits forever
    assert re.fullmatch(rf"WriteError: cannot write {re.escape(str(step3))}: {FULL} {free}", r0[2])
    assert r1[2] == f"SraError: process 0: {r0[2][len('WriteError: '):]}"
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000001"]


@pytest.mark.parametrize("refusal", ["read-only", "full"])
def test_run_dir_set_up_is_refused_in_one_line_and_leaves_nothing(disk, monkeypatch, capsys, refusal):
    args = ["train", *TINY, "--max-train-steps", "2", "--output-dir", str(disk.root)]
    if refusal == "read-only":  # the lock file is the first thing a run writes
        disk.read_only()
        assert main(args) == 2
        one_error(capsys, "train", disk.root / "digits-sra" / runlock.LOCK_NAME, READ_ONLY)
    else:  # the lock is taken, then the disk is full when config.json is written
        from sra.training import loop

        real_hold = loop.hold
        monkeypatch.setattr(loop, "hold", lambda *a, **kw: (real_hold(*a, **kw), disk.fill()))
        assert main(args) == 2
        one_error(capsys, "train", disk.root / "digits-sra" / "config.json", FULL)
    assert [p.name for p in disk.root.iterdir() if p.name != FILLER] == []  # the run dir went


def test_log_file_and_metrics_on_a_full_disk(disk, capsys):
    from types import SimpleNamespace

    from sra.training.bookkeeping import append_record

    log = logging.getLogger("sra.test-write-faults")
    handler = LogFileHandler(disk.root / "log.txt")
    log.addHandler(handler)
    metrics = disk.root / "metrics.jsonl"
    acc = SimpleNamespace(is_main_process=True, log=lambda *a, **kw: None)
    try:
        log.warning("first record")
        append_record(acc, metrics, {"step": 1, "loss": 0.5})
        handler.stream = disk.refusing(handler.stream)
        disk.fill()
        for i in range(3):
            log.warning("record %d after the disk filled %s", i, "x" * 8192)
        err = capsys.readouterr().err
        assert "Traceback" not in err and "Logging error" not in err, err
        warn = [l for l in err.splitlines() if l.strip()]
        assert len(warn) == 1 and warn[0].startswith(f"sra: WARNING: cannot write {disk.root / 'log.txt'}: "
                                                     f"{FULL} ("), err
        with pytest.raises(WriteError, match=rf"cannot write {re.escape(str(metrics))}: {FULL} \("):
            append_record(acc, metrics, {"step": 2, "loss": 0.4, "pad": "x" * 8192})
    finally:
        log.removeHandler(handler)
        handler.close()
    disk.restore()
    assert (disk.root / "log.txt").read_text().splitlines()[0] == "first record"
    assert metrics.read_text().splitlines()[0] == '{"step": 1, "loss": 0.5}'


def test_a_torch_short_write_names_the_file(tmp_path):
    from sra.oserrors import writing

    with pytest.raises(WriteError) as info:
        with writing(tmp_path / "optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert str(info.value).startswith(f"cannot write {tmp_path / 'optimizer.pt'}: {SHORT_WRITE_REASON} (")
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors pass unchanged
        with writing(tmp_path / "x"):
            raise RuntimeError("unrelated")


# -- export -------------------------------------------------------------------------------------
def test_export_on_a_full_or_read_only_disk_keeps_the_previous_export(disk, ref_run, capsys):
    out = disk.root / "export"
    assert main(["export", str(ref_run), "--out", str(out)]) == 0
    capsys.readouterr()
    before = snapshot(out)
    disk.fill()
    assert main(["export", str(ref_run), "--out", str(out)]) == 2
    one_error(capsys, "export", out / "model.safetensors", FULL)
    assert snapshot(out) == before and leftovers(disk.root) == []
    disk.restore()
    disk.read_only()
    assert main(["export", str(ref_run), "--out", str(disk.root / "new")]) == 2
    one_error(capsys, "export", disk.root / "new", READ_ONLY)


# -- sampling -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory):
    cfg = ModelConfig(family="SiT", depth=2, hidden_size=32, num_heads=4, patch_size=2,
                      input_size=16, in_channels=1, num_classes=10)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # not adaLN-zero: outputs depend on the input
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def ref_samples(pixel_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref-samples")
    assert main(sample_argv(pixel_ckpt, out)) == 0
    return out / "samples.npz"


def sample_argv(ckpt, out):
    return ["sample", "--ckpt", str(ckpt), "--data-kind", "pixels", "--output-dir", str(out),
            "--no-progress", "--num-samples", "8", "--per-proc-batch-size", "4", "--mode", "euler",
            "--num-steps", "2", "--format", "both"]


@pytest.mark.parametrize("where", ["png", "shard", "npz"])
def test_sample_on_a_full_disk_keeps_finished_batches_and_resumes(disk, pixel_ckpt, ref_samples,
                                                                  monkeypatch, capsys, where):
    from sra.sampling import outputs as O

    out = disk.root / "s"
    before = {}
    def fill_before(real, when):
        def wrapped(path, *a, **kw):
            if when(path):
                before.update(snapshot(out))
                disk.fill()
            return real(path, *a, **kw)
        return wrapped

    names = {"png": ("write_png", O.png_path(out, 4)), "shard": ("write_shard", O.shard_path(out, 1)),
             "npz": ("write_adm_npz", out / O.NPZ_NAME)}
    name, at = names[where]
    real = getattr(O, name)
    monkeypatch.setattr(O, name, fill_before(real, lambda p: Path(p) == at))
    assert main(sample_argv(pixel_ckpt, out)) == 2
    one_error(capsys, "sample", at, FULL)
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before  # finished files untouched
    assert leftovers(disk.root) == [] and not at.exists()

    disk.restore()
    monkeypatch.setattr(O, name, real)
    assert main(sample_argv(pixel_ckpt, out)) == 0
    with np.load(out / O.NPZ_NAME) as a, np.load(ref_samples) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


def test_sample_into_a_read_only_dir(disk, pixel_ckpt, capsys):
    disk.read_only()
    assert main(sample_argv(pixel_ckpt, disk.root / "s")) == 2
    one_error(capsys, "sample", disk.root / "s" / runlock.LOCK_NAME, READ_ONLY)


# -- preprocessing ------------------------------------------------------------------------------
def _images(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    (root / "cls").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "cls" / f"{i}.png")
    return root


def _preprocess(src, dest):
    return ["preprocess", "images", "--source", str(src), "--dest", str(dest), "--resolution", "16",
            "--workers", "1", "--no-progress"]


def test_preprocess_images_on_a_full_disk_keeps_finished_images(disk, tmp_path, monkeypatch, capsys):
    from sra.data import images
    from sra.data.formats import image_name

    src, dest = _images(tmp_path / "raw"), disk.root / "imgs"
    real_write, calls = images._DirSink.write, []

    def write_then_fill(self, name, data):
        calls.append(name)
        if len(calls) == 2:  # the first image is finished, the second finds the disk full
            disk.fill()
        return real_write(self, name, data)

    monkeypatch.setattr(images._DirSink, "write", write_then_fill)
    assert main(_preprocess(src, dest)) == 2
    one_error(capsys, "preprocess", dest / image_name(1), FULL, allow_warnings=True)
    assert leftovers(disk.root) == [] and not (dest / image_name(1)).exists()
    first = (dest / image_name(0)).read_bytes()
    disk.restore()
    monkeypatch.setattr(images._DirSink, "write", real_write)
    assert main(_preprocess(src, dest)) == 0  # resumes with its finished image, as it was
    assert (dest / image_name(0)).read_bytes() == first and (dest / image_name(2)).is_file()


def test_preprocess_images_to_a_zip_on_a_full_disk(disk, tmp_path, capsys):
    dest = disk.root / "imgs.zip"
    disk.fill()
    assert main(_preprocess(_images(tmp_path / "raw"), dest)) == 2
    one_error(capsys, "preprocess", dest, FULL, allow_warnings=True)
    assert leftovers(disk.root) == [] and not dest.exists()  # a half ZIP would only take space


def test_packed_shard_writer_on_a_full_disk(disk):
    from sra.data.packed import ShardWriter

    path = disk.root / "shard-00000.npy"
    disk.fill()
    writer = None
    with pytest.raises(WriteError, match=rf"cannot write {re.escape(str(path))}: {FULL}"):
        writer = ShardWriter(str(path), (4,))
        writer.append(np.zeros((4096, 4), np.float32))
        writer.close()
    if writer is not None:
        writer.abort()  # what encode_shard does on an error
    assert leftovers(disk.root) == [] and not path.exists()


# -- caches and downloads ---------------------------------------------------------------------------
def test_caches_on_a_full_disk_cost_a_warning_and_leave_no_temporary(disk):
    from sra.eval import evaluate as E
    from sra.eval.digits import DigitsClassifier, DigitsClassifierConfig, save_digits_classifier

    npz = disk.root / "samples.npz"
    np.savez(npz, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    disk.fill()
    with pytest.warns(RuntimeWarning, match=rf"cannot write .*samples\.stats-w\.npz: {FULL} \(\d+ bytes free"):
        assert E.save_cached(npz, "w", {"pool": np.zeros((2, 2048), np.float32)}) is None
    path = disk.root / "digits.safetensors"
    cfg = DigitsClassifierConfig()
    with pytest.raises(WriteError, match=rf"cannot write {re.escape(str(path))}: {FULL}"):
        save_digits_classifier(DigitsClassifier(cfg), path, cfg)
    assert leftovers(disk.root) == [] and not path.exists()


def test_download_into_a_full_cache(disk, tmp_path, monkeypatch, capsys):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "weights.bin").write_bytes(os.urandom(200_000))
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SRA_CACHE_DIR", str(disk.root))
    from sra import artefacts as A

    url = f"http://127.0.0.1:{server.server_address[1]}/weights.bin"
    try:
        (disk.root / "downloads").mkdir()
        disk.fill()
        assert main(["artefacts", "fetch", url]) == 2
    finally:
        server.shutdown()
    one_error(capsys, "artefacts", A.cache_path(url), FULL)
    assert leftovers(disk.root) == []


# -- the CLI's last resort ----------------------------------------------------------------------
@pytest.mark.parametrize("exc,line", [
    (OSError(errno.EROFS, READ_ONLY, "/x/y"), rf"cannot write /x/y: {READ_ONLY} \(\d+ bytes free on that disk\)"),
    (OSError(errno.ENOSPC, FULL), rf"cannot write a file the OS did not name: {FULL}"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/x/y"), r"cannot access /x/y: Permission denied"),
])
def test_an_os_error_no_writer_named_is_still_one_line(monkeypatch, capsys, exc, line):
    from sra.commands import models

    def refuse(args):
        raise exc

    monkeypatch.setattr(models, "run", refuse)
    assert main(["models"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"sra models: error: {line}", err), err


def test_other_os_errors_keep_their_traceback(monkeypatch):
    from sra.commands import models

    monkeypatch.setattr(models, "run", lambda args: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        main(["models"])

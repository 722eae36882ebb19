"""One launch per directory: a live 2-process ``sra train`` / ``sra sample`` is not blocked by its
own lock, refuses a second launch in one line naming the holder before that launch writes
anything, and its lock dies with it (SIGKILL): the next launch proceeds."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

from sra import runlock
from sra.cli import main
from sra.models import ModelConfig, build_model

TINY = ["--depth", "4", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "4",
        "--block-out-s", "1", "--block-out-t", "3", "--batch-size", "32", "--report-to", "none",
        "--sample-steps", "0", "--grid-samples", "0", "--eval-samples", "0", "--log-every", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(argv: list[str], logs: Path) -> list[subprocess.Popen]:
    """Two gloo processes of ``sra ARGV`` (the environment accelerate launch / torchrun set)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    logs.mkdir(exist_ok=True)
    return [subprocess.Popen([sys.executable, "-m", "sra.cli", *argv],
                             env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                             stdout=open(logs / f"rank{r}.log", "w"), stderr=subprocess.STDOUT)
            for r in range(2)]


def wait_for(done, procs, logs: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not done():
        alive = all(p.poll() is None for p in procs)
        if not alive or time.time() > deadline:
            kill(procs)
            pytest.fail("the 2-process launch " + ("ended" if not alive else "stalled") + ":\n"
                        + "\n".join(p.read_text()[-2000:] for p in sorted(logs.glob("*.log"))))
        time.sleep(0.05)


def kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)  # no chance to clean up
        p.wait()


def digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def refused(capsys, command: str, d: Path, holder: subprocess.Popen) -> None:
    """Exactly one line, naming the directory and the holder's host, pid and start time."""
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    want = (rf"sra {command}: error: {re.escape(str(d))} is in use by another launch \(host "
            rf"{re.escape(socket.gethostname())}, pid {holder.pid}, started \d{{4}}-\d\d-\d\dT\S+\); .+")
    assert len(lines) == 1 and re.fullmatch(want, lines[0]), err


def test_train_two_processes_hold_the_run_and_the_lock_dies_with_them(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", *TINY, "--max-train-steps", "100000", "--checkpoint-steps", "100000",
            "--output-dir", str(tmp_path), "--exp-name", "run"]
    procs = launch_two(argv, tmp_path / "logs")
    try:
        # the log exists once the run is set up, after collectives with both processes: rank 1
        # passed the lock too
        wait_for(lambda: (run / "log.txt").is_file(), procs, tmp_path / "logs")
        for p in procs:
            p.send_signal(signal.SIGSTOP)  # frozen: whatever changes now is the second launch's doing
        before = digest(run)
        assert main(argv) == 2
        refused(capsys, "train", run, procs[0])  # rank 0 holds the lock for the launch
        assert digest(run) == before  # metrics.jsonl, log.txt, config.json untouched
    finally:
        kill(procs)
    assert main(["train", *TINY, "--max-train-steps", "2", "--output-dir", str(tmp_path),
                 "--exp-name", "run", "--resume", "auto"]) == 0
    assert '"step": 2' in (run / "metrics.jsonl").read_text()


@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory):
    cfg = ModelConfig(family="SiT", depth=1, hidden_size=16, num_heads=2, patch_size=4,
                      input_size=8, in_channels=1, num_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(cfg).state_dict().items()}, str(path))
    return path


def test_sample_two_processes_hold_the_output_dir_and_the_lock_dies_with_them(
        pixel_ckpt, tmp_path, monkeypatch, capsys):
    from sra.sampling import outputs as O

    out = tmp_path / "samples"
    argv = ["sample", "--ckpt", str(pixel_ckpt), "--data-kind", "pixels", "--output-dir", str(out),
            "--no-progress", "--num-samples", "200000", "--per-proc-batch-size", "2",
            "--mode", "euler", "--num-steps", "1", "--format", "npz", "--grid-size", "0"]
    procs = launch_two(argv, tmp_path / "logs")
    try:  # batch 1 is rank 1's: both processes passed the lock and sample
        wait_for(lambda: O.shard_path(out, 1).is_file(), procs, tmp_path / "logs")
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        before = digest(out)
        assert main(argv) == 2
        refused(capsys, "sample", out, procs[0])
        assert digest(out) == before
    finally:
        kill(procs)
    # the next launch takes the lock and samples: stop it after its first new batch
    real, new = O.save_batch, []

    def save_then_stop(out_dir, k, *a, **kw):
        real(out_dir, k, *a, **kw)
        new.append(k)
        raise KeyboardInterrupt

    monkeypatch.setattr(O, "save_batch", save_then_stop)
    assert main(argv) == 130
    assert len(new) == 1 and O.shard_path(out, new[0]).is_file()
    assert runlock.holder(out).startswith(f"host {socket.gethostname()}, pid {os.getpid()},")


def _other_process_locks(d: Path) -> bool:
    code = ("import fcntl, os, sys; "
            "fcntl.flock(os.open(sys.argv[1], os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)")
    return subprocess.run([sys.executable, "-c", code, str(d / runlock.LOCK_NAME)],
                          capture_output=True).returncode == 0


def test_one_process_is_one_launch_and_a_folder_made_for_the_lock_goes_with_it(tmp_path):
    d = tmp_path / "a" / "run"
    runlock.take(d, "sra train", "--output-dir")
    runlock.take(d, "sra train", "--output-dir")  # re-entrant: a script that trains, then resumes
    assert not _other_process_locks(d)
    shutil.rmtree(tmp_path / "a")  # removed under the holder: taken anew on the next call
    runlock.take(d, "sra train", "--output-dir")
    assert runlock.holder(d).startswith(f"host {socket.gethostname()}, pid {os.getpid()}, started ")
    kept = tmp_path / "kept"
    kept.mkdir()
    runlock.take(kept, "sra sample", "--output-dir")
    runlock.release_all()
    assert not (tmp_path / "a").exists()  # made only to hold the lock
    assert _other_process_locks(kept)  # released; the folder was there before, its file stays

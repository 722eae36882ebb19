"""Training: run directory, exact kill-and-resume, 2-process DDP, NaN handling, bad input."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sra.cli import main
from sra.config import override, preset
from sra.errors import SraError
from sra.objectives.sra import LossOutput, SRAObjective
from sra.training import checkpoint as ckpt
from sra.training.loop import Trainer

TINY = ["--depth", "4", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "4",
        "--block-out-s", "1", "--block-out-t", "3", "--batch-size", "32", "--report-to", "none",
        "--sample-steps", "0", "--grid-samples", "4", "--eval-samples", "0", "--log-every", "2"]


def tiny_cfg(tmp_path, **kw):
    cfg = preset("digits")
    for k, v in {
        "model.depth": 4, "model.hidden_size": 32, "model.num_heads": 2, "align.student_block": 1,
        "align.teacher_block": 3, "loop.global_batch_size": 32, "loop.report_to": "none",
        "loop.sample_steps": 0, "loop.grid_samples": 4, "loop.eval_digits": False,
        "loop.log_every": 2, "loop.max_train_steps": 6, "loop.checkpoint_steps": 3,
        "output_dir": str(tmp_path), "exp_name": "run", **kw,
    }.items():
        cfg = override(cfg, k, v)
    return cfg


def cli(args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sra.cli", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_run_directory_holds_everything(tmp_path):
    run = Trainer(tiny_cfg(tmp_path)).fit()
    assert json.loads((run / "config.json").read_text())["model"]["depth"] == 4
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for key in ("loss", "denoise", "align", "weight", "grad_norm", "student_norm", "teacher_norm",
                "cosine", "lr", "images_per_s", "steps_per_s"):
        assert key in rows[-1], key
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-0000003", "step-0000006"]
    last = run / "checkpoints" / "step-0000006"
    assert {"model.safetensors", "ema.safetensors", "optimizer.pt", "rng-0.pt", "meta.json"} <= {
        p.name for p in last.iterdir()}
    assert ckpt.read_meta(last)["data"] == {"epoch": 0, "batch": 6}
    assert (run / "samples" / "step-0000006.png").is_file() and (run / "curves.png").is_file()
    assert "step 6" in (run / "log.txt").read_text()
    # the checkpoint loads on CPU for inference and matches the saved EMA
    model, info = ckpt.load_model(run)
    assert info["model_config"].depth == 4 and info["data_info"]["kind"] == "pixels"
    ema = load_file(last / "ema.safetensors")
    assert torch.equal(model.blocks[0].attn.qkv.weight, ema["blocks.0.attn.qkv.weight"])
    # a finished run is not silently overwritten
    with pytest.raises(SraError, match="--resume auto"):
        Trainer(tiny_cfg(tmp_path))


def test_keep_last_and_milestones(tmp_path):
    run = Trainer(tiny_cfg(tmp_path, **{"loop.max_train_steps": 8, "loop.checkpoint_steps": 1,
                                        "loop.keep_last": 2, "loop.milestone_steps": 4})).fit()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-0000004", "step-0000007", "step-0000008"]


def test_sigkill_and_resume_is_bit_exact(tmp_path):
    steps = "40"
    args = TINY + ["--max-train-steps", steps, "--checkpoint-steps", "2", "--output-dir", str(tmp_path)]
    ref = cli(args + ["--exp-name", "ref"], tmp_path)
    killed = cli(args + ["--exp-name", "cut"], tmp_path)
    run = tmp_path / "cut"
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "step-0000004").exists():
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)  # no chance to clean up
    killed.wait()
    done = [p.name for p in ckpt.list_checkpoints(run)]
    assert done and done[-1] != f"step-00000{steps}", "the run finished before it could be killed"
    resumed = cli(args + ["--exp-name", "cut", "--resume", "auto"], tmp_path)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert ref.wait(timeout=300) == 0
    a = load_file(tmp_path / "ref" / "checkpoints" / f"step-00000{steps}" / "ema.safetensors")
    b = load_file(run / "checkpoints" / f"step-00000{steps}" / "ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps_logged = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(set(steps_logged))  # no duplicates from the killed part
    ma = load_file(tmp_path / "ref" / "checkpoints" / f"step-00000{steps}" / "model.safetensors")
    mb = load_file(run / "checkpoints" / f"step-00000{steps}" / "model.safetensors")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_two_process_ddp_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29531", "-m", "sra.cli", "train", *TINY, "--max-train-steps", "4",
           "--checkpoint-steps", "2", "--output-dir", str(tmp_path), "--exp-name", "ddp"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "ddp"
    sums = json.loads((run / "replicas.json").read_text())["ema_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["num_processes"] == 2 and cfg["micro_batch_per_process"] == 16
    assert ckpt.read_meta(run / "checkpoints" / "step-0000004")["world_size"] == 2
    assert (run / "checkpoints" / "step-0000004" / "rng-1.pt").is_file()


def test_nan_steps_are_skipped_and_persisting_nan_stops(tmp_path, monkeypatch):
    real = SRAObjective.__call__
    bad_steps = {2}

    def flaky(self, model, teacher, x0, y, step=0):
        out = real(self, model, teacher, x0, y, step)
        if step in bad_steps:
            out = LossOutput(out.total * float("nan"), out.denoise, out.align, out.weight, out.stats)
        return out

    monkeypatch.setattr(SRAObjective, "__call__", flaky)
    run = Trainer(tiny_cfg(tmp_path)).fit()
    meta = ckpt.read_meta(run / "checkpoints" / "step-0000006")
    assert meta["skipped"] == 1
    model = load_file(run / "checkpoints" / "step-0000006" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in model.values())
    bad_steps.update(range(100))
    with pytest.raises(SraError, match="3 consecutive non-finite steps"):
        Trainer(tiny_cfg(tmp_path, exp_name="nan", **{"loop.max_consecutive_skips": 3})).fit()
    assert ckpt.list_checkpoints(tmp_path / "nan") == []


def test_init_from_release_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"loop.max_train_steps": 1})
    first = Trainer(cfg)
    sd = first.ema.state_dict()
    sd = {k: v + 0.01 for k, v in sd.items()}
    release = tmp_path / "release.pt"
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(model="SiT-S/4"),
                "epoch": 0, "steps": 0}, release)
    t = Trainer(override(override(cfg, "init_from", str(release)), "exp_name", "init"))
    assert torch.equal(t.ema.blocks[0].mlp.fc1.weight, sd["blocks.0.mlp.fc1.weight"])


@pytest.mark.parametrize("extra,message", [
    (["--model", "SiT-XXL/2"], "unknown model 'SiT-XXL/2'; allowed: SiT-S/2"),
    (["--block-out-s", "3", "--block-out-t", "2"], "must be smaller than block-out-t"),
    (["--block-out-t", "9"], r"block-out-t 9 is outside 1..4"),
    (["--data-dir", "/nonexistent/data"], "/nonexistent/data"),
    (["--loss-type", "kl"], "allowed: cos, cos-release"),
    (["--t-max", "1.5"], r"t_max must be in \(0, 1\]"),
    (["--batch-size", "33", "--gradient-accumulation-steps", "2"], "not divisible"),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    import re

    code = main(["train", *TINY, "--output-dir", str(tmp_path), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err


def test_resume_with_another_architecture_is_refused(tmp_path, capsys):
    Trainer(tiny_cfg(tmp_path, **{"loop.max_train_steps": 3})).fit()
    code = main(["train", *TINY, "--hidden-size", "64", "--output-dir", str(tmp_path),
                 "--exp-name", "run", "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 2 and "different model" in err


def test_gradient_accumulation_splits_the_global_batch(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"loop.gradient_accumulation_steps": 2, "loop.max_train_steps": 2,
                                "loop.checkpoint_steps": 2})
    trainer = Trainer(cfg)
    assert trainer.micro_batch == 16
    run = trainer.fit()
    meta = ckpt.read_meta(run / "checkpoints" / "step-0000002")
    assert meta["data"] == {"epoch": 0, "batch": 4}  # 2 steps × 2 micro-batches consumed
    assert json.loads((run / "config.json").read_text())["micro_batch_per_process"] == 16


def test_compile_trains_student_and_teacher_like_eager(tmp_path):
    # --compile wraps the student and the EMA teacher; the losses must follow the eager run.
    runs = []
    for name, compile_ in (("eager", False), ("compiled", True)):
        # Built one after the other: constructing a Trainer seeds the global RNG.
        trainer = Trainer(tiny_cfg(tmp_path, **{"loop.max_train_steps": 4, "exp_name": name,
                                                "loop.compile": compile_}))
        assert (trainer.teacher_model is trainer.ema) != compile_
        runs.append(trainer.fit())
    rows = [[json.loads(l) for l in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    for a, b in zip(*rows):
        assert a["step"] == b["step"]
        for key in ("denoise", "align", "cosine"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key

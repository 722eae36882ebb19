"""Training: run directory, exact kill-and-resume, 2-process DDP, NaN handling, bad input."""

import argparse
import itertools
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
from sra.training.config import override
from host_reads import HostReads
from tiny import tiny_config
from sra.errors import SraError
from sra.objectives.sra import LossOutput, SRAObjective
from sra import checkpoints as ckpts
from sra.training.loop import Trainer

TINY = ["--depth", "4", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "4",
        "--block-out-s", "1", "--block-out-t", "3", "--batch-size", "32", "--report-to", "none",
        "--sample-steps", "0", "--grid-samples", "4", "--eval-samples", "0", "--log-every", "2"]


def tiny_cfg(tmp_path, **kw):
    return tiny_config(tmp_path, **kw)


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
    assert [p.name for p in ckpts.list_checkpoints(run)] == ["step-0000003", "step-0000006"]
    last = run / "checkpoints" / "step-0000006"
    assert {"model.safetensors", "ema.safetensors", "optimizer.pt", "rng-0.pt", "meta.json"} <= {
        p.name for p in last.iterdir()}
    assert ckpts.read_meta(last)["data"] == {"epoch": 0, "batch": 6}
    assert (run / "samples" / "step-0000006.png").is_file() and (run / "curves.png").is_file()
    assert "step 6" in (run / "log.txt").read_text()
    # the checkpoint loads on CPU for inference and matches the saved EMA
    model, info = ckpts.load_model(run)
    assert info["model_config"].depth == 4 and info["data_info"]["kind"] == "pixels"
    ema = load_file(last / "ema.safetensors")
    assert torch.equal(model.blocks[0].attn.qkv.weight, ema["blocks.0.attn.qkv.weight"])
    # a finished run is not silently overwritten
    with pytest.raises(SraError, match="--resume auto"):
        Trainer(tiny_cfg(tmp_path))


def test_keep_last_and_milestones(tmp_path):
    run = Trainer(tiny_cfg(tmp_path, **{"loop.max_train_steps": 8, "loop.checkpoint_steps": 1,
                                        "loop.keep_last": 2, "loop.milestone_steps": 4})).fit()
    assert [p.name for p in ckpts.list_checkpoints(run)] == ["step-0000004", "step-0000007", "step-0000008"]


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
    done = [p.name for p in ckpts.list_checkpoints(run)]
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


def test_two_cpu_processes_with_accelerate_launch_then_resume_on_one(tmp_path):
    """The README's CPU multi-process command really starts 2 processes (gloo DDP), which agree;
    the run then resumes on 1 process with the same data order."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29531", "-m", "sra.cli", "train", *TINY, "--max-train-steps", "4",
           "--checkpoint-steps", "2", "--output-dir", str(tmp_path), "--exp-name", "ddp"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "ddp"
    assert res.stdout.count("run directory:") == 1  # printed by the main process only
    replicas = json.loads((run / "replicas.json").read_text())
    assert replicas["world_size"] == 2
    sums = replicas["ema_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["num_processes"] == 2 and cfg["micro_batch_per_process"] == 16
    meta = ckpts.read_meta(run / "checkpoints" / "step-0000004")
    assert meta["world_size"] == 2 and meta["data"] == {"epoch": 0, "batch": 4}
    assert (run / "checkpoints" / "step-0000004" / "rng-1.pt").is_file()
    # one process continues: same global micro-batches (32 samples), so the position carries on
    cfg1 = tiny_cfg(tmp_path, exp_name="ddp", **{"loop.max_train_steps": 6, "loop.log_every": 2})
    trainer = Trainer(cfg1, resume="auto")
    assert trainer.step == 4 and trainer.micro_batch == 32
    trainer.fit()
    assert ckpts.read_meta(run / "checkpoints" / "step-0000006")["data"] == {"epoch": 0, "batch": 6}
    assert "it was written by 2" in (run / "log.txt").read_text()


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
    meta = ckpts.read_meta(run / "checkpoints" / "step-0000006")
    assert meta["skipped"] == 1
    model = load_file(run / "checkpoints" / "step-0000006" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in model.values())
    bad_steps.update(range(100))
    with pytest.raises(SraError, match="3 consecutive non-finite steps"):
        Trainer(tiny_cfg(tmp_path, exp_name="nan", **{"loop.max_consecutive_skips": 3})).fit()
    assert ckpts.list_checkpoints(tmp_path / "nan") == []


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
    meta = ckpts.read_meta(run / "checkpoints" / "step-0000002")
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


# -- the README's main job, end to end, from an empty cache ------------------------------------------
README_TINY = ["--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--block-out-s", "1",
               "--block-out-t", "2", "--batch-size", "32", "--max-train-steps", "4",
               "--checkpoint-steps", "2", "--grid-samples", "4", "--report-to", "none"]


def test_readme_main_job_from_an_empty_cache(tmp_path, capsys):
    """`sra train --preset digits`, shrunk by flags only: Trainer.fit with the digits evaluation ON,
    against the empty SRA_CACHE_DIR this test gets (the classifier is trained on first use)."""
    from sra.eval.digits import default_classifier_path

    assert not default_classifier_path().exists()
    args = ["train", "--preset", "digits", *README_TINY, "--eval-samples", "40",
            "--output-dir", str(tmp_path)]
    assert main(args) == 0, capsys.readouterr().err
    run = tmp_path / "digits-sra"
    ev = json.loads((run / "eval_digits.json").read_text())
    assert ev["step"] == 4 and ev["num_samples"] == 40 and ev["fd"] > 0 and 0 <= ev["acc"] <= 1
    assert default_classifier_path().is_file()  # cached for the next run
    assert capsys.readouterr().out.strip().endswith(f"run directory: {run}")
    # the same command again: refused in one line, nothing touched
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume auto" in err
    # --resume auto on a complete run: says so, exits 0
    assert main(args + ["--resume", "auto"]) == 0
    assert "already complete at step 4" in capsys.readouterr().out
    # a run that died after its last checkpoint (before its evaluation) can still finish it
    (run / "eval_digits.json").unlink()
    assert main(args + ["--resume", "auto"]) == 0
    assert json.loads((run / "eval_digits.json").read_text())["step"] == 4


@pytest.mark.parametrize("flags", [
    ["--grid-samples", "0"], ["--eval-samples", "0"], ["--sample-steps", "0"],
    ["--checkpoint-steps", "1000"],
])
def test_degenerate_but_legal_settings(tmp_path, flags):
    args = ["train", *README_TINY, "--eval-samples", "0", "--output-dir", str(tmp_path), *flags]
    assert main(args) == 0
    run = tmp_path / "digits-sra"
    assert [p.name for p in ckpts.list_checkpoints(run)][-1] == "step-0000004"
    grids = list((run / "samples").glob("*.png")) if (run / "samples").exists() else []
    assert bool(grids) == (flags != ["--grid-samples", "0"])


def test_resolution_that_does_not_match_the_data(tmp_path, capsys):
    assert main(["train", *README_TINY, "--resolution", "256", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resolution is 256" in err
    assert not (tmp_path / "digits-sra").exists()


@pytest.mark.parametrize("flag,value", [("--batch-size", "16"), ("--gradient-accumulation-steps", "2")])
def test_resume_with_another_batch_layout_is_refused(tmp_path, capsys, flag, value):
    base = ["train", *README_TINY, "--eval-samples", "0", "--output-dir", str(tmp_path)]
    assert main(base) == 0
    before = sorted(p.name for p in (tmp_path / "digits-sra" / "checkpoints").iterdir())
    capsys.readouterr()
    code = main(base + ["--max-train-steps", "6", "--resume", "auto", flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and flag in err, err
    assert sorted(p.name for p in (tmp_path / "digits-sra" / "checkpoints").iterdir()) == before


# -- host–device syncs ---------------------------------------------------------------------------------
DTS_AS = {"groups.mask_ratios": (0.25,), "groups.full_sample_prob": 0.5}  # + teacher mask
# SRA + Dispersive Loss, both switched off after step 5 (the head anchored from then on)
DISPERSIVE = {"dispersive.weight": 0.5, "align.until": 5, "dispersive.until": 5}


@pytest.mark.parametrize("model, extra", [("SiT-S/4", {}), ("DiT-S/4", {}), ("SiT-S/4", DTS_AS),
                                          ("SiT-S/4", DISPERSIVE)],
                         ids=["sra", "dit", "dts-as", "sra-dispersive"])
def test_no_host_sync_inside_a_training_step(tmp_path, monkeypatch, model, extra):
    cfg = tiny_cfg(tmp_path, **{"loop.max_train_steps": 9, "loop.log_every": 4, "model.name": model,
                                "loop.checkpoint_steps": 100, "loop.grid_samples": 0, **extra})
    trainer = Trainer(cfg)
    # The batches are fetched up front: the DataLoader reads host data (CPU indices, labels),
    # which is no device sync; what is counted is the step itself.
    trainer.loader = list(itertools.islice(iter(trainer.loader), 9))
    trainer._in_step = False
    counter = HostReads(monkeypatch, label=lambda: (trainer.step, trainer._in_step))
    real_step = Trainer._train_step

    def step(self, batches):
        self._in_step = True
        try:
            return real_step(self, batches)
        finally:
            self._in_step = False

    monkeypatch.setattr(Trainer, "_train_step", step)
    with counter:
        trainer.fit()
    # no step reads a value on the host; between steps, only the log steps 4 and 8 (and the last) do
    inside = [e for e in counter.events if e[1]]
    assert inside == [], inside
    between = [e for e in counter.events if not e[1] and 1 <= e[0] <= 8 and e[0] % 4]
    assert between == [], between
    assert any(e[0] == 4 and not e[1] for e in counter.events)  # the log step does read


def test_backward_runs_outside_autocast(tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg(tmp_path, **{"loop.max_train_steps": 1}))
    seen = []
    real = trainer.accelerator.backward

    def backward(loss, **kw):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(loss, **kw)

    monkeypatch.setattr(trainer.accelerator, "backward", backward)
    monkeypatch.setattr(trainer.accelerator, "autocast",
                        lambda *a, **k: torch.autocast("cpu", dtype=torch.bfloat16))
    trainer.fit()
    assert seen == [False]


def test_metrics_truncation_and_reader_keep_every_other_line(tmp_path):
    from sra.errors import SraError
    from sra.training.bookkeeping import truncate_metrics
    from sra.viz.curves import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2}\n{"step": 4}\nnot json\n{"step": 6}\n{"step": 8}\n{"step": 1')
    truncate_metrics(path, 4)
    assert path.read_text() == '{"step": 2}\n{"step": 4}\nnot json\n'
    with pytest.raises(SraError, match="line 3 is not JSON"):
        read_jsonl(path)
    path.write_text('{"step": 2}\n{"step": 4}\n{"ste')  # only a torn last line may go
    assert read_jsonl(path) == [{"step": 2}, {"step": 4}]


def test_resume_auto_passes_over_a_damaged_newest_checkpoint(tmp_path, capsys):
    base = ["train", *README_TINY, "--eval-samples", "0", "--output-dir", str(tmp_path)]
    assert main(base + ["--max-train-steps", "4"]) == 0
    run = tmp_path / "digits-sra"
    ema = run / "checkpoints" / "step-0000004" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])  # torn by a crash of the disk, say
    assert main(base + ["--max-train-steps", "6", "--resume", "auto"]) == 0
    log_text = (run / "log.txt").read_text()
    assert "step-0000004 is damaged (ema.safetensors: truncated" in log_text
    assert "resumed from" in log_text and "step-0000002 at step 2" in log_text
    assert ckpts.read_meta(run / "checkpoints" / "step-0000006")["data"] == {"epoch": 0, "batch": 6}
    # every checkpoint damaged: one clear line, nothing written
    for p in (run / "checkpoints").glob("step-*/model.safetensors"):
        p.write_bytes(b"\0" * 10)
    capsys.readouterr()
    assert main(base + ["--max-train-steps", "8", "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint of" in err and "loads completely" in err

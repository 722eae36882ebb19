"""The study layer (studies/): every shipped regime file resolves to valid `sra train` configs,
the family regime's arms are what they say, and a tiny study end to end — 2 arms × 1 seed ×
2 + 2 steps through real `sra train` processes, then `sra compare` — skips finished runs and resumes
half-finished ones."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STUDIES = Path(__file__).resolve().parents[1] / "studies"
sys.path.insert(0, str(STUDIES))
spec = importlib.import_module("spec")
launch = importlib.import_module("launch")
study_run = importlib.import_module("run")

TINY = """
steps = 2
seeds = [0]
baseline = "vanilla"
late = 0.5
[flags]
depth = 4
hidden-size = 32
num-heads = 2
batch-size = 16
log-every = 1
checkpoint-steps = 2
fid-every = 2
fid-samples = 10
fid-batch-size = 10
eval-samples = 10
grid-samples = 4
sample-steps = 0
report-to = "none"
[arms.vanilla]
preset = "digits-vanilla"
[arms.sra]
preset = "digits"
flags = { align-weight = 0.25 }
"""


@pytest.mark.parametrize("name", spec.regime_names())
def test_every_regime_file_resolves_to_train_configs(name):
    study = spec.load_study(name)
    configs = {a.name: spec.resolved_config(study.train_args(a.name, 0, Path("/tmp/w")))
               for a in study.arms}
    assert study.baseline in configs and len(configs) >= 2
    assert len({c.to_json() for c in configs.values()}) == len(configs)  # no two arms alike


def test_family_arms_and_the_old_studys_evaluation():
    study = spec.load_study("family")
    cfg = {a.name: spec.resolved_config(study.train_args(a.name, 0, Path("/tmp/w")))
           for a in study.arms}
    assert list(cfg)[:2] == ["vanilla", "sra"] and study.control == "repa" and len(cfg) == 12
    for c in cfg.values():  # every 125 steps, 500 samples, Heun 25 unguided, 1000 steps
        assert (c.fid.every, c.fid.samples, c.fid.sampler.mode, c.fid.sampler.steps,
                c.fid.sampler.cfg_scale, c.loop.max_train_steps) == (125, 500, "heun", 25, 1.0, 1000)
    assert not cfg["vanilla"].align.enabled and cfg["sra"].align.weight == 0.5
    assert cfg["dts-sf"].groups.teacher_t == "self_flow" and not cfg["dts-sf"].groups.teacher_mask
    assert cfg["dts-as-full"].groups.full_sample_prob == 0.5 and not cfg["dts-noalign"].align.enabled
    assert cfg["repa"].encoder_align.encoder == "digits-classifier"
    assert (cfg["irepa"].encoder_align.projector, cfg["irepa"].encoder_align.target_norm) == ("conv", "zscore")
    d, t = cfg["dispersive"].dispersive, cfg["dispersive-torch"].dispersive
    assert (d.weight, d.tau, d.block, cfg["dispersive"].align.enabled) == (0.5, 0.5, None, False)
    assert (t.weight, t.tau, t.block) == (0.25, 1.0, 6)
    assert cfg["sra-dispersive"].align.enabled and cfg["sra-dispersive"].dispersive.weight == 0.5
    assert cfg["sra-until250"].align.until == 250
    args = study.train_args("dts-sf", 2, Path("/w"))
    assert args[-6:] == ["--seed", "2", "--output-dir", "/w/family/s2", "--exp-name", "dts-sf"]
    assert "--teacher-mask" in args and args[args.index("--teacher-mask") + 1] == "false"


def test_launch_order_and_a_subset_of_arms(tmp_path):
    study = spec.load_study("family")
    plans = launch.plan_runs(study, tmp_path)
    assert [(p.arm, p.seed) for p in plans[:3]] == [("vanilla", 0), ("repa", 0), ("sra", 0)]
    assert len(plans) == 36 and {p.action for p in plans} == {"start"}
    some = launch.plan_runs(study, tmp_path, seeds=[1, 2], arms=["irepa", "vanilla"])
    assert [(p.arm, p.seed) for p in some] == [("vanilla", 1), ("irepa", 1), ("vanilla", 2), ("irepa", 2)]
    with pytest.raises(SystemExit, match="no arm nope; arms: vanilla, repa, sra"):
        launch.plan_runs(study, tmp_path, arms=["nope"])


def test_a_bad_regime_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('baseline = "nope"\n[arms.a]\npreset = "digits"\n')
    with pytest.raises(spec.SpecError, match="baseline 'nope' is not an arm"):
        spec.load_study(bad)
    bad.write_text('[arms.a]\nflags = {}\n')
    with pytest.raises(spec.SpecError, match=r"\[arms.a\] needs a preset"):
        spec.load_study(bad)


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """An untrained (fixed-seed) digit classifier in a fresh cache: the plumbing is under test."""
    import sra.eval.digits as D

    torch.manual_seed(0)
    clf = D.DigitsClassifier().eval()
    clf.ref_sigma.copy_(torch.eye(clf.ref_sigma.shape[0], dtype=torch.float64))
    cache = tmp_path / "work" / "cache"
    D.save_digits_classifier(clf, cache / D.CLASSIFIER_FILE, D.DigitsClassifierConfig())
    monkeypatch.setenv("SRA_CACHE_DIR", str(cache))
    return cache


def test_tiny_study_end_to_end_skips_finished_and_resumes(tmp_path, fake_cache, monkeypatch):
    from sra.compare import compare
    from sra.compare.report import to_json

    regime = tmp_path / "tiny.toml"
    regime.write_text(TINY)
    work, out = tmp_path / "work", tmp_path / "out"
    argv = [str(regime), "--work", str(work), "--out", str(out), "--jobs", "2"]
    first = study_run.main(argv)  # the regime's 2 steps: both runs start
    assert [r.plan.action for r in first["results"]] == ["start", "start"]
    assert [r.returncode for r in first["results"]] == [0, 0]

    # Longer: the runs are half-finished now and continue from their step-2 checkpoint.
    plans = launch.plan_runs(spec.load_study(regime), work, steps=4)
    assert [p.action for p in plans] == ["resume", "resume"] and plans[0].args[-2:] == ("--resume", "auto")
    again = study_run.main(argv + ["--steps", "4"])
    assert [r.returncode for r in again["results"]] == [0, 0]
    dirs = [work / "tiny" / "s0" / a for a in ("vanilla", "sra")]
    assert "resumed from" in (dirs[1] / "log.txt").read_text()
    log = (work / "tiny" / "logs" / "sra-s0.txt").read_text()
    assert "--align-weight 0.25" in log and "--exp-name sra" in log and "--resume auto" in log

    js = json.loads((out / "compare.json").read_text())
    # The outputs are sra compare's own: the same comparison, recomputed here, gives them.
    assert js == json.loads(json.dumps(to_json(compare(dirs, baseline="vanilla",
                                                       name_by=["exp_name"], late=0.5))))
    assert [a["name"] for a in js["arms"]] == ["vanilla", "sra"] and js["metric"] == "digits_fd"
    assert js["tables"]["steps"]["steps"] == [2, 4] and js["tables"]["compute"]["unavailable"] is None
    assert (out / "compare.md").is_file() and (out / "compare.png").stat().st_size > 1000

    # Finished runs are skipped: no sra train process is started, the report is rewritten.
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("finished run retrained"))
    (out / "compare.md").unlink()
    assert study_run.main(argv + ["--steps", "4"])["results"] == []
    assert (out / "compare.md").is_file()

    # Records: the finished runs' small files are kept (no checkpoints), the report is made from
    # them, and a launch with an empty work folder finds the runs finished there.
    rec = tmp_path / "records"
    study_run.main(argv + ["--steps", "4", "--records", str(rec)])
    kept = rec / "tiny" / "s0" / "sra"
    assert sorted(p.name for p in kept.iterdir()) == ["config.json", "log.txt", "metrics.jsonl"]
    assert (kept / "metrics.jsonl").read_bytes() == (dirs[1] / "metrics.jsonl").read_bytes()
    from_records = (out / "compare.json").read_text()
    assert str(work) not in from_records  # the same report, with the records' paths
    assert json.loads(from_records.replace(str(rec), str(work))) == js
    plans = launch.plan_runs(spec.load_study(regime), tmp_path / "empty", steps=4, records=rec)
    assert [p.action for p in plans] == ["skip", "skip"]

    # From inside the folder, the report names the runs by their paths relative to it.
    monkeypatch.chdir(tmp_path)
    study_run.main([str(regime), "--work", "work", "--records", "records", "--compare-only",
                    "--steps", "4"])
    rel = json.loads((rec / "tiny" / "compare" / "compare.json").read_text())
    assert [a["runs"] for a in rel["arms"]] == [["records/tiny/s0/vanilla"], ["records/tiny/s0/sra"]]

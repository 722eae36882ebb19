"""Smoke test of the convergence study script (benchmarks/convergence.py) on a tiny config."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("convergence_bench", ROOT / "benchmarks" / "convergence.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fake_classifier(monkeypatch):
    """An untrained (fixed-seed) digit classifier: the structure is under test, not its quality."""
    import sra.eval.digits as D

    torch.manual_seed(0)
    clf = D.DigitsClassifier().eval()
    clf.ref_sigma.copy_(torch.eye(clf.ref_sigma.shape[0], dtype=torch.float64))
    monkeypatch.setattr(D, "load_digits_classifier", lambda *a, **k: clf)
    return clf


def test_convergence_study_writes_table_plot_and_resumes(tmp_path, fake_classifier, monkeypatch):
    import sra.training.loop as loop
    from sra.training.monitor import Monitor

    # The end-of-run sample grid / loss-curve PNGs are the loop's business, not the study's.
    monkeypatch.setattr(Monitor, "snapshot", lambda self, ema, step, title: None)
    conv = _load_script()
    docs = tmp_path / "docs"
    argv = ["--regimes", "headline", "--seeds", "0,1", "--steps", "4", "--eval-every", "2",
            "--samples", "20", "--sampler-steps", "2", "--batch-size", "16", "--jobs", "1",
            "--work-dir", str(tmp_path / "work"), "--docs-dir", str(docs),
            "--set", "model.depth=4", "--set", "model.hidden_size=32", "--set", "model.num_heads=2",
            "--set", "loop.log_every=1"]
    out = conv.main(argv)

    assert out["plot"] == docs / "convergence.png"
    assert out["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((docs / "convergence_results.json").read_text())
    assert sorted(raw["runs"]) == ["sra-s0", "sra-s1", "vanilla-s0", "vanilla-s1"]
    for key, run in raw["runs"].items():
        assert [e["step"] for e in run["eval"]] == [2, 4]
        assert all(math.isfinite(e["fd"]) and 0 <= e["acc"] <= 1 and e["n"] == 20 for e in run["eval"])
        assert run["config"]["model"]["depth"] == 4
        assert run["config"]["align"]["enabled"] == key.startswith("sra")
        assert set(run["diagnostics"]) >= {"cos", "cos_centered", "student_shared", "teacher_shared"}
    # SRA runs log the alignment loss; vanilla runs have none.
    assert all("align" in e["train"] and e["train"]["align"] > 0 for e in raw["runs"]["sra-s0"]["eval"])
    # The late window of a 4-step run is its last eval; with 2 seeds per arm Δ has a finite SE.
    late = raw["regimes"]["headline"]["late"]
    assert late["steps"] == [4] and all(math.isfinite(x) for x in late["fd_diff"])
    fd = lambda arm: [r["eval"][-1]["fd"] for k, r in raw["runs"].items() if r["arm"] == arm]
    assert late["fd_diff"][0] == pytest.approx(sum(fd("sra")) / 2 - sum(fd("vanilla")) / 2)

    md = (docs / "convergence.md").read_text()
    assert "| headline | 4 |" in md and "| 2/2 |" in md  # summary row (seeds per arm)
    assert "## Regime `headline`" in md and "![FD vs step](convergence.png)" in md
    rows = [line for line in md.splitlines() if line.startswith("| 2 |") or line.startswith("| 4 |")]
    assert len(rows) == 2 and all(row.count("±") >= 4 for row in rows)

    # Resumable: finished runs are not retrained, and the hand-written notes survive.
    md = md.replace("(to be written)", "HAND-WRITTEN CONCLUSION")
    (docs / "convergence.md").write_text(md)
    monkeypatch.setattr(loop, "Trainer", lambda *a, **k: pytest.fail("finished run retrained"))
    conv.main(argv)
    assert "HAND-WRITTEN CONCLUSION" in (docs / "convergence.md").read_text()


def test_objective_draws_run_on_the_diagnostics_stream():
    """The token diagnostics call the objective's teacher time (global RNG) on their own seeded
    stream: the same numbers as drawing from the generator, and the global RNG is untouched."""
    _load_script()  # puts benchmarks/ on sys.path
    from convergence_diagnostics import on_stream

    g, ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    drawn = on_stream(g, lambda: torch.rand_like(torch.zeros(5)))
    assert torch.equal(drawn, torch.rand(5, generator=ref))
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=ref))  # g moved on
    assert torch.equal(torch.get_rng_state(), before)


def test_family_regime_runs_every_arm_and_reports(tmp_path, fake_classifier, monkeypatch):
    """The multi-arm regime trains vanilla, SRA, DTS/AS (two teachers), DTS/AS without
    alignment and REPA from one initial backbone per seed, and writes the family section, its
    plot and its JSON (cost per step, paired Δ at equal steps and equal compute)."""
    import sra.encoders.digits as E
    import sra.eval.digits as D
    from sra.training.monitor import Monitor

    torch.manual_seed(1)
    enc = D.DigitsClassifier(D.DigitsClassifierConfig(width=24)).eval()  # the encoder's width
    monkeypatch.setattr(E, "load_digits_classifier", lambda *a, **k: enc)
    monkeypatch.setattr(Monitor, "snapshot", lambda self, ema, step, title: None)
    conv = _load_script()
    docs = tmp_path / "docs"
    out = conv.main(["--regimes", "family", "--seeds", "0,1", "--steps", "4", "--eval-every", "2",
                     "--samples", "10", "--sampler-steps", "1", "--batch-size", "8", "--jobs", "1",
                     "--work-dir", str(tmp_path / "work"), "--docs-dir", str(docs),
                     "--set", "model.depth=4", "--set", "model.hidden_size=32",
                     "--set", "model.num_heads=2"])
    raw = json.loads((docs / "convergence_results.json").read_text())
    arms = ["vanilla", "sra", "dts-as", "dts-sf", "dts-as-full", "dts-noalign", "repa"]
    assert sorted(raw["runs"]) == sorted(f"fam-{a}-s{s}" for a in arms for s in (0, 1))
    cfg = {a: raw["runs"][f"fam-{a}-s0"]["config"] for a in arms}
    assert cfg["dts-as"]["groups"]["teacher_t"] == "sra" and cfg["dts-sf"]["groups"]["teacher_t"] == "self_flow"
    assert cfg["dts-as-full"]["groups"]["full_sample_prob"] == 0.5
    assert not cfg["dts-noalign"]["align"]["enabled"] and cfg["dts-noalign"]["groups"]["mask_ratios"] == [0.25]
    assert cfg["repa"]["align_target"] == "encoder" and cfg["repa"]["encoder_align"]["encoder"] == "digits-classifier"
    for run in raw["runs"].values():
        assert run["trained_steps"] == 4 and run["cpu_per_step_s"] > 0
        assert [e["step"] for e in run["eval"]] == [2, 4]
    fam = raw["families"]["family"]
    assert set(fam["equal_steps"]) == {f"fam-{a}" for a in arms}
    assert fam["dts_best"] in ("fam-dts-as", "fam-dts-sf", "fam-dts-as-full") and fam["control"]["arm"] == "fam-repa"
    d = fam["equal_steps"]["fam-sra"]["4"]
    fd = {s: raw["runs"][f"fam-{a}-s{s}"]["eval"][-1]["fd"] for a in ("sra",) for s in (0, 1)}
    fv = {s: raw["runs"][f"fam-vanilla-s{s}"]["eval"][-1]["fd"] for s in (0, 1)}
    assert d["n"] == 2 and d["mean"] == pytest.approx((fd[0] - fv[0] + fd[1] - fv[1]) / 2)
    assert out["plot:family"] == docs / "convergence_family.png"
    assert out["plot:family"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (docs / "convergence.md").read_text()
    assert "## The self-alignment family (`--regimes family`)" in md
    assert "### Equal compute" in md and "| `repa` |" in md


def _run(arm: str, seed: int, fds: dict[int, float], cpu: float) -> dict:
    return {"arm": arm, "seed": seed, "cpu_per_step_s": cpu, "config": {},
            "eval": [{"step": s, "fd": f, "acc": 0.5} for s, f in fds.items()]}


def test_equal_compute_interpolates_between_eval_points_without_extrapolating():
    """An arm twice as expensive as vanilla is compared at half vanilla's step; a cheaper one at
    a later step; values are linear between eval points, and missing outside them."""
    _load_script()
    from convergence_family import interp, summarize_family
    from convergence_setup import Regime

    assert interp([2, 4], [10.0, 6.0], 3) == pytest.approx(8.0)
    assert interp([2, 4], [10.0, 6.0], 4) == pytest.approx(6.0)
    assert interp([2, 4], [10.0, 6.0], 1) is None and interp([2, 4], [10.0, 6.0], 5) is None
    steps = (2, 4, 6, 8)
    results = {}
    for seed, off in ((0, 0.0), (1, 0.2), (2, -0.2)):
        results[f"v-s{seed}"] = _run("v", seed, {s: 20.0 - s + off for s in steps}, 1.0)
        results[f"a-s{seed}"] = _run("a", seed, {s: 18.0 - s + off for s in steps}, 2.0)
        results[f"b-s{seed}"] = _run("b", seed, {s: 20.0 - s + off for s in steps}, 0.5)
    summ = summarize_family(Regime("t", "v", "a", "test", 8, 2, ("b",), control="a"), results)
    a = summ["equal_compute"]["a"]
    # vanilla step 8 → arm step 4 (FD 14 vs 12), step 6 → arm step 3 (interpolated 15 vs 14).
    assert a[8]["mean"] == pytest.approx(2.0) and a[6]["mean"] == pytest.approx(1.0)
    assert a[2]["n"] == 0  # arm step 1: before its first eval, no value
    assert summ["equal_steps"]["a"][4]["mean"] == pytest.approx(-2.0)
    b = summ["equal_compute"]["b"]
    assert b[4]["mean"] == pytest.approx(-4.0) and b[6]["n"] == 0  # step 12 is past its last eval
    assert summ["late"]["a"]["cost_ratio"] == pytest.approx(2.0)


def test_two_standard_error_marking():
    """|Δ| > 2 SE is marked with its side (lower FD = better); within 2 SE or with an undefined
    SE nothing is marked; the report prints marked differences bold with an arrow."""
    _load_script()
    from convergence_family import paired, significance
    from convergence_family_report import fmt_delta

    assert significance(-1.0, 0.4) == "better" and significance(1.0, 0.3) == "worse"
    assert significance(-0.5, 0.4) == "" and significance(-1.0, math.nan) == ""
    d = paired({0: 9.0, 1: 8.8, 2: 9.2}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert d["mean"] == pytest.approx(-1.0) and d["se"] == pytest.approx(0.2 / math.sqrt(3))
    assert d["sig"] == "better" and fmt_delta(d) == "**-1.00 ± 0.12** ↓"
    noisy = paired({0: 9.0, 1: 11.0}, {0: 10.0, 1: 10.5})
    assert noisy["sig"] == "" and "**" not in fmt_delta(noisy)
    assert paired({0: 9.0, 1: None}, {0: 10.0, 1: 10.0})["n"] == 1

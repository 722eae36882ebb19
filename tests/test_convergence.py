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

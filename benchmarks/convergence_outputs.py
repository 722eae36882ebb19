"""The convergence study's outputs: collect every finished run's result and write
``convergence.md``, ``convergence.png`` and ``convergence_results.json`` to the docs folder."""

from __future__ import annotations

import json
from pathlib import Path

from convergence_diagnostics import add_diagnostics
from convergence_plot import write_plot
from convergence_report import kept_notes, markdown_report
from convergence_setup import REGIMES, StudyConfig
from convergence_stats import summarize_regime


def collect_results(study: StudyConfig) -> dict[str, dict]:
    """Every finished run of the study's seeds, by run key; runs finished before the token
    diagnostics existed get them now (and their result file is updated)."""
    results = {}
    res_dir = study.work_dir / "results"
    for f in sorted(res_dir.glob("*.json")) if res_dir.is_dir() else []:
        r = json.loads(f.read_text())
        if "diagnostics" not in r:
            add_diagnostics(r, study)
            if "diagnostics" in r:
                f.write_text(json.dumps(r, indent=1))
        if r["seed"] in study.seeds:
            results[f.stem] = r
    return results


def _jsonable(summaries: list[dict], results: dict[str, dict], study: StudyConfig) -> dict:
    return {
        "study": {k: (str(v) if isinstance(v, Path) else v) for k, v in study.__dict__.items()},
        "regimes": {s["regime"].name: {"vanilla": s["regime"].vanilla, "sra": s["regime"].sra,
                                       "description": s["regime"].description,
                                       "late": s["late"], "fd_diff_by_step": s["fd_diff_by_step"]}
                    for s in summaries},
        "runs": results,
    }


def write_outputs(study: StudyConfig) -> dict[str, Path]:
    """Collect every finished run (all regimes) and write the table, plot and raw JSON."""
    results = collect_results(study)
    # The report covers every regime with finished runs, not only the ones run this time.
    summaries = [summarize_regime(reg, results) for reg in REGIMES.values()]
    summaries = [s for s in summaries if s["arms"]["sra"]["runs"]]
    docs = Path(study.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    md_path = docs / "convergence.md"
    notes = kept_notes(md_path.read_text() if md_path.exists() else None)
    md_path.write_text(markdown_report(summaries, study, notes))
    png = write_plot(summaries, docs / "convergence.png")
    json_path = docs / "convergence_results.json"
    json_path.write_text(json.dumps(_jsonable(summaries, results, study), indent=1))
    out = {"markdown": md_path, "json": json_path}
    if png:
        out["plot"] = png
    return out

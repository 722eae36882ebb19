"""The convergence study's outputs: collect every finished run's result and write
``convergence.md``, ``convergence.png`` and ``convergence_results.json`` to the docs folder."""

from __future__ import annotations

import json
from pathlib import Path

from convergence_diagnostics import add_diagnostics
from convergence_cost import cost_path
from convergence_family import summarize_family
from convergence_family_report import family_lines, kept_family_notes, plot_name
from convergence_plot import write_family_plot, write_plot
from convergence_report import kept_notes, markdown_report
from convergence_setup import REGIMES, StudyConfig
from convergence_stats import summarize_regime


def archived_results(study: StudyConfig) -> dict[str, dict]:
    """The runs of the existing ``convergence_results.json`` in the docs folder: the report keeps
    regimes whose work folder is gone (a run in the work folder replaces its archived copy)."""
    path = Path(study.docs_dir) / "convergence_results.json"
    try:
        return dict(json.loads(path.read_text()).get("runs", {}))
    except (OSError, ValueError):
        return {}


def collect_results(study: StudyConfig) -> dict[str, dict]:
    """Every finished run of the study's seeds, by run key (the work folder's, else the archived
    copy); runs finished before the token diagnostics existed get them now (and their result file
    is updated)."""
    results = {k: r for k, r in archived_results(study).items() if r["seed"] in study.seeds}
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


def _bench(study: StudyConfig, regime_name: str) -> dict | None:
    """The regime's side-by-side step costs (``convergence_cost.py``), if measured."""
    try:
        return json.loads(cost_path(study.docs_dir, regime_name).read_text())
    except (OSError, ValueError):
        return None


def _family_jsonable(f: dict) -> dict:
    """A family summary without the runs (they are under "runs")."""
    reg = f["regime"]
    return {"vanilla": reg.vanilla, "arms": list(reg.arms), "control": reg.control,
            "description": reg.description, "steps": f["steps"], "late_steps": f["late_steps"],
            "cpu_per_step_s": f["cost"], **{k: f[k] for k in (
                "late", "equal_steps", "equal_compute", "best", "dts_best", "control")}}


def write_outputs(study: StudyConfig) -> dict[str, Path]:
    """Collect every finished run (all regimes) and write the tables, plots and raw JSON."""
    results = collect_results(study)
    # The report covers every regime with finished runs, not only the ones run this time.
    summaries = [summarize_regime(reg, results) for reg in REGIMES.values() if not reg.is_family]
    summaries = [s for s in summaries if s["arms"]["sra"]["runs"]]
    families = [summarize_family(reg, results, _bench(study, reg.name))
                for reg in REGIMES.values() if reg.is_family]
    families = [f for f in families if f["arms"][f["regime"].vanilla]["runs"]]
    docs = Path(study.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    md_path = docs / "convergence.md"
    old = md_path.read_text() if md_path.exists() else None
    family_md = [line for f in families for line in
                 family_lines(f, study, kept_family_notes(old, f["regime"].name))]
    md_path.write_text(markdown_report(summaries, study, kept_notes(old), family_md))
    out = {"markdown": md_path}
    png = write_plot(summaries, docs / "convergence.png")
    if png:
        out["plot"] = png
    for f in families:
        png = write_family_plot(f, docs / plot_name(f["regime"].name))
        if png:
            out[f"plot:{f['regime'].name}"] = png
    raw = _jsonable(summaries, results, study)
    raw["families"] = {f["regime"].name: _family_jsonable(f) for f in families}
    json_path = docs / "convergence_results.json"
    json_path.write_text(json.dumps(raw, indent=1))
    out["json"] = json_path
    return out

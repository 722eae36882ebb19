"""The markdown section of a multi-arm ("family") regime: setup, cost per step, the headline
table, FD and paired Δ vs vanilla at equal steps and at equal compute, with |Δ| > 2 SE marked."""

from __future__ import annotations

import math

from convergence_family import SIG_SE
from convergence_setup import StudyConfig
from convergence_stats import mean_std

DEFAULT_FAMILY_NOTES = "### Conclusion\n\n(to be written)\n"
ARM_NOTES = {
    "vanilla": "the digits preset without alignment",
    "sra": "the preset: SRA, student block 2 → EMA teacher block 4, `cos`, λ 0.5, t_max 0.2",
    "dts-as": "token groups r 0.25 (4 + 12 tokens at patch 4), dual-time scheduling, attention "
              "separation, teacher times `sra` with the teacher mask, SRA alignment as the preset "
              "(the follow-up's reference recipe, preset `digits-dts-as`)",
    "dts-sf": "as dts-as with the `self_flow` teacher (whole image at the cleanest group's time), "
              "no teacher mask",
    "dts-as-full": "as dts-as, but half the samples stay one group (full sample probability "
                   "0.5): the model also trains on the single-time, full-attention input it "
                   "samples with",
    "dts-noalign": "the same groups, DTS and AS, alignment off (no teacher, no head)",
    "repa": "REPA: block 2 through a 256-wide projector toward the `digits-classifier` encoder's "
            "4×4 conv map of the clean digit (48-d), λ 0.5 — the positive control (preset "
            "`digits-repa`; a separately trained classifier, not the one scoring the samples)",
}


def notes_markers(regime_name: str) -> tuple[str, str]:
    """The markers around a family section's hand-written notes."""
    return f"<!-- {regime_name}-notes:begin -->", f"<!-- {regime_name}-notes:end -->"


def plot_name(regime_name: str) -> str:
    """The family plot's file name in the docs folder."""
    return f"convergence_{regime_name}.png"


def short(summ: dict, arm: str) -> str:
    """An arm's name without the regime's prefix (``fam-dts-as`` → ``dts-as``)."""
    prefix = summ["regime"].vanilla[: -len("vanilla")]
    return arm[len(prefix):] if prefix and arm.startswith(prefix) else arm


def fmt_ms(ms: tuple[float, float], digits: int = 2) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "–"
    return f"{m:.{digits}f}" if not math.isfinite(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_delta(d: dict | None, digits: int = 2, step: bool = False) -> str:
    """Paired Δ "+m ± se", bold with ↓ (better) / ↑ (worse) beyond 2 SE; "(n=k)" when seeds are
    missing is left to the caller; "@ step" with ``step``."""
    if not d or not d["n"] or not math.isfinite(d["mean"]):
        return "–"
    txt = f"{d['mean']:+.{digits}f}" + (f" ± {d['se']:.{digits}f}" if math.isfinite(d["se"]) else "")
    if d["sig"]:
        txt = f"**{txt}** {'↓' if d['sig'] == 'better' else '↑'}"
    return txt + (f" @ {d['step']}" if step and "step" in d else "")


def _setup(summ: dict, study: StudyConfig) -> list[str]:
    reg = summ["regime"]
    seeds = sorted({r["seed"] for a in summ["arms"].values() for r in a["runs"]})
    lines = [f"{reg.description}.", "", "Arms (each compared with vanilla, paired by seed):", ""]
    lines += [f"- `{short(summ, a)}`: {ARM_NOTES.get(short(summ, a), a)}" for a in summ["arms"]]
    lines += [
        "",
        f"Seeds {', '.join(map(str, seeds))}: one seed gives every arm the same initial backbone "
        "and data order (heads are built after the backbone); the noise streams differ. "
        f"{reg.steps} steps, the EMA evaluated every {reg.eval_every} steps: {study.samples} "
        f"class-balanced samples from fixed noise, `{study.sampler_mode}` {study.sampler_steps} "
        f"steps, cfg scale {study.cfg_scale:g}, scored by the digit classifier (FD, lower is "
        "better). Paired Δ = arm − vanilla per seed, mean ± standard error (std/√n); "
        f"**bold ↓/↑** = |Δ| > {SIG_SE:g} SE (↓ lower FD than vanilla, ↑ higher). Cost = process "
        "CPU time per optimizer step (one thread per run, two runs at a time on a shared 2-core "
        "machine; set-up excluded). Equal compute: at vanilla's step s an arm has reached step "
        "s·c_vanilla/c_arm; its FD there is linearly interpolated between its eval points (no "
        "extrapolation). \"Side-by-side\": the same step costs measured interleaved in one "
        "process (`benchmarks/convergence_cost.py`, median), a check of the in-run costs, "
        "whose load changes between arms. \"best\" = the step with the most negative Δ/SE "
        "(the arm's strongest showing; early FD is large and noisy, so the raw Δ would pick the "
        "noisiest step). \"late\" = mean over the eval steps "
        f"{', '.join(map(str, summ['late_steps']))}.", ""]
    return lines


def _headline(summ: dict) -> list[str]:
    lines = ["| arm | CPU ms/step | × vanilla | late FD ± SE | late acc | late Δ ± SE | "
             "best-step Δ ± SE | late Δ at equal compute | best Δ at equal compute |",
             "|---|---|---|---|---|---|---|---|---|"]
    has_bench = any("bench_ratio" in summ["late"][a] for a in summ["arms"])
    if has_bench:
        lines[0] += " side-by-side × vanilla | late Δ at equal compute (side-by-side cost) |"
        lines[1] += "---|---|"
    for a in summ["arms"]:
        late, c = summ["late"][a], summ["cost"][a]
        best = summ["best"][a]
        is_van = a == summ["regime"].vanilla
        lines.append(
            f"| `{short(summ, a)}` | {fmt_ms((1000 * c[0], 1000 * c[1]), 0)} | "
            f"{late['cost_ratio']:.2f} | {fmt_ms((late['fd'][0], late['fd_se']))} | "
            f"{fmt_ms(late['acc'], 3)} | "
            + " | ".join("–" if is_van else x for x in (
                fmt_delta(late["delta"]), fmt_delta(best["steps"], step=True),
                fmt_delta(late["delta_compute"]), fmt_delta(best["compute"], step=True))) + " |")
        if has_bench:
            lines[-1] += (f" {late.get('bench_ratio', math.nan):.2f} | "
                          f"{'–' if is_van else fmt_delta(late.get('delta_compute_bench'))} |")
    return lines


def _step_tables(summ: dict, key: str) -> list[str]:
    """FD per arm (mean ± std) and paired Δ per non-vanilla arm, one row per vanilla eval step."""
    arms = list(summ["arms"])
    others = arms[1:]
    van = summ["regime"].vanilla
    c_v = summ["cost"][van][0]
    equal = summ[key]
    head = "| step | " + (" | ".join(f"`{short(summ, a)}`" for a in arms))
    if key == "equal_compute":
        head = "| vanilla step | CPU s | " + (" | ".join(f"`{short(summ, a)}`" for a in arms))
    lines = [head + " |", "|" + "---|" * (len(arms) + 1 + (key == "equal_compute"))]
    for s in summ["steps"]:
        cells = [fmt_ms(mean_std(list(equal[a][s]["values"].values()))) for a in arms]
        cpu = f"{s * c_v:.0f} | " if key == "equal_compute" else ""
        lines.append(f"| {s} | {cpu}" + " | ".join(cells) + " |")
    lines += ["", "Paired Δ FD vs vanilla ± SE:", "",
              "| step | " + " | ".join(f"`{short(summ, a)}`" for a in others) + " |",
              "|" + "---|" * (len(others) + 1)]
    for s in summ["steps"]:
        lines.append(f"| {s} | " + " | ".join(fmt_delta(equal[a][s]) for a in others) + " |")
    return lines


def family_lines(summ: dict, study: StudyConfig, notes: str) -> list[str]:
    """The family section: hand-written notes, setup, plot, cost/headline and step tables."""
    reg = summ["regime"]
    lines = [f"## The self-alignment family (`--regimes {reg.name}`)", "",
             notes_markers(reg.name)[0], notes.strip("\n"), notes_markers(reg.name)[1], "",
             "### Setup", "", *_setup(summ, study),
             f"![FD vs step and vs CPU time]({plot_name(reg.name)})", "",
             "### Headline", "", *_headline(summ), ""]
    ctrl = summ["control"]
    if ctrl:
        lines += [f"Positive control `{short(summ, ctrl['arm'])}`: " + (
            f"FD below vanilla by more than {SIG_SE:g} SE at step(s) "
            f"{', '.join(map(str, ctrl['steps']))} — the harness can detect a gain."
            if ctrl["detected"] else
            f"no step with a gain beyond {SIG_SE:g} SE — the harness cannot tell \"no gain\" "
            "from \"cannot detect\" in this regime."), ""]
    if summ["dts_best"]:
        lines += [f"Best DTS/AS variant with alignment (lowest late FD): "
                  f"`{short(summ, summ['dts_best'])}`.", ""]
    lines += ["### Equal steps: FD (mean ± std over seeds)", "", *_step_tables(summ, "equal_steps"),
              "", "### Equal compute: FD at vanilla's cumulative CPU time", "",
              *_step_tables(summ, "equal_compute"), ""]
    return lines


def kept_family_notes(old_markdown: str | None, regime_name: str) -> str:
    """The hand-written notes of a family section of an earlier report, or the placeholder."""
    begin, end = notes_markers(regime_name)
    if old_markdown and begin in old_markdown and end in old_markdown:
        return old_markdown.split(begin, 1)[1].split(end, 1)[0]
    return DEFAULT_FAMILY_NOTES

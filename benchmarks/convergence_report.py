"""The convergence study's markdown write-up: setup, summary table, one table per regime, token
diagnostics, and the hand-written notes kept between their markers."""

from __future__ import annotations

import math

from convergence_diagnostics import DIAG_SAMPLES
from convergence_setup import BASE_PRESET, StudyConfig
from convergence_stats import LATE_FRACTION, NAN_PAIR, mean_std

NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"
DEFAULT_NOTES = "## Conclusion\n\n(to be written)\n"


def kept_notes(old_markdown: str | None) -> str:
    """The hand-written notes of an earlier report (between the markers), or the placeholder."""
    if old_markdown and NOTES_BEGIN in old_markdown and NOTES_END in old_markdown:
        return old_markdown.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0]
    return DEFAULT_NOTES


def fmt(ms: tuple[float, float], digits: int = 2) -> str:
    """"m ± s", "m" when s is undefined, "–" when m is."""
    m, s = ms
    if math.isnan(m):
        return "–"
    if math.isnan(s):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _eval_every(summaries: list[dict]) -> str:
    return "/".join(str(e) for e in sorted({s["regime"].eval_every for s in summaries})) or "N"


def _setup_lines(summaries: list[dict], study: StudyConfig) -> list[str]:
    from sra.training.config import preset

    p = preset(BASE_PRESET)
    return [
        "### Setup", "",
        "- Data: the bundled 8×8 → 16×16 digits (1797 images, 10 classes), pixel space.",
        f"- Base model and recipe: preset `{BASE_PRESET}` — SiT depth {p.model.depth}, width "
        f"{p.model.hidden_size}, {p.model.num_heads} heads, patch {p.model.patch_size}; AdamW lr "
        f"{p.optim.learning_rate:g} ({p.optim.warmup_steps} warm-up steps), batch "
        f"{study.batch_size or p.loop.global_batch_size}, EMA {p.ema.decay} with warm-up, label "
        f"dropout {p.data.label_dropout}, fp32. SRA: s={p.align.student_block} → "
        f"t={p.align.teacher_block}, `{p.align.loss_type}`, λ {p.align.weight}, t_max "
        f"{p.align.t_max}, EMA teacher. Regimes change only what their line says.",
        f"- Seeds: {', '.join(map(str, study.seeds))} per arm (seed = initial weights, data order, "
        "noise). Paired regimes (" + (", ".join(f"`{x['regime'].name}`" for x in summaries
                                     if "pairs" in x["late"]) or "none yet") + ") were made after the SRA head "
        "was moved behind the backbone's initialisation: one seed gives both arms the same "
        "initial backbone and data order (not the same noise: the teacher's time draws random "
        "numbers), and the summary adds the paired Δ (mean ± SE of the per-seed differences). "
        "Earlier SRA runs started from a different backbone than their vanilla seed, so those "
        "regimes are compared unpaired.",
        f"- Metric: the EMA every {study.eval_every or _eval_every(summaries)} steps draws {study.samples} "
        f"class-balanced samples from FIXED noise and labels (same for every run and step) with "
        f"`{study.sampler_mode}` {study.sampler_steps} steps, cfg scale {study.cfg_scale:g} "
        f"({'unguided' if study.cfg_scale == 1 else 'guided'}); the digit classifier gives FD "
        "(Fréchet distance of its 128-d features to all real digits, lower is better) and "
        "class accuracy (share classified as the requested class).",
        f"- Tables: mean ± sample std over seeds. \"late\" = each run's mean over the eval steps "
        f"≥ {LATE_FRACTION:.2f} × the last step both arms share, then mean ± std over seeds; Δ = SRA − vanilla of the means ± its standard error "
        "(Welch, √(s²ᵥ/nᵥ + s²ₛ/nₛ)); |Δ| below ~2 SE is not a finding.", "",
    ]


def _summary_lines(summaries: list[dict]) -> list[str]:
    lines = [
        "### Summary", "",
        "| regime | late steps | vanilla FD | SRA FD | Δ FD ± SE | paired Δ FD ± SE | "
        "vanilla acc | SRA acc | Δ acc ± SE | seeds (v/s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        late = s["late"]
        steps = late["steps"]
        span = f"{steps[0]}–{steps[-1]}" if len(steps) > 1 else (str(steps[0]) if steps else "–")
        lines.append(
            f"| {s['regime'].name} | {span} | {fmt(late['vanilla']['fd'])} | "
            f"{fmt(late['sra']['fd'])} | {fmt(late['fd_diff'])} | "
            f"{fmt(late.get('fd_paired', NAN_PAIR))} | "
            f"{fmt(late['vanilla']['acc'], 3)} | {fmt(late['sra']['acc'], 3)} | "
            f"{fmt(late['acc_diff'], 3)} | {len(s['arms']['vanilla']['runs'])}/"
            f"{len(s['arms']['sra']['runs'])} |")
    return lines


def _regime_lines(s: dict) -> list[str]:
    """One regime's per-step table (both arms, Δ, and the SRA arm's logged alignment)."""
    reg = s["regime"]
    va, sa = s["arms"]["vanilla"], s["arms"]["sra"]
    lines = ["", f"### Regime `{reg.name}`", "", reg.description + ".", "",
             f"Arms: `{va['arm']}` (seeds {va['seeds']}) vs `{sa['arm']}` (seeds {sa['seeds']}).",
             "", "| step | vanilla FD | SRA FD | Δ FD ± SE | vanilla acc | SRA acc | SRA align "
             "| SRA cos(s,t) |",
             "|---|---|---|---|---|---|---|---|"]
    steps = sorted(set(va["table"]) | set(sa["table"]))
    for st in steps:
        vt, stt = va["table"].get(st), sa["table"].get(st)
        al = [e["train"].get("align") for r in sa["runs"] for e in r["eval"] if e["step"] == st]
        co = [e["train"].get("cosine") for r in sa["runs"] for e in r["eval"] if e["step"] == st]
        lines.append(
            f"| {st} | {fmt(vt['fd']) if vt else '–'} | {fmt(stt['fd']) if stt else '–'} | "
            f"{fmt(s['fd_diff_by_step'].get(st, NAN_PAIR))} | "
            f"{fmt(vt['acc'], 3) if vt else '–'} | {fmt(stt['acc'], 3) if stt else '–'} | "
            f"{fmt(mean_std(al), 4)} | {fmt(mean_std(co), 4)} |")
    return lines


def _diagnostics_lines(summaries: list[dict]) -> list[str]:
    """The token-diagnostics table, one row per arm that has any (each arm once)."""
    rows = []
    seen = set()
    for s in summaries:
        for role in ("vanilla", "sra"):
            arm = s["arms"][role]
            d = [r["diagnostics"] for r in arm["runs"] if "diagnostics" in r]
            if not d or arm["arm"] in seen:
                continue
            seen.add(arm["arm"])
            cols = [fmt(mean_std([x[k] for x in d]), 3) for k in
                    ("cos", "cos_centered", "student_shared", "teacher_shared")]
            blocks = "→".join(map(str, d[0].get("blocks", ("?", "?"))))
            rows.append(f"| `{arm['arm']}` | {blocks} | {d[0]['step']} | {len(d)} | "
                        f"{'head' if d[0]['projected'] else 'raw'} | " + " | ".join(cols) + " |")
    if not rows:
        return []
    return ["### Token diagnostics at the last checkpoint", "",
            f"{DIAG_SAMPLES} fixed real digits, random t, teacher time t − t_max·U; student "
            "tokens after block s (through the head where the run has one; raw for vanilla), "
            "EMA teacher tokens after block t. \"shared\" = |per-image mean token|² / mean "
            "|token|²: the part of a token common to all tokens of the image.", "",
            "| arm | blocks s→t | step | runs | student | cos | centered cos | "
            "student shared | teacher shared |", "|---|---|---|---|---|---|---|---|---|",
            *rows, ""]


def markdown_report(summaries: list[dict], study: StudyConfig, notes: str,
                    family: list[str] | None = None) -> str:
    """The write-up: the family sections (``family``: ready lines) first, then the vanilla vs
    SRA regimes — setup, per-regime tables, alignment statistics, kept notes."""
    lines = [
        "# Convergence studies on the bundled digits", "",
        "Generated by `benchmarks/convergence.py` (tables, plots, raw numbers in "
        "`docs/convergence_results.json`); the notes sections are written by hand.", "",
        *(family or []),
        "## Vanilla vs SRA, one knob at a time (`--regimes headline,…`)", "",
        NOTES_BEGIN, notes.strip("\n"), NOTES_END, "",
        *_setup_lines(summaries, study),
        "![FD vs step](convergence.png)", "",
        *_summary_lines(summaries),
    ]
    for s in summaries:
        lines += _regime_lines(s)
    lines += ["", "\"SRA align\" is the logged alignment loss and \"cos(s,t)\" the plain cosine "
              "between projected student and teacher tokens, both averaged over the "
              "eval interval before the step (from each run's `metrics.jsonl`).", ""]
    lines += _diagnostics_lines(summaries)
    return "\n".join(lines)

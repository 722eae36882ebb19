"""Convergence study on the bundled digits: vanilla SiT vs SiT + SRA, several seeds each.

Every run trains the ``digits`` preset (or a named variant of it) with identical everything but
the alignment term, writing an EMA checkpoint every ``--eval-every`` steps (the training loop is
not touched: checkpoint_steps = milestone_steps = N, nothing pruned). Afterwards each checkpoint's
EMA draws the SAME class-balanced samples (fixed noise and labels for every run and step) with a
fixed sampler, and the digit classifier's Fréchet distance (FD) and class accuracy are computed
(:func:`sra.eval.digits.digits_metrics`).

Outputs (``--docs-dir``, default ``docs/``):

- ``convergence.md``: setup, one table per regime (mean ± std over seeds at every eval step), the
  plot, and the alignment statistics; text between ``<!-- notes:begin -->`` and
  ``<!-- notes:end -->`` of an existing file (the hand-written conclusion) is kept;
- ``convergence.png``: FD vs step, one panel per regime, mean line plus faint per-seed lines;
- ``convergence_results.json``: every run's raw numbers.

Runs are resumable: each finished run leaves ``WORK/results/ARM-sSEED.json`` and is skipped next
time; a half-trained run resumes from its last checkpoint. Each run uses one thread; ``--jobs``
runs go in parallel (spawned processes).

    python benchmarks/convergence.py --regimes headline --seeds 0,1,2 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

DEFAULT_WORK_DIR = Path("/tmp/sra-convergence")
DEFAULT_DOCS_DIR = ROOT / "docs"
BASE_PRESET = "digits"
EVAL_NOISE_SEED = 2024  # the same noise and labels for every run and every step
NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"
LATE_FRACTION = 2 / 3  # "late" summary: mean over eval steps ≥ this share of the last one


# -- what is compared ------------------------------------------------------------------------------
# An arm is a list of (dotted config path, value) overrides of the digits preset. Vanilla arms turn
# alignment off; an SRA arm differs from its vanilla arm only in the `align.*` fields.
ARMS: dict[str, tuple[tuple[str, Any], ...]] = {
    "vanilla": (("align.enabled", False),),
    "sra": (),  # the preset: s=2 → t=4, cos, λ 0.5, t_max 0.2, patch 4 (16 tokens)
    "sra-centered": (("align.loss_type", "cos-centered"),),
    "sra-lam2": (("align.weight", 2.0),),
    "sra-centered-lam2": (("align.loss_type", "cos-centered"), ("align.weight", 2.0)),
    "sra-s1t4": (("align.student_block", 1),),
    "sra-s2t5": (("align.teacher_block", 5),),
    "sra-tmax04": (("align.t_max", 0.4),),
    "vanilla-p2": (("align.enabled", False), ("model.patch_size", 2)),
    "sra-p2": (("model.patch_size", 2),),
    "sra-p2-centered": (("model.patch_size", 2), ("align.loss_type", "cos-centered")),
    # The paper's SiT-B/2 recipe (12 blocks, s=3 → t=8, λ 0.2) on the digits data.
    # Vanilla arms name their SRA arm's blocks too (unused in training) so the token
    # diagnostics compare the same pair of blocks in both arms.
    "vanilla-d12": (("align.enabled", False), ("model.depth", 12), ("align.student_block", 3),
                    ("align.teacher_block", 8)),
    "sra-d12": (("model.depth", 12), ("align.student_block", 3), ("align.teacher_block", 8),
                ("align.weight", 0.2)),
    # A short EMA horizon (≈33 steps, ~2 % of the run, like the paper's 10k of 400k steps) for the
    # teacher AND the evaluated weights; the preset's warm-up gives ≈ step/9 (11 % of the run).
    "vanilla-ema97": (("align.enabled", False), ("ema.decay", 0.97)),
    "sra-ema97": (("ema.decay", 0.97),),
}


@dataclass(frozen=True)
class Regime:
    """One comparison: a vanilla arm against an SRA arm (same model, data, seeds, steps)."""

    name: str
    vanilla: str
    sra: str
    description: str
    steps: int = 1500
    eval_every: int = 250


REGIMES: dict[str, Regime] = {r.name: r for r in (
    Regime("headline", "vanilla", "sra",
           "digits preset as is: depth 6, width 128, patch 4 (16 tokens), s=2→t=4, cos, λ 0.5, t_max 0.2"),
    Regime("centered", "vanilla", "sra-centered",
           "as headline, loss cos-centered (each image's mean token removed before the cosine)"),
    Regime("lam2", "vanilla", "sra-lam2", "as headline, λ 2"),
    Regime("centered-lam2", "vanilla", "sra-centered-lam2", "as headline, cos-centered and λ 2"),
    Regime("s1t4", "vanilla", "sra-s1t4", "as headline, student block 1 → teacher block 4"),
    Regime("s2t5", "vanilla", "sra-s2t5", "as headline, student block 2 → teacher block 5"),
    Regime("tmax04", "vanilla", "sra-tmax04", "as headline, t_max 0.4"),
    Regime("patch2", "vanilla-p2", "sra-p2", "patch 2 (64 tokens), otherwise the preset"),
    Regime("patch2-centered", "vanilla-p2", "sra-p2-centered", "patch 2 (64 tokens), cos-centered"),
    Regime("deep", "vanilla-d12", "sra-d12",
           "the paper's B/2 recipe: depth 12, s=3 → t=8, λ 0.2 (width 128, patch 4 as the preset)"),
    Regime("ema97", "vanilla-ema97", "sra-ema97",
           "as headline, EMA decay capped at 0.97 (teacher ≈33 steps behind instead of ≈step/9)"),
)}


@dataclass(frozen=True)
class StudyConfig:
    """Everything shared by all runs of a study invocation."""

    work_dir: Path = DEFAULT_WORK_DIR
    docs_dir: Path = DEFAULT_DOCS_DIR
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = None  # None → each regime's own
    eval_every: int | None = None
    samples: int = 500  # class-balanced EMA samples per evaluation
    sampler_mode: str = "heun"
    sampler_steps: int = 25
    cfg_scale: float = 1.0  # 1.0 = unguided (the primary number, like the paper's "w/o guidance")
    jobs: int = 2
    threads_per_job: int = 1
    batch_size: int | None = None  # None → the preset's 128
    extra: tuple[tuple[str, Any], ...] = field(default_factory=tuple)  # overrides for every run


@dataclass(frozen=True)
class RunSpec:
    arm: str
    seed: int
    steps: int
    eval_every: int

    @property
    def key(self) -> str:
        return f"{self.arm}-s{self.seed}"


# -- one run (executed in a worker process) -------------------------------------------------------
def arm_config(arm: str, extra: Sequence[tuple[str, Any]] = ()):
    """The preset with the arm's (and ``extra``) overrides applied."""
    from sra.training.config import override, preset

    cfg = preset(BASE_PRESET)
    for path, value in ARMS[arm] + tuple(extra):
        cfg = override(cfg, path, value)
    return cfg


def build_config(spec: RunSpec, study: StudyConfig):
    """The run's :class:`~sra.training.config.TrainConfig`: preset + arm overrides + evaluation plumbing."""
    from sra.training.config import override

    cfg = arm_config(spec.arm, study.extra)
    loop = {
        "max_train_steps": spec.steps, "checkpoint_steps": spec.eval_every,
        "keep_last": 10**6, "milestone_steps": spec.eval_every, "report_to": "none",
        "sample_steps": 0, "grid_samples": 1, "eval_digits": False, "seed": spec.seed,
    }
    if study.batch_size is not None:
        loop["global_batch_size"] = study.batch_size
    for name, value in loop.items():
        cfg = override(cfg, f"loop.{name}", value)
    cfg = override(cfg, "output_dir", str(study.work_dir / "runs"))
    return override(cfg, "exp_name", spec.key)


def eval_inputs(n: int, channels: int, size: int, num_classes: int):
    """Fixed noise (n, C, H, W) and class-balanced labels (n,) — identical for every run."""
    import torch

    g = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    noise = torch.randn(n, channels, size, size, generator=g)
    labels = torch.arange(n) % num_classes
    return noise, labels


def evaluate_checkpoint(ckpt_dir: Path, study: StudyConfig) -> dict:
    """Digit-classifier FD / accuracy of one checkpoint's EMA samples (fixed noise and labels)."""
    import torch

    from sra.eval.digits import digits_metrics
    from sra.sampling import SamplerConfig, generate
    from sra.checkpoints import load_model

    model, info = load_model(ckpt_dir)
    m = info["model_config"]
    noise, labels = eval_inputs(study.samples, m.in_channels, m.input_size, m.num_classes)
    sampler = SamplerConfig(mode=study.sampler_mode, steps=study.sampler_steps,
                            cfg_scale=study.cfg_scale, path_type=info.get("path_type", "linear"))
    with torch.no_grad():
        x = generate(model, noise, labels, sampler,
                     generator=torch.Generator().manual_seed(EVAL_NOISE_SEED))
    # Digits train in pixel space (kind "pixels"): model outputs are images in [-1, 1].
    return digits_metrics(x.clamp(-1, 1), labels)


def alignment_stats(metrics_jsonl: Path, steps: Sequence[int], window: int) -> dict[int, dict]:
    """Mean logged losses/cosines over the ``window`` steps before each of ``steps``."""
    rows = []
    if metrics_jsonl.exists():
        for line in metrics_jsonl.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    keys = ("loss", "denoise", "align", "cosine", "student_norm", "teacher_norm", "grad_norm")
    out = {}
    for s in steps:
        sel = [r for r in rows if s - window < r.get("step", -1) <= s]
        out[s] = {k: statistics.fmean(r[k] for r in sel) for k in keys
                  if sel and all(k in r for r in sel)}
    return out


DIAG_SAMPLES = 256  # real digits used for the token diagnostics
DIAG_SEED = 7


def token_diagnostics(ckpt_dir: Path, student_block: int, teacher_block: int,
                      t_max: float) -> dict:
    """How student and teacher tokens relate at a checkpoint, on fixed real digits.

    The student (trained weights; through the projector head when the run has one) sees x_t, the
    EMA teacher x_{t_T} with the same ε (as in training). Returns the plain cosine and the
    cosine after removing each image's mean token ("centered"), and for both sides the share of
    the squared token norm carried by that per-image mean token (the component shared by all
    tokens of an image).
    """
    import torch
    import torch.nn.functional as F

    from sra.data import build_dataset
    from sra.objectives import make_process
    from sra.objectives.denoising import FlowConfig
    from sra.checkpoints import load_model

    student, _ = load_model(ckpt_dir, weights="model", with_head=True)
    teacher, info = load_model(ckpt_dir, weights="ema")
    ds = build_dataset("digits")
    g = torch.Generator().manual_seed(DIAG_SEED)
    idx = torch.randperm(len(ds), generator=g)[:DIAG_SAMPLES].tolist()
    x0 = torch.stack([torch.as_tensor(ds[i][0]) for i in idx]).float()  # (N, 1, 16, 16)
    y = torch.tensor([int(ds[i][1]) for i in idx])
    proc = make_process("SiT", FlowConfig(path_type=info.get("path_type", "linear")))
    t = torch.rand(len(idx), generator=g)
    t_teacher = (t - t_max * torch.rand(len(idx), generator=g)).clamp(0, 1)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        s = student(proc.noisy(x0, eps, t), t, y, return_blocks=(student_block,),
                    project=student.config.use_head).features[student_block]  # (N, T, D)
        tt = teacher(proc.noisy(x0, eps, t_teacher), t_teacher, y, return_blocks=(teacher_block,),
                     stop_after=teacher_block).features[teacher_block]  # (N, T, D)

    def shared_share(z):  # |per-image mean token|² / mean |token|²
        return float((z.mean(1).pow(2).sum(-1) / z.pow(2).sum(-1).mean(1)).mean())

    sc, tc = s - s.mean(1, keepdim=True), tt - tt.mean(1, keepdim=True)
    return {
        "cos": float(F.cosine_similarity(s, tt, dim=-1).mean()),
        "cos_centered": float(F.cosine_similarity(sc, tc, dim=-1).mean()),
        "student_shared": shared_share(s), "teacher_shared": shared_share(tt),
        "blocks": [student_block, teacher_block],
        "projected": bool(student.config.use_head), "step": int(json.loads(
            (Path(ckpt_dir) / "meta.json").read_text())["step"]),
    }


def add_diagnostics(result: dict, study: StudyConfig) -> dict:
    """Token diagnostics of the run's last checkpoint (if still on disk)."""
    from sra import checkpoints as ckpts

    run_dir = study.work_dir / "runs" / f"{result['arm']}-s{result['seed']}"
    last = ckpts.latest_checkpoint(run_dir)
    if last is not None:
        a = arm_config(result["arm"]).align  # the arm's current definition names the blocks
        result["diagnostics"] = token_diagnostics(last, a.student_block, a.teacher_block, a.t_max)
    return result


def run_one(spec: RunSpec, study: StudyConfig) -> dict:
    """Train (or resume) one run, evaluate every checkpoint, write and return its result JSON."""
    os.environ.setdefault("OMP_NUM_THREADS", str(study.threads_per_job))
    import torch

    torch.set_num_threads(study.threads_per_job)
    from sra import checkpoints as ckpts
    from sra.training.loop import Trainer

    result_path = study.work_dir / "results" / f"{spec.key}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    cfg = build_config(spec, study)
    run_dir = Path(cfg.output_dir) / cfg.exp_name
    t0 = time.perf_counter()
    latest = ckpts.latest_checkpoint(run_dir)
    done = latest is not None and ckpts.read_meta(latest)["step"] >= spec.steps
    if not done:
        Trainer(cfg, resume="auto" if latest is not None else None).fit()
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    evals = []
    for path in ckpts.list_checkpoints(run_dir):
        step = int(ckpts.read_meta(path)["step"])
        if step % spec.eval_every == 0 and step <= spec.steps:
            evals.append({"step": step, **evaluate_checkpoint(path, study)})
    stats = alignment_stats(run_dir / "metrics.jsonl", [e["step"] for e in evals], spec.eval_every)
    for e in evals:
        e["train"] = stats.get(e["step"], {})
    result = {
        "arm": spec.arm, "seed": spec.seed, "steps": spec.steps, "eval_every": spec.eval_every,
        "overrides": [list(o) for o in ARMS[spec.arm] + tuple(study.extra)],
        "config": {"model": cfg.model.__dict__, "align": cfg.align.__dict__,
                   "lr": cfg.optim.learning_rate, "batch": cfg.loop.global_batch_size,
                   "ema_decay": cfg.ema.decay},
        "eval": evals, "train_s": train_s,
        # Since the SRA head is built after the backbone's init, one seed gives both arms the
        # same initial backbone; results written before that lack this key.
        "paired_init": True,
        "samples": study.samples,
        "sampler": {"mode": study.sampler_mode, "steps": study.sampler_steps,
                    "cfg_scale": study.cfg_scale},
    }
    add_diagnostics(result, study)
    result["eval_s"] = time.perf_counter() - t1
    result_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_path)  # a result file exists only when complete
    return result


def _run_worker(args: tuple[RunSpec, StudyConfig]) -> dict:
    return run_one(*args)


# -- aggregation ----------------------------------------------------------------------------------
def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _mean_over(res: dict, key: str, steps: Sequence[int]) -> float:
    vals = [e[key] for e in res["eval"] if e["step"] in steps and e[key] is not None]
    return statistics.fmean(vals) if vals else math.nan


def _diff(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """mean(a) − mean(b) and its standard error sqrt(s_a²/n_a + s_b²/n_b) (NaN if undefined)."""
    (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
    if len(a) < 2 or len(b) < 2:
        return ma - mb, math.nan
    return ma - mb, math.sqrt(sa**2 / len(a) + sb**2 / len(b))


def late_steps(steps: Sequence[int]) -> list[int]:
    """The eval steps of the "late" window (where curves have flattened): those ≥ LATE_FRACTION
    of the last one (1500 steps, every 250 → 1000, 1250, 1500)."""
    last = max(steps)
    return [s for s in sorted(steps) if s >= LATE_FRACTION * last - 1e-9]


def summarize_regime(regime: Regime, results: dict[str, dict]) -> dict:
    """Per-step mean/std of FD and accuracy for both arms, plus the late-window effect size."""
    arms = {}
    for role, arm in (("vanilla", regime.vanilla), ("sra", regime.sra)):
        runs = sorted((r for r in results.values() if r["arm"] == arm), key=lambda r: r["seed"])
        steps = sorted({e["step"] for r in runs for e in r["eval"]})
        table = {}
        for s in steps:
            fd = [e["fd"] for r in runs for e in r["eval"] if e["step"] == s]
            acc = [e["acc"] for r in runs for e in r["eval"] if e["step"] == s]
            table[s] = {"fd": _mean_std(fd), "acc": _mean_std(acc), "n": len(fd)}
        arms[role] = {"arm": arm, "seeds": [r["seed"] for r in runs], "table": table, "runs": runs}
    common = sorted(set(arms["vanilla"]["table"]) & set(arms["sra"]["table"]))
    window = late_steps(common) if common else []
    late: dict[str, Any] = {"steps": window}
    for role in ("vanilla", "sra"):
        runs = arms[role]["runs"]
        late[role] = {k: _mean_std([_mean_over(r, k, window) for r in runs]) for k in ("fd", "acc")}
    # Δ = SRA − vanilla of the means, ± its standard error (Welch), for every regime.
    for key in ("fd", "acc"):
        late[f"{key}_diff"] = _diff([_mean_over(r, key, window) for r in arms["sra"]["runs"]],
                                    [_mean_over(r, key, window) for r in arms["vanilla"]["runs"]])
    # Paired Δ where one seed gave both arms the same initial backbone and data order (runs made
    # after the head was moved behind the backbone's init): mean of the per-seed differences ±
    # its standard error. The noise streams still differ (the teacher's time draws random numbers).
    van = {r["seed"]: r for r in arms["vanilla"]["runs"]}
    pairs = [(r, van[r["seed"]]) for r in arms["sra"]["runs"]
             if r.get("paired_init") and r["seed"] in van]
    if pairs and len(pairs) == len(arms["sra"]["runs"]):
        for key in ("fd", "acc"):
            d = [_mean_over(a, key, window) - _mean_over(b, key, window) for a, b in pairs]
            m, sd = _mean_std(d)
            late[f"{key}_paired"] = (m, sd / math.sqrt(len(d)) if len(d) > 1 else math.nan)
            late["pairs"] = len(d)
    per_step = {st: _diff([_mean_over(r, "fd", [st]) for r in arms["sra"]["runs"]],
                          [_mean_over(r, "fd", [st]) for r in arms["vanilla"]["runs"]])
                for st in common}
    return {"regime": regime, "arms": arms, "late": late, "fd_diff_by_step": per_step}


def _fmt(ms: tuple[float, float], digits: int = 2) -> str:
    m, s = ms
    if math.isnan(m):
        return "–"
    if math.isnan(s):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def write_plot(summaries: list[dict], path: Path) -> Path | None:
    """FD vs step: one panel per regime, mean line + faint per-seed lines per arm."""
    if not summaries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(summaries)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows), squeeze=False)
    colors = {"vanilla": "tab:gray", "sra": "tab:red"}
    for ax, summ in zip(axes.flat, summaries):
        for role in ("vanilla", "sra"):
            arm = summ["arms"][role]
            for r in arm["runs"]:
                ax.plot([e["step"] for e in r["eval"]], [e["fd"] for e in r["eval"]],
                        color=colors[role], alpha=0.25, lw=0.8)
            steps = sorted(arm["table"])
            ax.plot(steps, [arm["table"][s]["fd"][0] for s in steps], color=colors[role], lw=2,
                    marker="o", ms=3, label=f"{arm['arm']} (n={len(arm['runs'])})")
        ax.set_title(summ["regime"].name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("digit-classifier FD (↓)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _eval_every(summaries: list[dict]) -> str:
    return "/".join(str(e) for e in sorted({s["regime"].eval_every for s in summaries})) or "N"


def markdown_report(summaries: list[dict], study: StudyConfig, notes: str) -> str:
    """The write-up: setup, per-regime tables, alignment statistics, kept notes."""
    from sra.training.config import preset

    p = preset(BASE_PRESET)
    lines = [
        "# Convergence study: vanilla SiT vs SiT + SRA on the bundled digits", "",
        "Generated by `benchmarks/convergence.py` (tables, plot, raw numbers in "
        "`docs/convergence_results.json`); the notes section is written by hand.", "",
        NOTES_BEGIN, notes.strip("\n"), NOTES_END, "",
        "## Setup", "",
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
        "![FD vs step](convergence.png)", "",
        "## Summary", "",
        "| regime | late steps | vanilla FD | SRA FD | Δ FD ± SE | paired Δ FD ± SE | "
        "vanilla acc | SRA acc | Δ acc ± SE | seeds (v/s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        late = s["late"]
        steps = late["steps"]
        span = f"{steps[0]}–{steps[-1]}" if len(steps) > 1 else (str(steps[0]) if steps else "–")
        lines.append(
            f"| {s['regime'].name} | {span} | {_fmt(late['vanilla']['fd'])} | "
            f"{_fmt(late['sra']['fd'])} | {_fmt(late['fd_diff'])} | "
            f"{_fmt(late.get('fd_paired', (math.nan, math.nan)))} | "
            f"{_fmt(late['vanilla']['acc'], 3)} | {_fmt(late['sra']['acc'], 3)} | "
            f"{_fmt(late['acc_diff'], 3)} | {len(s['arms']['vanilla']['runs'])}/"
            f"{len(s['arms']['sra']['runs'])} |")
    for s in summaries:
        reg = s["regime"]
        va, sa = s["arms"]["vanilla"], s["arms"]["sra"]
        lines += ["", f"## Regime `{reg.name}`", "", reg.description + ".", "",
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
                f"| {st} | {_fmt(vt['fd']) if vt else '–'} | {_fmt(stt['fd']) if stt else '–'} | "
                f"{_fmt(s['fd_diff_by_step'].get(st, (math.nan, math.nan)))} | "
                f"{_fmt(vt['acc'], 3) if vt else '–'} | {_fmt(stt['acc'], 3) if stt else '–'} | "
                f"{_fmt(_mean_std(al), 4)} | {_fmt(_mean_std(co), 4)} |")
    lines += ["", "\"SRA align\" is the logged alignment loss and \"cos(s,t)\" the plain cosine "
              "between projected student and teacher tokens, both averaged over the "
              "eval interval before the step (from each run's `metrics.jsonl`).", ""]
    diag_rows = []
    seen = set()
    for s in summaries:
        for role in ("vanilla", "sra"):
            arm = s["arms"][role]
            d = [r["diagnostics"] for r in arm["runs"] if "diagnostics" in r]
            if not d or arm["arm"] in seen:
                continue
            seen.add(arm["arm"])
            cols = [_fmt(_mean_std([x[k] for x in d]), 3) for k in
                    ("cos", "cos_centered", "student_shared", "teacher_shared")]
            blocks = "→".join(map(str, d[0].get("blocks", ("?", "?"))))
            diag_rows.append(f"| `{arm['arm']}` | {blocks} | {d[0]['step']} | {len(d)} | "
                             f"{'head' if d[0]['projected'] else 'raw'} | " + " | ".join(cols) + " |")
    if diag_rows:
        lines += ["## Token diagnostics at the last checkpoint", "",
                  f"{DIAG_SAMPLES} fixed real digits, random t, teacher time t − t_max·U; student "
                  "tokens after block s (through the head where the run has one; raw for vanilla), "
                  "EMA teacher tokens after block t. \"shared\" = |per-image mean token|² / mean "
                  "|token|²: the part of a token common to all tokens of the image.", "",
                  "| arm | blocks s→t | step | runs | student | cos | centered cos | "
                  "student shared | teacher shared |", "|---|---|---|---|---|---|---|---|---|",
                  *diag_rows, ""]
    return "\n".join(lines)


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
    results = {}
    res_dir = study.work_dir / "results"
    for f in sorted(res_dir.glob("*.json")) if res_dir.is_dir() else []:
        r = json.loads(f.read_text())
        if "diagnostics" not in r:  # runs finished before diagnostics existed
            add_diagnostics(r, study)
            if "diagnostics" in r:
                f.write_text(json.dumps(r, indent=1))
        if r["seed"] in study.seeds:
            results[f.stem] = r
    # The report covers every regime with finished runs, not only the ones run this time.
    summaries = [summarize_regime(reg, results) for reg in REGIMES.values()]
    summaries = [s for s in summaries if s["arms"]["sra"]["runs"]]
    docs = Path(study.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    md_path = docs / "convergence.md"
    notes = "## Conclusion\n\n(to be written)\n"
    if md_path.exists():
        text = md_path.read_text()
        if NOTES_BEGIN in text and NOTES_END in text:
            notes = text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0]
    md_path.write_text(markdown_report(summaries, study, notes))
    png = write_plot(summaries, docs / "convergence.png")
    json_path = docs / "convergence_results.json"
    json_path.write_text(json.dumps(_jsonable(summaries, results, study), indent=1))
    out = {"markdown": md_path, "json": json_path}
    if png:
        out["plot"] = png
    return out


# -- entry point ----------------------------------------------------------------------------------
def run_study(study: StudyConfig, regime_names: Sequence[str]) -> dict[str, Path]:
    """Train/evaluate every missing run of the regimes, then write the outputs."""
    from sra.errors import SraError

    unknown = [r for r in regime_names if r not in REGIMES]
    if unknown:
        raise SraError(f"unknown regime(s) {unknown}; allowed: {', '.join(REGIMES)}")
    regimes = [REGIMES[r] for r in regime_names]
    os.environ.setdefault("SRA_CACHE_DIR", str(study.work_dir / "cache"))
    from sra.eval.digits import load_digits_classifier

    load_digits_classifier()  # train the metric once, before workers race for it
    specs: dict[str, RunSpec] = {}
    for reg in regimes:
        for arm in (reg.vanilla, reg.sra):
            for seed in study.seeds:
                spec = RunSpec(arm, seed, study.steps or reg.steps, study.eval_every or reg.eval_every)
                specs.setdefault(spec.key, spec)
    todo = [s for s in specs.values()
            if not (study.work_dir / "results" / f"{s.key}.json").exists()]
    # Seed-major order: a partial study still holds complete (vanilla, SRA) pairs.
    todo.sort(key=lambda s: (s.seed, list(specs).index(s.key)))
    print(f"{len(specs) - len(todo)} runs done, {len(todo)} to go", flush=True)
    if study.jobs <= 1:
        for spec in todo:
            r = run_one(spec, study)
            print(f"done {spec.key}: train {r['train_s']:.0f}s eval {r['eval_s']:.0f}s", flush=True)
            write_outputs(study)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(study.jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_run_worker, (spec, study)): spec for spec in todo}
            for fut in as_completed(futs):
                r = fut.result()
                print(f"done {futs[fut].key}: train {r['train_s']:.0f}s eval {r['eval_s']:.0f}s "
                      f"last FD {r['eval'][-1]['fd']:.2f}", flush=True)
                write_outputs(study)
    return write_outputs(study)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", default="headline",
                    help=f"comma-separated regimes ({', '.join(REGIMES)})")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (each arm runs each)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the regime's)")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="evaluate the EMA every this many steps (default: the regime's)")
    ap.add_argument("--samples", type=int, default=500, help="samples per evaluation")
    ap.add_argument("--sampler-steps", type=int, default=25, help="Heun steps per sample")
    ap.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale (1 = unguided)")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch (default: preset)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained in parallel")
    ap.add_argument("--threads-per-job", type=int, default=1, help="torch threads per run")
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                    help="runs, per-run result JSONs and the classifier cache")
    ap.add_argument("--docs-dir", type=Path, default=DEFAULT_DOCS_DIR,
                    help="where convergence.md/.png/_results.json go")
    ap.add_argument("--set", action="append", default=[], metavar="PATH=JSON",
                    help="extra override for every run, e.g. model.depth=4 (value parsed as JSON)")
    ap.add_argument("--report-only", action="store_true",
                    help="only rewrite the outputs from finished runs")
    args = ap.parse_args(argv)
    extra = []
    for item in args.set:
        path, _, value = item.partition("=")
        try:
            extra.append((path, json.loads(value)))
        except json.JSONDecodeError:
            extra.append((path, value))
    study = StudyConfig(
        work_dir=args.work_dir, docs_dir=args.docs_dir,
        seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()), steps=args.steps,
        eval_every=args.eval_every, samples=args.samples, sampler_steps=args.sampler_steps,
        cfg_scale=args.cfg_scale, jobs=args.jobs, threads_per_job=args.threads_per_job,
        batch_size=args.batch_size, extra=tuple(extra),
    )
    names = [r.strip() for r in args.regimes.split(",") if r.strip()]
    if args.report_only:
        return write_outputs(study)
    return run_study(study, names)


if __name__ == "__main__":
    out = main()
    for k, v in out.items():
        print(f"{k}: {v}")

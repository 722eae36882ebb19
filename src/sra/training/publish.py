"""``sra export``: a run (or one of its checkpoints) → an upload-ready folder with a model card
that states the method, the data, the steps, the metrics found in the run dir and the exact
``sra sample`` command (the folder format is :mod:`sra.checkpoints.export`)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from sra import checkpoints as ckpts
from sra.checkpoints.export import write_export
from sra.errors import SraError
from sra.sampling.config import PRESETS, SamplerConfig
from sra.sampling.job import FAMILY_DEFAULTS
from sra.training.fid import EVAL_DIGITS_FILE
from sra.training.monitor import METRICS_FILE


def export_run(source: str | Path, out: str | Path, sampler_preset: str | None = None,
               repo_hint: str | None = None) -> Path:
    """Write ``out`` from a run dir or checkpoint dir ``source`` (its EMA weights)."""
    sd, info = ckpts.load_weights(source, weights="ema")
    if info.get("source") != "sra" or info.get("export"):
        raise SraError(f"{source} is not an sra run or checkpoint dir (export only runs trained here)")
    ckpt_dir = Path(info["path"])
    run_dir = ckpt_dir.parent.parent
    meta = info["meta"]
    cfg = meta.get("config") or {}
    family = (cfg.get("model") or {}).get("family", "SiT")
    path_type = (cfg.get("flow") or {}).get("path_type", "linear")
    sampler = recommended_sampler(cfg, family, sampler_preset)
    sampler = replace(sampler, path_type=path_type).to_dict()
    metrics = run_metrics(run_dir)
    config = {"model": cfg.get("model"), "data_info": cfg.get("data_info"), "path_type": path_type,
              "sampler": sampler, "step": meta.get("step"), "source": str(ckpt_dir),
              "metrics": metrics, "run_config": cfg}
    out = Path(out)
    card = model_card(config, out_name=repo_hint or str(out))
    return write_export(out, sd, config, card)


def recommended_sampler(cfg: dict, family: str, preset: str | None) -> SamplerConfig:
    """The sampler the card recommends: a named preset; else the run's own grid sampler for
    pixel data (what its sample grids showed); else the family's default (SiT SDE / DiT DDPM)."""
    if preset:
        if preset not in PRESETS:
            raise SraError(f"unknown sampler preset {preset!r}; allowed: {', '.join(PRESETS)}")
        return PRESETS[preset]
    grid = (cfg.get("loop") or {}).get("grid_sampler")
    if (cfg.get("data_info") or {}).get("kind") == "pixels" and isinstance(grid, dict):
        return SamplerConfig.from_dict({k: v for k, v in grid.items() if k != "path_type"})
    return FAMILY_DEFAULTS[family]


def run_metrics(run_dir: Path) -> dict:
    """What the run dir says about quality and training: the digits evaluation, the last logged
    losses, and the last in-training FID (or digits FD) record."""
    from sra.viz.curves import read_jsonl

    found: dict = {}
    ev = run_dir / EVAL_DIGITS_FILE
    if ev.is_file():
        found["eval_digits"] = json.loads(ev.read_text())
    rows = read_jsonl(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else []
    losses = [r for r in rows if "loss" in r]
    if losses:
        found["last_log"] = {k: losses[-1][k] for k in ("step", "loss", "denoise", "align")
                             if k in losses[-1]}
    quality = [r for r in rows if any(k in r for k in ("fid", "digits_fd"))]
    if quality:
        found["in_training_quality"] = quality[-1]
    return found


def sample_command(config: dict, ckpt: str) -> str:
    """The exact ``sra sample`` command for the recommended sampler."""
    s = config["sampler"]
    pixels = (config.get("data_info") or {}).get("kind") == "pixels"
    parts = [f"sra sample --ckpt {ckpt}", f"--mode {s['mode']}", f"--num-steps {s['steps']}",
             f"--cfg-scale {s['cfg_scale']}"]
    if s["guidance_low"] > 0 or s["guidance_high"] < 1:
        parts += [f"--guidance-low {s['guidance_low']}", f"--guidance-high {s['guidance_high']}"]
    parts += ["--num-samples 100 --format png" if pixels else "--num-samples 50000",
              "--output-dir samples"]
    return " \\\n    ".join(parts)


def _method(run: dict) -> str:
    align, groups = run.get("align") or {}, run.get("groups") or {}
    rep, disp = run.get("encoder_align") or {}, run.get("dispersive") or {}
    if run.get("align_target") == "encoder" and rep.get("enabled", True) and rep.get("weight", 0):
        irepa = rep.get("projector") == "conv" or rep.get("target_norm") == "zscore"
        method = (f"{'iREPA' if irepa else 'REPA'}: the student's block-{rep.get('student_block')} "
                  f"tokens through a {rep.get('projector', 'mlp')} projector are aligned (−cosine, "
                  f"λ {rep.get('weight')}) with {rep.get('encoder')}'s tokens of the clean image"
                  + (f" (z-scored over tokens, α {rep.get('zscore_alpha')})"
                     if rep.get("target_norm") == "zscore" else ""))
    elif run.get("align_target") == "encoder" or not align.get("enabled", True) \
            or not align.get("weight", 0):
        method = ("vanilla (no alignment)" if disp.get("weight", 0)
                  else "vanilla (denoising loss only, no alignment)")
    else:
        method = (f"SRA: the student's block-{align.get('student_block')} tokens through a projector "
                  f"head are aligned ({align.get('loss_type')}, λ {align.get('weight')}) with the EMA "
                  f"teacher's block-{align.get('teacher_block')} tokens at a less noisy time "
                  f"(gap ≤ {align.get('t_max')})")
    ratios = groups.get("mask_ratios") or []
    if len(ratios) > 1 or any(0 < r < 1 for r in ratios):
        method += (f"; token groups with mask ratio {ratios} (dual-time "
                   f"{'on' if groups.get('dual_time') else 'off'}, attention separation "
                   f"{'on' if groups.get('attention_separation') else 'off'}, teacher time "
                   f"{groups.get('teacher_t')})")
    if disp.get("weight", 0):
        method += (f"; Dispersive Loss ({disp.get('kind')}, λ {disp.get('weight')}, τ "
                   f"{disp.get('tau')}) on block {disp.get('block') or 'depth // 4'}'s raw tokens")
    untils = (rep if run.get("align_target") == "encoder" else align).get("until"), disp.get("until")
    until = next((u for u in untils if u is not None), None)
    if until is not None:
        method += f"; the alignment / dispersive terms switched off after step {until}"
    return method


def model_card(config: dict, out_name: str) -> str:
    """README.md of the export: front matter for the Hub, then method, data, training, metrics, use."""
    run = config.get("run_config") or {}
    model = config.get("model") or {}
    data = config.get("data_info") or {}
    loop = run.get("loop") or {}
    name = (run.get("model") or {}).get("name", "?")
    lines = [
        "---", "library_name: sra", "tags: [diffusion, self-representation-alignment, sit, dit]", "---",
        f"# {run.get('exp_name', 'sra run')} — {name}", "",
        "Trained with `sra` (Self-Representation Alignment for diffusion transformers). These "
        "are the EMA weights; load them with `--ckpt` pointing at this folder or its Hub copy "
        "(`hf://OWNER/REPO`).", "",
        "## Method", "", _method(run), "",
        "## Model", "",
        f"{model.get('family')} depth {model.get('depth')}, width {model.get('hidden_size')}, "
        f"{model.get('num_heads')} heads, patch {model.get('patch_size')}, input "
        f"{model.get('in_channels')}×{model.get('input_size')}×{model.get('input_size')}, "
        f"{model.get('num_classes')} classes; interpolant `{config.get('path_type')}`.", "",
        "## Data", "",
        f"`{(run.get('data') or {}).get('data_dir', '?')}` ({data.get('kind')}, {data.get('channels')} "
        f"channels, {data.get('size')}×{data.get('size')}"
        + (f", {data.get('resolution')} px images" if data.get("resolution") else "") + ").", "",
        "## Training", "",
        f"{config.get('step')} optimizer steps at global batch {loop.get('global_batch_size')}, "
        f"learning rate {(run.get('optim') or {}).get('learning_rate')}, EMA decay "
        f"{(run.get('ema') or {}).get('decay')}, mixed precision {loop.get('mixed_precision')}.", "",
        "## Metrics (as found in the run directory)", "",
    ]
    metrics = config.get("metrics") or {}
    if not metrics:
        lines.append("None recorded.")
    for key, value in metrics.items():
        lines.append(f"- **{key}**: `{json.dumps(value)}`")
    lines += ["", "## Sampling", "", "```bash", sample_command(config, out_name), "```", "",
              f"Sampler: `{json.dumps(config['sampler'])}`", ""]
    return "\n".join(lines)

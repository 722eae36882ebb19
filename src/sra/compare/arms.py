"""Runs → arms: runs whose resolved configs differ only in the seed and in run-local fields are
one arm; arms are named by the config keys that differ between them (or by ``--name-by``); the
baseline is the arm without an alignment term unless named."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

from sra.compare.runs import Run
from sra.errors import SraError

# Fields that do not change the trained function: where the run lives, what it logs and when,
# how it is split over processes (the global batch and data order are the same), how fast it
# runs. max_train_steps is here because no schedule depends on it (warm-up, λ decay and EMA
# decay count steps): a run stopped early is the same trajectory. The fid.* fields define the
# metric and are checked separately (sra.compare.metric).
RUN_LOCAL = ("output_dir", "exp_name", "loop.seed", "loop.report_to", "loop.log_every",
             "loop.checkpoint_steps", "loop.keep_last", "loop.milestone_steps",
             "loop.sample_steps", "loop.grid_samples", "loop.grid_sampler", "loop.eval_digits",
             "loop.eval_samples", "loop.max_train_steps", "loop.compile",
             "loop.max_consecutive_skips", "loop.gradient_accumulation_steps", "loop.dist_timeout",
             "data.num_workers",
             "model.fused_attn", "fid", "num_processes", "micro_batch_per_process", "compute_unit")
# Resolved from other fields (the data's shape, whether a head exists): they differ only when
# those do, so an arm's name leaves them out unless nothing else differs.
DERIVED = ("data_info", "model.use_head", "model.head", "model.head_out", "model.projector_dim",
           "model.input_size", "model.in_channels", "model.num_classes")
SIZE_KEYS = {
    "model size": ("model.name", "model.depth", "model.hidden_size", "model.num_heads",
                   "model.patch_size", "model.mlp_ratio"),
    "data": ("data.data_dir", "data.resolution", "data.image_dir", "data_info"),
}
REGULARISERS = ("dispersive",)  # further top-level terms with a weight (an alignment term if > 0)
SEED_SUFFIX = re.compile(r"[-_.]?(seed|s)?\d+$")


@dataclass
class Arm:
    """Runs of one trained function, differing only in seed; ``config`` is its shared part."""

    name: str
    runs: list[Run]
    config: dict[str, Any]

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → ``{"a.b": value}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _under(key: str, names: Sequence[str]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def trained_function(run: Run) -> dict[str, Any]:
    """The run's flattened config without its run-local fields."""
    return {k: v for k, v in flatten(run.config).items() if not _under(k, RUN_LOCAL)}


def fmt_value(v: Any) -> str:
    """A config value as it appears in an arm name (``0.5``, ``false``, ``[0.25]``)."""
    if isinstance(v, bool) or v is None or isinstance(v, (list, dict)):
        return json.dumps(v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Keys whose value is not the same in every config (a missing key counts as a value)."""
    keys = sorted(set().union(*configs)) if configs else []
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def form_arms(runs: Sequence[Run], name_by: Sequence[str] = ()) -> list[Arm]:
    """Group ``runs`` (in their order) into arms and name them."""
    groups: dict[str, Arm] = {}
    for run in runs:
        cfg = trained_function(run)
        key = json.dumps(cfg, sort_keys=True)
        groups.setdefault(key, Arm("", [], cfg)).runs.append(run)
    arms = list(groups.values())
    names = _names_by(arms, name_by) if name_by else _names_by_difference(arms)
    for arm, name in zip(arms, names):
        arm.name = name
    return arms


def _names_by_difference(arms: Sequence[Arm]) -> list[str]:
    keys = differing_keys([a.config for a in arms])
    shown = [k for k in keys if not _under(k, DERIVED)] or keys
    if not shown:
        return ["all"]
    return [",".join(f"{k}={fmt_value(a.config.get(k))}" for k in shown) for a in arms]


def _names_by(arms: Sequence[Arm], keys: Sequence[str]) -> list[str]:
    """Names from ``--name-by`` keys: the value alone for one key, ``k=v,…`` for several."""
    names = []
    for arm in arms:
        parts = [(k, _arm_value(arm, k)) for k in keys]
        names.append(parts[0][1] if len(parts) == 1 else ",".join(f"{k}={v}" for k, v in parts))
    if len(set(names)) < len(names):
        diff = differing_keys([a.config for a in arms])
        raise SraError(f"--name-by {','.join(keys)} gives two arms the same name; keys that "
                       f"differ between the arms: {', '.join(diff) or 'none'}")
    return names


def _arm_value(arm: Arm, key: str) -> str:
    """``key``'s value in the arm; values that differ only by a trailing seed number
    (``vanilla-s0``, ``vanilla-s1``) give their common part."""
    flat = [flatten(r.config) for r in arm.runs]
    if not any(key in f for f in flat):
        raise SraError(f"--name-by {key}: no such config key; e.g. {', '.join(sorted(flat[0])[:8])}")
    values = {fmt_value(f.get(key)) for f in flat}
    if len(values) > 1:
        values = {SEED_SUFFIX.sub("", v) for v in values}
    if len(values) > 1 or not next(iter(values)):
        raise SraError(f"--name-by {key}: its value differs within one arm "
                       f"({', '.join(sorted(fmt_value(f.get(key)) for f in flat))}); "
                       f"name arms by a key that is the same for all seeds of an arm")
    return values.pop()


def has_alignment(config: dict) -> bool:
    """Whether a run trains with an alignment term (SRA, REPA or a further regulariser)."""
    align, enc = config.get("align") or {}, config.get("encoder_align") or {}
    target = config.get("align_target", "ema")
    if target == "ema" and align.get("enabled", True) and (align.get("weight") or 0) > 0:
        return True
    if target == "encoder" and enc.get("enabled", True) and (enc.get("weight") or 0) > 0:
        return True
    return any(isinstance(config.get(n), dict) and config[n].get("enabled", True)
               and (config[n].get("weight") or 0) > 0 for n in REGULARISERS)


def pick_baseline(arms: Sequence[Arm], name: str | None) -> Arm:
    """The arm named ``name``; by default the first without an alignment term, else the first."""
    if name is not None:
        for arm in arms:
            if arm.name == name:
                return arm
        raise SraError(f"unknown --baseline {name!r}; allowed: {', '.join(a.name for a in arms)}")
    return next((a for a in arms if not has_alignment(a.runs[0].config)), arms[0])


def size_warnings(arms: Sequence[Arm]) -> list[str]:
    """One line per kind (model size, data) that differs between arms."""
    out = []
    for what, keys in SIZE_KEYS.items():
        diff = [k for k in differing_keys([a.config for a in arms]) if _under(k, keys)]
        if diff:
            vals = "; ".join(f"{k}: {', '.join(sorted({fmt_value(a.config.get(k)) for a in arms}))}"
                             for k in diff)
            out.append(f"the arms differ in {what} ({vals}): their {what} is part of what is compared")
    return out

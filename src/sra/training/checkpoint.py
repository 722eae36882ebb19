"""Checkpoints: our run format (safetensors + JSON, atomic, resumable) and the release's ``.pt``.

Layout of a run directory::

    RUN/config.json                   resolved config of the run
    RUN/checkpoints/step-0001000/     one complete checkpoint (renamed into place when complete)
        model.safetensors             student weights (with the SRA head)
        ema.safetensors               EMA weights (the teacher; what sampling uses)
        optimizer.pt  scaler.pt       optimizer / fp16 grad-scaler state (tensors only)
        rng-0.pt …                    RNG states of every process
        meta.json                     step, data position, config; written last

Nothing here executes pickled code: ``.pt`` files are read with ``torch.load(weights_only=True)``
(for the release's ``args`` only ``argparse.Namespace`` is allowed in addition).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from sra.errors import SraError
from sra.models import DiffusionTransformer, ModelConfig, build_model
from sra.models.registry import SIZES

FORMAT = "sra-ckpt-v1"
CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")


# -- RNG -------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors/lists only (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- safe loading ----------------------------------------------------------------------------------
def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` that refuses arbitrary pickled code (release ``args`` Namespaces allowed)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError & co: say what happened, in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SraError(f"cannot load {path} safely (only tensors and plain data are allowed): {first}") from None


def all_finite(module: nn.Module) -> bool:
    """Whether every parameter and buffer is finite."""
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


def _contiguous_cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


# -- our checkpoints -------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with ``meta.json``), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_RE.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def write_checkpoint_files(
    tmp_dir: Path, *, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
    scaler_state: dict | None, meta: dict,
) -> None:
    """Write the main process's files into ``tmp_dir`` (``meta.json`` last)."""
    save_file(_contiguous_cpu(model.state_dict()), tmp_dir / "model.safetensors")
    save_file(_contiguous_cpu(ema.state_dict()), tmp_dir / "ema.safetensors")
    torch.save(optimizer.state_dict(), tmp_dir / "optimizer.pt")
    if scaler_state:
        torch.save(scaler_state, tmp_dir / "scaler.pt")
    meta = dict(meta, format=FORMAT)
    with open(tmp_dir / "meta.json.tmp", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_dir / "meta.json.tmp", tmp_dir / "meta.json")


def finalize_checkpoint(tmp_dir: Path, final_dir: Path) -> None:
    """Atomically move a complete temporary checkpoint into place."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def prune_checkpoints(run_dir: str | Path, keep_last: int, milestone_every: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and every ``milestone_every``-th step."""
    ckpts = list_checkpoints(run_dir)
    removed = []
    for p in ckpts[: max(0, len(ckpts) - keep_last)]:
        step = int(_STEP_RE.match(p.name).group(1))
        if milestone_every > 0 and step % milestone_every == 0:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def read_meta(ckpt_dir: str | Path) -> dict:
    with open(Path(ckpt_dir) / "meta.json") as f:
        return json.load(f)


# -- architecture from weights ---------------------------------------------------------------------
def config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None,
                           family: str | None = None) -> ModelConfig:
    """Infer a :class:`ModelConfig` from a state dict's names and shapes (release or ours)."""
    try:
        w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
        hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        tokens = sd["pos_embed"].shape[1]
        out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
        num_classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    except (KeyError, ValueError, IndexError) as exc:
        raise SraError(f"not a SiT/DiT state dict (missing or odd entry: {exc})") from None
    grid = int(round(math.sqrt(tokens)))
    if num_heads is None:
        known = {(d, h): n for d, h, n in SIZES.values()}
        num_heads = known.get((depth, hidden), max(1, hidden // 64))
    fam = family or ("DiT" if out == 2 * in_ch else "SiT")
    head = sd.get("ap_head.linear1.weight")
    return ModelConfig(
        family=fam, depth=depth, hidden_size=hidden, num_heads=num_heads, patch_size=patch,
        input_size=grid * patch, in_channels=in_ch, num_classes=num_classes,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        projector_dim=None if head is None or head.shape[0] == 2 * hidden else head.shape[0],
        use_head=head is not None,
    )


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` whose failure is one readable line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint "
                         f"{tuple(sd[k].shape)} vs model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise SraError(f"checkpoint {source} does not fit this architecture: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir() and not (p / "meta.json").is_file():
        latest = latest_checkpoint(p)
        if latest is None:
            raise SraError(f"{p} holds no complete checkpoint (expected {CKPT_DIR}/step-*/meta.json)")
        return latest
    return p


def load_weights(path: str | Path, weights: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    """A state dict and what is known about it, from: a run dir (latest checkpoint), one of our
    checkpoint dirs, a release ``.pt`` (``model``/``ema``/``args``), or a bare ``.pt``/
    ``.safetensors`` state dict. ``weights`` picks ``ema`` or ``model`` where both exist."""
    if weights not in ("ema", "model"):
        raise SraError(f"unknown weights {weights!r}; allowed: ema, model")
    p = _resolve(path)
    if p.is_dir():
        meta = read_meta(p)
        return load_file(p / f"{weights}.safetensors"), {"source": "sra", "meta": meta, "path": str(p)}
    if p.suffix == ".safetensors":
        return load_file(p), {"source": "state_dict", "path": str(p)}
    obj = safe_torch_load(p)
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        sd = obj.get(weights) if obj.get(weights) is not None else obj.get("model")
        args = obj.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else (args or {})
        info = {"source": "release", "path": str(p), "args": args,
                "steps": obj.get("steps"), "epoch": obj.get("epoch")}
        return sd, info
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {"source": "state_dict", "path": str(p)}
    raise SraError(f"{p} is neither an sra checkpoint, a release checkpoint nor a state dict")


def load_model(
    path: str | Path, weights: str = "ema", device: str | torch.device = "cpu",
    with_head: bool = False,
) -> tuple[DiffusionTransformer, dict]:
    """A ready model (eval mode) and its info (``model_config``, ``data_info``, ``path_type``, …)."""
    sd, info = load_weights(path, weights)
    cfg = None
    if info["source"] == "sra":
        run_cfg = info["meta"].get("config", {})
        cfg = ModelConfig.from_dict(run_cfg["model"])
        info["data_info"] = run_cfg.get("data_info")
        info["path_type"] = run_cfg.get("flow", {}).get("path_type", "linear")
    else:
        args = info.get("args", {})
        heads = None
        if isinstance(args.get("model"), str):
            from sra.models.registry import parse_name

            try:
                _, size, _ = parse_name(args["model"])
                heads = SIZES[size][2]
            except SraError:
                heads = None
        cfg = config_from_state_dict(sd, num_heads=heads)
        info["path_type"] = args.get("path_type", "linear")
        res = args.get("resolution")
        if res:
            info["data_info"] = {"kind": "moments", "channels": cfg.in_channels,
                                 "size": cfg.input_size, "num_classes": cfg.num_classes,
                                 "latent_scale": 0.18215, "latent_bias": 0.0, "resolution": res}
    if not with_head and "ap_head.linear1.weight" in sd:
        sd = {k: v for k, v in sd.items() if not k.startswith("ap_head.")}
    from dataclasses import replace

    cfg = replace(cfg, use_head=with_head and cfg.use_head)
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, sd, str(info["path"]))
    info["model_config"] = cfg
    return model.to(device).eval(), info

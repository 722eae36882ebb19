"""Models from weights, wherever they come from: a run dir, one of our checkpoint dirs, the
release's ``.pt`` (``model``/``ema``/``args``), or a bare ``.pt``/``.safetensors`` state dict.

Sampling, the PCA figure, training's ``--init-from`` and the benchmarks all load through here.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from sra.checkpoints.export import export_problem, is_export, read_export
from sra.checkpoints.layout import (CKPT_DIR, META, latest_checkpoint, read_meta,
                                    verify_checkpoint, verify_member)
from sra.checkpoints.safe import check_state_dict, load_safetensors, safe_torch_load
from sra.data.base import SD_VAE_SCALE
from sra.errors import SraError, first_line
from sra.models import DiffusionTransformer, ModelConfig, build_model
from sra.models.registry import SIZES, parse_name


def config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None,
                           family: str | None = None, source: str | None = None) -> ModelConfig:
    """Infer a :class:`ModelConfig` from a state dict's names and shapes (release or ours).
    ``source`` (the file) prefixes the error message."""
    where = f"{source}: " if source else ""
    try:
        w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
        hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        tokens = sd["pos_embed"].shape[1]
        out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
        num_classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
        head = _head_fields(sd, hidden)
    except (KeyError, ValueError, IndexError, TypeError, AttributeError, ZeroDivisionError) as exc:
        raise SraError(f"{where}not a SiT/DiT state dict (missing or odd entry: {exc})") from None
    grid = int(round(math.sqrt(tokens)))
    if num_heads is None:
        known = {(d, h): n for d, h, n in SIZES.values()}
        num_heads = known.get((depth, hidden), max(1, hidden // 64))
    fam = family or ("DiT" if out == 2 * in_ch else "SiT")
    return ModelConfig(
        family=fam, depth=depth, hidden_size=hidden, num_heads=num_heads, patch_size=patch,
        input_size=grid * patch, in_channels=in_ch, num_classes=num_classes,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        **head,
    )


def _head_fields(sd: dict[str, torch.Tensor], hidden: int) -> dict:
    """The ModelConfig fields of a state dict's projector head (``ap_head``), from its shapes:
    SRA's (linear1, linear2), REPA's MLP (… linear3 to the encoder's width) or iREPA's conv."""
    conv, first, last = (sd.get(f"ap_head.{k}.weight") for k in ("conv", "linear1", "linear3"))
    if conv is not None:
        return dict(use_head=True, head="repa-conv", head_out=conv.shape[0])
    if first is None:
        return dict(use_head=False)
    if last is not None:
        return dict(use_head=True, head="repa", head_out=last.shape[0], projector_dim=first.shape[0])
    return dict(use_head=True, projector_dim=None if first.shape[0] == 2 * hidden else first.shape[0])


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` whose failure is one readable line."""
    check_state_dict(sd, f"checkpoint {source}")
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
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied into the parameter
        raise SraError(f"checkpoint {source} does not load: {first_line(exc, limit=200)}") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A local checkpoint file or dir for ``path``: a registry name, ``hf://`` or URL is fetched
    first (:mod:`sra.artefacts`); a run dir becomes its newest complete checkpoint."""
    from sra.artefacts import is_remote, resolve

    if is_remote(str(path)):
        path = resolve(str(path), what="checkpoint")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if is_export(p):
        return p
    if p.is_dir() and not (p / META).is_file():
        latest = latest_checkpoint(p)
        if latest is None:
            raise SraError(export_problem(p) or
                           f"{p} holds no complete checkpoint (expected {CKPT_DIR}/step-*/{META})")
        return latest
    return p


def load_weights(path: str | Path, weights: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    """A state dict and what is known about it, from: a run dir (latest checkpoint), one of our
    checkpoint dirs, an ``sra export`` folder, a release ``.pt`` (``model``/``ema``/``args``), or a bare ``.pt``/
    ``.safetensors`` state dict. ``weights`` picks ``ema`` or ``model`` where both exist.
    A checkpoint dir is verified first (sizes of all files, hash of the weights file read)."""
    if weights not in ("ema", "model"):
        raise SraError(f"unknown weights {weights!r}; allowed: ema, model")
    p = resolve_checkpoint(path)
    if is_export(p):  # `sra export`: the EMA weights only, whatever ``weights`` asks
        return read_export(p)
    if p.is_dir():
        name = f"{weights}.safetensors"
        verify_checkpoint(p, hashes=[name])
        meta = read_meta(p)
        sd = check_state_dict(load_safetensors(p / name), str(p / name))
        return sd, {"source": "sra", "meta": meta, "path": str(p)}
    if p.suffix == ".safetensors":
        verify_member(p)
        return check_state_dict(load_safetensors(p), str(p)), {"source": "state_dict", "path": str(p)}
    obj = safe_torch_load(p)
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        key = weights if obj.get(weights) is not None else "model"
        sd = check_state_dict(obj.get(key), f"{p} (entry {key!r})")
        args = obj.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else args
        info = {"source": "release", "path": str(p), "args": args if isinstance(args, dict) else {},
                "steps": obj.get("steps"), "epoch": obj.get("epoch")}
        return sd, info
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return check_state_dict(obj, str(p)), {"source": "state_dict", "path": str(p)}
    raise SraError(f"{p} is neither an sra checkpoint, a release checkpoint nor a state dict")


def load_model(
    path: str | Path, weights: str = "ema", device: str | torch.device = "cpu",
    with_head: bool = False,
) -> tuple[DiffusionTransformer, dict]:
    """A ready model (eval mode) and its info (``model_config``, ``data_info``, ``path_type``, …)."""
    sd, info = load_weights(path, weights)
    cfg = None
    if info["source"] == "sra":
        run_cfg = info["meta"].get("config")
        model_dict = run_cfg.get("model") if isinstance(run_cfg, dict) else None
        where = Path(info["path"]) / META
        if not isinstance(model_dict, dict):
            raise SraError(f"{where}: corrupt (no model config under 'config.model')")
        try:
            cfg = ModelConfig.from_dict(model_dict)
        except (TypeError, ValueError) as exc:
            raise SraError(f"{where}: corrupt model config ({exc})") from None
        info["data_info"] = run_cfg.get("data_info")
        flow = run_cfg.get("flow")
        info["path_type"] = flow.get("path_type", "linear") if isinstance(flow, dict) else "linear"
    else:
        args = info.get("args", {})
        heads = None
        if isinstance(args.get("model"), str):
            try:
                _, size, _ = parse_name(args["model"])
                heads = SIZES[size][2]
            except SraError:
                heads = None
        cfg = config_from_state_dict(sd, num_heads=heads, source=info["path"])
        info["path_type"] = args.get("path_type", "linear")
        res = args.get("resolution")
        if res:
            info["data_info"] = {"kind": "moments", "channels": cfg.in_channels,
                                 "size": cfg.input_size, "num_classes": cfg.num_classes,
                                 "latent_scale": SD_VAE_SCALE, "latent_bias": 0.0, "resolution": res}
    if not with_head:  # any head (SRA's, REPA's MLP, iREPA's conv) is dropped for sampling
        sd = {k: v for k, v in sd.items() if not k.startswith("ap_head.")}
    cfg = replace(cfg, use_head=with_head and cfg.use_head)
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, sd, str(info["path"]))
    info["model_config"] = cfg
    return model.to(device).eval(), info

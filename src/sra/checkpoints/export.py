"""The publishable form of a run (``sra export``): EMA weights, the config that rebuilds the
model, the sampler to use, and a model card, in one folder ready for ``huggingface-cli upload``.

Layout::

    OUT/model.safetensors   EMA weights, without the SRA head (inference never uses it)
    OUT/config.json         {"format": "sra-export-v1", "model": …, "data_info": …, "path_type": …,
                             "sampler": …, "step": …, "run_config": the run's resolved config}
    OUT/README.md           the model card

``--ckpt OUT`` (or ``--ckpt hf://owner/repo``, the same folder uploaded) loads it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from sra.checkpoints.safe import check_state_dict, load_safetensors, read_json
from sra.errors import SraError
from sra.oserrors import writing

EXPORT_FORMAT = "sra-export-v1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"


def is_export(path: Path) -> bool:
    """Whether ``path`` is a folder written by :func:`write_export`."""
    cfg = path / CONFIG
    if not (path.is_dir() and cfg.is_file() and (path / WEIGHTS).is_file()):
        return False
    try:
        return read_json(cfg).get("format") == EXPORT_FORMAT
    except SraError:
        return False


def export_problem(path: Path) -> str | None:
    """What is missing from ``path`` if it is an export folder that does not load (its config
    says so, or it holds the export's files but not its config); None if it is no export at all.
    """
    if not path.is_dir():
        return None
    cfg, weights = path / CONFIG, path / WEIGHTS
    if cfg.is_file():
        try:
            fmt = read_json(cfg).get("format")
        except SraError as exc:
            if not weights.is_file():
                return None
            return f"{path} holds an export's {WEIGHTS} but its {CONFIG} does not load ({exc})"
        if fmt != EXPORT_FORMAT:
            return None  # some other folder's config.json (e.g. a diffusers model)
        if not weights.is_file():
            return f"{path} is an sra export folder but its {WEIGHTS} is missing"
        return None
    if weights.is_file():  # the config is written last: an interrupted or partly copied export
        return (f"{path} holds {WEIGHTS} but no {CONFIG}: an incomplete sra export (the config is "
                f"written last; export the run again)")
    return None


def write_export(out: Path, state_dict: dict[str, torch.Tensor], config: dict, card: str) -> Path:
    """Write an export folder: every file is first written into a hidden staging folder inside
    ``out``, then all are renamed into place, the config last. So a write the OS refuses (a
    full disk) leaves a previous export in ``out`` as it was, and a folder with a config is
    complete."""
    created = not out.exists()
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if not k.startswith("ap_head.")}
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        with writing(out / WEIGHTS):
            save_file(sd, staging / WEIGHTS, metadata={"format": EXPORT_FORMAT})
        with writing(out / CARD):
            (staging / CARD).write_text(card, encoding="utf-8")
        with writing(out / CONFIG):
            text = json.dumps(dict(config, format=EXPORT_FORMAT), indent=2) + "\n"
            (staging / CONFIG).write_text(text, encoding="utf-8")
        for name in (WEIGHTS, CARD, CONFIG):  # renames in one folder: no space needed
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    return out


def read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, info) of an export folder, in :func:`sra.checkpoints.load_weights`'s terms:
    ``info["meta"]["config"]`` holds the model config, data info and path type."""
    cfg = read_json(path / CONFIG)
    if not isinstance(cfg.get("model"), dict):
        raise SraError(f"{path / CONFIG}: corrupt (no model config)")
    sd = check_state_dict(load_safetensors(path / WEIGHTS), str(path / WEIGHTS))
    meta = {"step": cfg.get("step"),
            "config": {"model": cfg["model"], "data_info": cfg.get("data_info"),
                       "flow": {"path_type": cfg.get("path_type", "linear")}}}
    return sd, {"source": "sra", "export": True, "meta": meta, "path": str(path),
                "sampler": cfg.get("sampler"), "steps": cfg.get("step")}

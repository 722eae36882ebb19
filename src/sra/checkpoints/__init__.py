"""Checkpoint files: safe reading (:mod:`.safe`), our run layout and its checks (:mod:`.layout`),
and models from any weights file (:mod:`.weights`). Training's writer is in
:mod:`sra.training.checkpoint`."""

from sra.checkpoints.layout import (CKPT_DIR, checkpoint_path, checkpoint_step, latest_checkpoint,
                                    list_checkpoints, read_meta, verify_checkpoint, write_manifest)
from sra.checkpoints.safe import file_sha256, load_safetensors, safe_torch_load
from sra.checkpoints.weights import (config_from_state_dict, load_model, load_state_dict_strict,
                                     load_weights)

__all__ = [
    "CKPT_DIR", "checkpoint_path", "checkpoint_step", "config_from_state_dict", "file_sha256", "latest_checkpoint",
    "list_checkpoints", "load_model", "load_safetensors", "load_state_dict_strict", "load_weights",
    "read_meta", "safe_torch_load", "verify_checkpoint", "write_manifest",
]

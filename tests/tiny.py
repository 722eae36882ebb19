"""Tiny things for tests: the digits training config shrunk by overrides only (same code path),
and tiny transformers whose every block gets gradients."""

import torch

from sra.models import ModelConfig, build_model
from sra.training.config import override, preset

TINY_OVERRIDES = {
    "model.depth": 4, "model.hidden_size": 32, "model.num_heads": 2, "align.student_block": 1,
    "align.teacher_block": 3, "loop.global_batch_size": 32, "loop.report_to": "none",
    "loop.sample_steps": 0, "loop.grid_samples": 4, "loop.eval_digits": False,
    "loop.log_every": 2, "loop.max_train_steps": 6, "loop.checkpoint_steps": 3, "exp_name": "run",
}


def tiny_config(output_dir, **kw):
    """The digits preset with ``TINY_OVERRIDES`` and then ``kw`` (dotted paths) applied."""
    cfg = preset("digits")
    for k, v in {**TINY_OVERRIDES, "output_dir": str(output_dir), **kw}.items():
        cfg = override(cfg, k, v)
    return cfg


def live_model(**model_kw) -> torch.nn.Module:
    """A transformer built from ``ModelConfig(**model_kw)`` with its adaLN-Zero and final layer
    perturbed: zero-initialised they would give most blocks no gradient."""
    model = build_model(ModelConfig(**model_kw))
    with torch.no_grad():
        for b in model.blocks:
            b.adaLN_modulation[1].weight.normal_(std=0.1)
        model.final_layer.linear.weight.normal_(std=0.1)
    return model

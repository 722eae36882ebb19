"""A tiny digits training config for tests: the preset shrunk by overrides only (same code path)."""

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

"""What each gloo process of tests/test_distributed.py runs (module level: spawned processes
import it). Every function takes the rank first and returns JSON-able results."""

from __future__ import annotations

from pathlib import Path


def _accelerator(tmp: Path):
    from sra.training.bookkeeping import build_accelerator
    from sra.training.config import LoopConfig

    return build_accelerator(LoopConfig(mixed_precision="no", report_to="none"), tmp / "tb")


def shared_run_dir(acc, tmp: Path, rank: int) -> dict:
    """Each process its own root (each node its own disk): refused on every process; one shared
    root: accepted, and the token is gone afterwards."""
    from sra.errors import SraError
    from sra.training.launch import check_shared_run_dir

    try:
        check_shared_run_dir(acc, tmp / f"node-{rank}" / "run")
        split = None
    except SraError as exc:
        split = str(exc)
    check_shared_run_dir(acc, tmp / "shared" / "run")
    acc.wait_for_everyone()
    return {"split": split, "left": sorted(p.name for p in (tmp / "shared" / "run").iterdir())}


def _tiny(out: Path, exp: str, steps: int):
    from sra.sampling.config import SamplerConfig
    from tiny import tiny_config

    return tiny_config(out, exp_name=exp, **{  # SRA + Dispersive Loss, both off after step 2
        "align.until": 2, "dispersive.weight": 0.5, "dispersive.until": 2,
        "loop.max_train_steps": steps, "loop.checkpoint_steps": 3,
        "loop.log_every": 1, "fid.every": 3, "fid.samples": 8, "fid.batch_size": 4,
        "fid.sampler": SamplerConfig(mode="euler", steps=2)})


def launch(rank: int, tmp: str) -> dict:
    """On two processes: the run-directory check (:func:`shared_run_dir`), then three runs:
    (a) SRA + Dispersive Loss, both switched off after step 2 (the head without a gradient from
    then on) with the digits probe; (b) the same with DDP's default settings; (c) (a) resumed to step 8, where only the
    main process may list and verify checkpoints."""
    import accelerate.utils
    import torch
    from safetensors.torch import load_file

    import sra.eval.digits as digits
    import sra.training.checkpoint as ckpt
    from sra.training.loop import Trainer

    import accelerate.state

    # Several runs share this process group: keep it when a run ends (a real run ends its process)
    accelerate.state.PartialState.destroy_process_group = lambda self, group=None: None
    accelerate.state.AcceleratorState.destroy_process_group = lambda self, group=None: None
    out = Path(tmp)
    res = {"run_dir": shared_run_dir(_accelerator(out), out, rank)}
    trainer = None
    real_load = digits.load_digits_classifier
    classifier_steps = []

    def load_recorded(*a, **k):  # when the probe's classifier is first needed, at which step
        classifier_steps.append(None if trainer is None else trainer.step)
        return real_load(*a, **k)

    digits.load_digits_classifier = load_recorded
    trainer = Trainer(_tiny(out, "a", 6))
    trainer.fit()
    res["classifier_steps"] = classifier_steps
    res["compute_local"], res["compute_total"] = trainer.clock._local, trainer.clock.total()

    real_kwargs = accelerate.utils.DistributedDataParallelKwargs
    accelerate.utils.DistributedDataParallelKwargs = lambda **kw: real_kwargs()  # DDP defaults
    trainer = Trainer(_tiny(out, "b", 6))
    accelerate.utils.DistributedDataParallelKwargs = real_kwargs
    trainer.grads_to_none = True  # as before gradient_as_bucket_view
    trainer.fit()
    if rank == 0:
        a = load_file(out / "a" / "checkpoints" / "step-0000006" / "ema.safetensors")
        b = load_file(out / "b" / "checkpoints" / "step-0000006" / "ema.safetensors")
        res["ddp_settings_identical"] = a.keys() == b.keys() and all(
            torch.equal(a[k], b[k]) for k in a)

    verified = []
    real_verify = ckpt.verify_checkpoint
    ckpt.verify_checkpoint = lambda d, *a, **k: (verified.append(Path(d).name), real_verify(d, *a, **k))[1]
    if rank == 1:  # this process's own view of the disk must not matter
        ckpt.list_checkpoints = lambda run_dir: []
    trainer = Trainer(_tiny(out, "a", 8), resume="auto")
    res["resumed_step"], res["verified"] = trainer.step, verified
    trainer.fit()
    return res

"""gpu_check's figures outside the training step: which SDPA backend the plain and the
attention-separation paths run, sampling throughput of the ``paper-256`` preset (extrapolated
from timed solver steps) with the fp32/bf16 sample difference, and Inception images/s of
``sra eval``."""

from __future__ import annotations

import contextlib
import time
import warnings

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import unzero_init
from flops import forward_macs
from gpu_check_base import Context, Peak, StepClock, error_row, free_memory, run_case, summarise
from gpu_check_train import B2, B2_DTS, LATENT, TINY_LATENT, TINY_CLASSES, NUM_CLASSES, train_config
from sra.devices import set_tf32
from sra.errors import first_line
from sra.models import build_model, model_config
from sra.sampling import SOLVERS, guided, preset
from sra.sampling.schedules import sampler_grid

SAMPLER = "paper-256"
BACKENDS = (("flash", "flash"), ("efficient", "efficient"), ("cudnn", "cudnn"), ("math", "math"),
            ("overrideable", "fused (other)"))


def autocast(ctx: Context, dtype: torch.dtype | None):
    return torch.autocast(ctx.device.type, dtype=dtype) if dtype else contextlib.nullcontext()


# -- SDPA backends --------------------------------------------------------------------------------
def _sdpa_step(ctx: Context, arm):
    """One forward + backward of the arm's objective (student and EMA teacher), bf16 autocast."""
    from sra.data.formats import moments_info
    from sra.training.config import build_objective, resolve_model_config
    from sra.training.ema import make_ema

    cfg = train_config(ctx, arm, "sdpa", 2)
    shape, classes = (TINY_LATENT, TINY_CLASSES) if ctx.tiny else (LATENT, NUM_CLASSES)
    mcfg = resolve_model_config(cfg, moments_info(shape, classes))
    model = build_model(mcfg).to(ctx.device)
    teacher = make_ema(model)
    objective = build_objective(cfg, mcfg)
    n = 2 if ctx.tiny else 16
    x0 = torch.randn(n, mcfg.in_channels, mcfg.input_size, mcfg.input_size, device=ctx.device)
    y = torch.randint(0, classes, (n,), device=ctx.device)

    def step() -> None:
        with autocast(ctx, torch.bfloat16):
            out = objective(model, teacher, x0, y, 0)
        out.total.backward()
        model.zero_grad(set_to_none=True)
        if ctx.cuda:
            torch.cuda.synchronize(ctx.device)

    return step


def _backend(op: str) -> str | None:
    return next((name for marker, name in BACKENDS if marker in op), None)


class _SdpaOps(TorchDispatchMode):
    """Records the SDPA ops that run (below autograd, so the backend's own op shows)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)  # e.g. aten._scaled_dot_product_flash_attention.default
        if "scaled_dot_product" in name and _backend(name):
            self.names.add(name)
        return func(*args, **(kwargs or {}))


def attention_kernels(step) -> list[str]:
    """CUDA kernel names with attention in them that one ``step`` launches (the profiler; where
    it cannot trace kernels, its error: the ops above still name the backend)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
        names = {e.key for e in prof.key_averages()}
    except RuntimeError as exc:
        return [error_row(exc)]
    keys = ("flash", "fmha", "attention", "cudnn")
    return sorted(n[:100] for n in names if any(k in n.lower() for k in keys))[:6]


def flash_only(step) -> str:
    """Whether ``step`` runs with SDPA restricted to flash attention (else torch's reason)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                step()
            return "ok"
        except RuntimeError as exc:
            why = [first_line(str(w.message), limit=160) for w in caught
                   if "flash" in str(w.message).lower()]
            return error_row(exc) + (f" ({why[0]})" if why else "")


def sdpa_path(ctx: Context, arm) -> dict:
    """The SDPA ops one step runs and the backend they name (forward and backward), the CUDA
    attention kernels, and whether the step runs with flash attention alone."""
    step = _sdpa_step(ctx, arm)
    step()  # warm-up: lazy initialisation stays out of what is recorded
    with _SdpaOps() as rec:
        step()
    ops = sorted(rec.names)
    return {"ops": ops, "kernels": attention_kernels(step) if ctx.cuda else [],
            "forward": sorted({_backend(o) for o in ops if "backward" not in o}),
            "backward": sorted({_backend(o) for o in ops if "backward" in o}),
            "flash_only": flash_only(step)}


def section_sdpa(ctx: Context) -> dict:
    paths = {"plain (SRA)": B2, "attention separation (DTS+AS)": B2_DTS}
    out = {name: run_case(ctx, f"SDPA backend: {name}", 15.0, lambda a=arm: sdpa_path(ctx, a))
           for name, arm in paths.items()}
    free_memory(ctx.device)
    return {"model": B2.label.split()[0], "paths": out}


# -- sampling -------------------------------------------------------------------------------------
def sampling_model(ctx: Context):
    """SiT-XL/2 at 256 px (tiny: a 3-block SiT), random weights with the adaLN-Zero gates opened
    (common.unzero_init) so every block computes; built on the device when it can be."""
    mcfg = (model_config("SiT-S/2", input_size=8, depth=3, hidden_size=32, num_heads=2,
                         num_classes=TINY_CLASSES, use_head=False) if ctx.tiny
            else model_config("SiT-XL/2", input_size=32, use_head=False))
    try:
        with torch.device(ctx.device):
            model = build_model(mcfg)
    except (RuntimeError, TypeError):  # some initialiser without device support: build on CPU
        model = build_model(mcfg)
    return unzero_init(model, seed=0).to(ctx.device).eval()


def solve(ctx: Context, model, cfg, noise, y, times, dtype) -> torch.Tensor:
    """What :func:`sra.sampling.generate` runs per batch — the guidance wrapper and the solver
    of ``cfg.mode`` — over the given slice of the preset's grid."""
    mcfg = model.config
    model_fn = guided(model, cfg, null_label=mcfg.num_classes, learn_sigma=mcfg.learn_sigma)
    g = torch.Generator(ctx.device).manual_seed(0)
    with torch.no_grad(), autocast(ctx, dtype):
        return SOLVERS[cfg.mode](model_fn, noise, y, times, cfg, generator=g)


@contextlib.contextmanager
def tf32(ctx: Context, on: bool):
    """TF32 on or off inside (the library's switch; a CPU has no TF32), then as before."""
    saved = torch.backends.cuda.matmul.allow_tf32
    set_tf32(on, ctx.device)
    try:
        yield
    finally:
        set_tf32(saved, ctx.device)


def grid_regimes(cfg) -> tuple[list[float], int, int, int]:
    """The grid, the network evaluations without and with guidance (doubled batch), and the
    first grid index inside the guidance interval."""
    grid = sampler_grid(cfg)
    evals = grid[:-1]  # the SDE evaluates the network at every time but the last
    inside = [cfg.cfg_scale != 1.0 and cfg.guidance_low <= t <= cfg.guidance_high for t in evals]
    return grid, inside.count(False), inside.count(True), inside.index(True)


def sampling_case(ctx: Context, model, cfg, batch: int, dtype, k: int) -> dict:
    grid, n_plain, n_guided, first_guided = grid_regimes(cfg)
    g = torch.Generator().manual_seed(batch)
    mcfg = model.config
    noise = torch.randn(batch, mcfg.in_channels, mcfg.input_size, mcfg.input_size, generator=g)
    noise = noise.to(ctx.device)
    y = torch.randint(0, mcfg.num_classes, (batch,), generator=g).to(ctx.device)
    per_eval = {}
    with Peak(ctx.device) as mem:
        for regime, start in (("plain", 0), ("guided", first_guided)):
            solve(ctx, model, cfg, noise, y, grid[start: start + 2], dtype)  # warm-up: 1 step
            clock = StepClock(ctx.device)
            clock.mark()
            solve(ctx, model, cfg, noise, y, grid[start: start + k + 1], dtype)
            clock.mark()
            per_eval[regime] = clock.seconds()[0] / k
    est = n_plain * per_eval["plain"] + n_guided * per_eval["guided"]
    flops = (n_plain + 2 * n_guided) * batch * 2 * forward_macs(mcfg)
    return {"plain_eval_s": per_eval["plain"], "guided_eval_s": per_eval["guided"],
            "estimated_run_s": est, "images_per_s": batch / est, "tflops_per_s": flops / est / 1e12,
            "peak_mem_bytes": mem.peak, "memory_kind": mem.kind}


def sample_difference(ctx: Context, model, cfg) -> dict:
    """Whole runs of the preset from the same noise: fp32+TF32 and bf16 against strict fp32."""
    from sra.sampling import generate

    n = 2 if ctx.tiny else 4  # strict fp32 runs at a fraction of the tensor-core rate
    g = torch.Generator().manual_seed(7)
    mcfg = model.config
    noise = torch.randn(n, mcfg.in_channels, mcfg.input_size, mcfg.input_size, generator=g)
    y = torch.randint(0, mcfg.num_classes, (n,), generator=g).to(ctx.device)
    noise = noise.to(ctx.device)
    runs = {}
    for name, on, dtype in (("fp32", False, None), ("fp32+tf32", True, None),
                            ("bf16", True, torch.bfloat16)):
        with tf32(ctx, on), autocast(ctx, dtype):
            gen = torch.Generator(ctx.device).manual_seed(0)
            runs[name] = generate(model, noise, y, cfg, generator=gen).float().cpu()
    ref, scale = runs["fp32"], float(runs["fp32"].std())
    out = {"batch": n, "steps": cfg.steps, "output_std": scale}
    for name in ("fp32+tf32", "bf16"):
        d = float((runs[name] - ref).abs().max())
        out[f"{name}_max_abs_diff"] = d
        out[f"{name}_rel_diff"] = d / scale if scale else d
    d = float((runs["bf16"] - runs["fp32+tf32"]).abs().max())
    out["bf16_vs_tf32_max_abs_diff"] = d
    return out


def section_sampling(ctx: Context) -> dict:
    cfg = preset(SAMPLER, steps=12) if ctx.tiny else preset(SAMPLER)
    k = 2 if ctx.tiny else 3
    batches = [2, 4, 8] if ctx.tiny else [64, 128, 256]
    precisions = (("fp32+tf32", None), ("bf16", torch.bfloat16))
    _grid, n_plain, n_guided, _ = grid_regimes(cfg)
    made = run_case(ctx, "sampling: build model", 20.0, lambda: {"model": sampling_model(ctx)})
    out = {"sampler": cfg.to_dict(), "preset": SAMPLER, "timed_steps_per_regime": k,
           "plain_evaluations": n_plain, "guided_evaluations": n_guided, "cases": []}
    if made["status"] != "ok":
        return dict(out, status=made["status"])
    model = made.pop("model")
    out["model"] = "tiny SiT" if ctx.tiny else "SiT-XL/2"
    for b in batches:
        for name, dtype in precisions:
            est = 4.0 * b / 64
            with tf32(ctx, True):
                rec = run_case(ctx, f"sampling batch {b} {name}", est,
                               lambda: sampling_case(ctx, model, cfg, b, dtype, k))
            out["cases"].append({"batch": b, "precision": name, **rec})
    out["difference"] = run_case(ctx, "sampling: fp32 / TF32 / bf16 difference", 40.0,
                                 lambda: sample_difference(ctx, model, cfg))
    del model
    free_memory(ctx.device)
    return out


# -- Inception ------------------------------------------------------------------------------------
def inception_figures(ctx: Context) -> dict:
    """``sra eval``'s ``compute_activations`` over an npz (reading, transfer, features and their
    statistics), then the network alone on a device-resident uint8 batch."""
    from sra.data.adm_npz import NpzImages
    from sra.eval.evaluate import compute_activations
    from sra.eval.inception import InceptionFeatures, save_random_inception_weights

    n, side, batch, repeats = (2, 32, 2, 1) if ctx.tiny else (1000, 256, 100, 5)
    weights = save_random_inception_weights(ctx.work / "inception-random.safetensors")
    net = InceptionFeatures(weights, device=ctx.device)
    images = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    npz = ctx.work / "inception-samples.npz"
    np.savez(npz, arr_0=images)
    x = torch.from_numpy(images[:batch]).permute(0, 3, 1, 2).contiguous().to(ctx.device)
    if not ctx.tiny:  # warm-up (cuDNN handles, kernels); a CPU forward would cost a second
        net(x)
    t0 = time.perf_counter()
    compute_activations(NpzImages(npz), net, batch_size=batch, progress=False)
    wall = time.perf_counter() - t0
    clock = StepClock(ctx.device)
    for _ in range(repeats):
        clock.mark()
        net(x)
    clock.mark()
    network = summarise(clock.seconds())
    return {"images": n, "image_size": side, "batch": batch, "weights": "random (speed only)",
            "network_images_per_s": batch / network["median_s"],
            "eval_images_per_s": n / wall, "eval_wall_s": wall}


def section_inception(ctx: Context) -> dict:
    try:  # sra eval's network is torch-fidelity's Inception port; nothing else is honest
        import torch_fidelity  # noqa: F401
    except ImportError:
        ctx.log("  inception: skipped: torch-fidelity missing")
        return {"status": "skipped: torch-fidelity missing"}
    rec = run_case(ctx, "inception", 30.0, lambda: inception_figures(ctx))
    free_memory(ctx.device)
    return rec

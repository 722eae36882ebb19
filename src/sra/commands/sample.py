"""``sra sample``: draw samples from a checkpoint into PNGs and/or the ADM ``.npz``.

    sra sample --ckpt runs/sit-b2 --preset paper-256 --num-samples 50000 --output-dir out/fid
    accelerate launch -m sra.cli sample --ckpt SiT-XL-2-SRA.pt --preset paper-256 --output-dir out
    sra sample --ckpt dit.pt --mode ddpm --num-steps 250 --cfg-scale 1.5 --guidance-channels 3

Sample i gets the same noise and label for any number of processes; rerunning the same command
resumes (finished batches are kept). The release's flag names are accepted as aliases
(--num-fid-samples, --global-seed, --sample-dir, --mode ode [--heun]).
"""

from __future__ import annotations

import argparse
import os

# Release (REPA/SRA generate.py) mode names → ours.
_MODE_ALIASES = {"ode": "euler"}
_FORMATS = {"npz": ("npz",), "png": ("png",), "both": ("png", "npz")}


def register(subparsers) -> None:
    """Add ``sra sample``."""
    from sra.commands._args import str2bool
    from sra.diffusion.paths import PATHS
    from sra.sampling.config import MODES, PRESETS
    from sra.sampling.decode import DATA_KINDS, ROUNDINGS
    from sra.sampling.job import MIXED_PRECISIONS
    from sra.sampling.seeding import LABEL_MODES

    p = subparsers.add_parser(
        "sample", help="generate samples (PNGs / ADM .npz) from a checkpoint",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", required=True,
                   help="run dir (latest checkpoint), checkpoint dir, an `sra export` folder, release "
                   ".pt, or state dict; or a registry name (e.g. sra-sit-xl2-256, see `sra "
                   "artefacts`), hf://owner/repo/path, or an https:// URL")
    g.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="which weights of a checkpoint to sample from (default: ema)")
    g.add_argument("--data-kind", choices=DATA_KINDS, default=None,
                   help="what the model makes, for checkpoints without data info: 'pixels' "
                   "(images in [-1, 1]) or 'moments' (VAE latents, decoded with --vae)")
    g.add_argument("--latent-scale", type=float, default=None,
                   help="latent scale used in training (z·scale + bias); decoding divides by it "
                   "(default: the checkpoint's, 0.18215 for the SD VAE)")
    g.add_argument("--latent-bias", type=float, default=None,
                   help="latent bias used in training (default: the checkpoint's, 0)")

    g = p.add_argument_group("sampler (a --preset fills defaults; explicit flags override)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="paper settings, e.g. paper-256 = SDE 250 steps, CFG 1.8, guidance for "
                   "t ≤ 0.7 (default: SiT sde / DiT ddpm, 250 steps, no guidance)")
    g.add_argument("--mode", choices=MODES + tuple(_MODE_ALIASES), default=None,
                   help="solver: euler, heun, sde (SiT); ddpm, ddim (DiT); 'ode' = euler (release)")
    g.add_argument("--heun", action="store_true",
                   help="Heun instead of Euler for the ODE (release flag; = --mode heun)")
    g.add_argument("--num-steps", type=int, default=None, help="solver / respaced DDPM steps")
    g.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale w (1 = no guidance)")
    g.add_argument("--guidance-low", type=float, default=None,
                   help="guidance only for t ≥ this (t in [0, 1]; DiT: step/1000)")
    g.add_argument("--guidance-high", type=float, default=None,
                   help="guidance only for t ≤ this (paper: 0.7)")
    g.add_argument("--guidance-channels", type=int, default=None,
                   help="guide only the first N latent channels (3 = the DiT release); default all")
    g.add_argument("--path-type", choices=sorted(PATHS), default=None,
                   help="SiT interpolant (default: the checkpoint's, else linear)")
    g.add_argument("--ddim-eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    g.add_argument("--state-dtype", choices=("float32", "float64"), default=None,
                   help="dtype of the solver state (float64 like the release)")
    g.add_argument("--mixed-precision", choices=tuple(MIXED_PRECISIONS), default=None,
                   help="autocast the network (default: $ACCELERATE_MIXED_PRECISION or 'no': fp32 "
                   "weights and activations, the paper's setting); bf16 is faster and changes "
                   "samples by a little (see the README's FID-50K part for the measured effect)")
    g.add_argument("--allow-tf32", "--tf32", dest="allow_tf32", type=str2bool, nargs="?", const=True,
                   default=True, metavar="BOOL",
                   help="on a GPU, TF32 matmuls and convolutions for the fp32 network, as the "
                   "release's generate.py does (default: true); false or --no-tf32: full fp32")
    g.add_argument("--no-tf32", dest="allow_tf32", action="store_false",
                   help="the release's flag for --allow-tf32 false")

    g = p.add_argument_group("samples")
    g.add_argument("--num-samples", "--num-fid-samples", dest="num_samples", type=int,
                   default=50_000, help="how many samples (default 50000)")
    g.add_argument("--per-proc-batch-size", type=int, default=32,
                   help="batch per process; fixes the batches, keep it to resume or compare")
    g.add_argument("--seed", "--global-seed", dest="seed", type=int, default=0,
                   help="sample i depends on (seed, i) only, whatever the number of processes")
    g.add_argument("--labels", choices=LABEL_MODES, default="balanced",
                   help="class labels: balanced (every class N/K times) or random")
    g.add_argument("--class-label", type=int, default=None, help="all samples of this class")

    g = p.add_argument_group("output")
    g.add_argument("--output-dir", "--sample-dir", dest="output_dir", default="samples",
                   help="output folder (rerun the same command to resume)")
    g.add_argument("--format", choices=tuple(_FORMATS), default="npz",
                   help="npz = the ADM samples.npz (arr_0 uint8 N×H×W×3); png = one PNG per "
                   "sample; both")
    g.add_argument("--rounding", choices=ROUNDINGS, default="round",
                   help="to uint8 from 255·(x+1)/2: round to nearest, or truncate like the "
                   "release's generate.py (≈0.5 darker on average)")
    g.add_argument("--vae", default=None,
                   help="diffusers AutoencoderKL hub id or folder for latent models "
                   "(default: stabilityai/sd-vae-ft-ema)")
    g.add_argument("--vae-batch-size", type=int, default=None,
                   help="decode latents in chunks of this size (default: whole batch)")
    g.add_argument("--grid-size", type=int, default=64,
                   help="put the first N samples into grid.png (0: no grid)")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def sampler_overrides(args: argparse.Namespace) -> dict:
    """The sampler settings given explicitly on the command line."""
    from sra.errors import SraError

    mode = _MODE_ALIASES.get(args.mode, args.mode)
    if args.heun:
        if mode not in (None, "euler", "heun"):
            raise SraError(f"--heun is for the ODE (--mode ode/euler/heun), not --mode {args.mode}")
        mode = "heun"
    over = {"mode": mode, "steps": args.num_steps, "cfg_scale": args.cfg_scale,
            "guidance_low": args.guidance_low, "guidance_high": args.guidance_high,
            "guidance_channels": args.guidance_channels, "path_type": args.path_type,
            "ddim_eta": args.ddim_eta, "state_dtype": args.state_dtype}
    return {k: v for k, v in over.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from sra.sampling.job import SampleJobConfig
    from sra.sampling.runner import run_sampling
    from sra.viz.grid import save_grid

    mixed = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    job = SampleJobConfig(
        ckpt=args.ckpt, num_samples=args.num_samples, batch_size=args.per_proc_batch_size,
        seed=args.seed, labels=args.labels, class_label=args.class_label,
        output_dir=args.output_dir, formats=_FORMATS[args.format], rounding=args.rounding,
        vae=args.vae, vae_batch_size=args.vae_batch_size, weights=args.weights,
        mixed_precision=mixed, preset=args.preset, sampler_overrides=sampler_overrides(args),
        data_kind=args.data_kind, latent_scale=args.latent_scale, latent_bias=args.latent_bias,
        grid_size=args.grid_size, progress=not args.no_progress, allow_tf32=args.allow_tf32,
    )
    cpu = args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    path = run_sampling(job, state, write_grid=save_grid)
    if state.is_main_process:
        print(f"{job.num_samples} samples in {path}")
    return 0

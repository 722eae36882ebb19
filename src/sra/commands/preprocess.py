"""``sra preprocess``: ImageNet images → ADM-cropped PNGs → SD-VAE latents (release + packed).

    sra preprocess images --source imagenet/train --dest data/images --resolution 256
    accelerate launch -m sra.cli preprocess encode --source data/images --dest data/latents
    sra preprocess pack --source release/vae-sd.zip --dest data/packed
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


_DESCRIPTION = __doc__


def _setup_logging() -> None:
    # Skipped-image warnings must reach the user even when nothing configured logging.
    logger = logging.getLogger("sra.data")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("sra: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _parse_layouts(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(subparsers) -> None:
    """Add ``sra preprocess {images,encode,pack}``."""
    from sra.data.base import SD_VAE_SCALE
    from sra.data.encode_config import LAYOUTS, EncodeConfig
    from sra.data.formats import DEFAULT_SHARD_SIZE
    from sra.data.images import DEFAULT_PNG_COMPRESS, SMALL_POLICIES, ImagesConfig
    from sra.data.vae import DEFAULT_VAE, VAE_DTYPES

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = subparsers.add_parser(
        "preprocess", help="prepare ImageNet-style data: crop images, encode VAE latents, pack",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    steps = parser.add_subparsers(dest="step", metavar="STEP")

    p = steps.add_parser(
        "images", formatter_class=fmt, help="image tree/ZIP → ADM center-cropped PNGs (images/ layout)",
        description="Crop a class-per-folder image tree (ImageNet train/) or a ZIP with the ADM "
        "center crop and write the edm2/release images layout (folder or .zip, with dataset.json; "
        "classes indexed in sorted folder order). A folder output resumes after an interruption. "
        "Every run leaves a JSON report naming each skipped input (with its reason), each upscaled "
        "input and each non-image file: DEST/preprocess_report.json, or DEST.report.json beside a ZIP.",
    )
    p.add_argument("--source", required=True, help="input folder (one subfolder per class) or .zip")
    p.add_argument("--dest", required=True, help="output folder, or a path ending in .zip")
    p.add_argument("--resolution", type=int, default=ImagesConfig.resolution,
                   help="output side in pixels (256 or 512)")
    p.add_argument("--small", choices=SMALL_POLICIES, default=ImagesConfig.small,
                   help="inputs whose short side is below --resolution: upscale (as ADM) or skip")
    p.add_argument("--png-compress", type=int, default=DEFAULT_PNG_COMPRESS,
                   help="PNG compression level 0..9 (0 = uncompressed, fastest to decode)")
    p.add_argument("--workers", type=int, default=ImagesConfig.workers, help="parallel crop processes")
    p.add_argument("--limit", type=int, default=None, help="only the first N inputs (for a trial)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_images)

    p = steps.add_parser(
        "encode", formatter_class=fmt, help="images → SD-VAE mean‖std latents (vae-sd/ + packed/)",
        description="Encode images to the VAE posterior mean‖std (float32, 8×H/8×W/8) in batches, "
        "one shard of the inputs per process under `accelerate launch`. Writes DEST/vae-sd (the "
        "release layout) and DEST/packed (memory-mapped shards). Rerun the same command to resume.",
    )
    p.add_argument("--source", required=True,
                   help="images layout folder/ZIP (from `preprocess images`), or a raw tree with --crop")
    p.add_argument("--dest", required=True, help="output folder (new, empty, or an earlier run to resume)")
    p.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL: hub id or local folder")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels; checked against the images (required with --crop)")
    p.add_argument("--crop", action="store_true",
                   help="ADM-crop raw images on the fly (no separate `preprocess images` step)")
    p.add_argument("--small", choices=SMALL_POLICIES, default=EncodeConfig.small,
                   help="with --crop: inputs below --resolution are upscaled (as ADM) or skipped")
    p.add_argument("--flip", action="store_true",
                   help="also encode horizontally flipped copies (latent files N..2N-1)")
    p.add_argument("--batch-size", type=int, default=EncodeConfig.batch_size,
                   help="images per VAE call, per process")
    p.add_argument("--workers", type=int, default=EncodeConfig.workers,
                   help="image-decoding workers per process")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="inputs per work shard and packed file (the unit of resumption)")
    p.add_argument("--layouts", type=_parse_layouts, default=LAYOUTS,
                   help="comma-separated outputs: release (vae-sd/ per-file .npy), packed")
    p.add_argument("--latent-scale", type=float, default=None,
                   help=f"latent scale stored with the packed data (default {SD_VAE_SCALE})")
    p.add_argument("--dtype", choices=tuple(VAE_DTYPES), default=EncodeConfig.dtype,
                   help="VAE compute dtype (latents are stored as float32 either way)")
    p.add_argument("--limit", type=int, default=None, help="only the first N inputs (for a trial)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_encode)

    p = steps.add_parser(
        "pack", formatter_class=fmt, help="release vae-sd folder/ZIP → packed format",
        description="Convert existing release latents (vae-sd/ folder or ZIP, unchanged) into the "
        "packed format (a few memory-mapped shards + labels + header).",
    )
    p.add_argument("--source", required=True, help="release vae-sd folder or ZIP (or a folder holding one)")
    p.add_argument("--dest", required=True, help="output folder for the packed data")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard file")
    p.add_argument("--latent-scale", type=float, default=None,
                   help=f"latent scale stored with the data (default {SD_VAE_SCALE})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_pack)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen step (``preprocess`` alone prints its help)."""
    return int(args.func(args))


def run_images(args: argparse.Namespace) -> int:
    """``sra preprocess images``."""
    from sra.data.images import ImagesConfig, preprocess_images

    _setup_logging()
    cfg = ImagesConfig(
        source=args.source, dest=args.dest, resolution=args.resolution, small=args.small,
        png_compress=args.png_compress, workers=args.workers, limit=args.limit,
        progress=not args.no_progress,
    )
    report = preprocess_images(cfg)
    print(json.dumps({
        "dest": report.dest, "inputs": report.total, "written": report.written,
        "reused": report.reused, "skipped": len(report.skipped), "upscaled": len(report.upscaled),
        "not_images": len(report.not_images), "num_classes": report.num_classes,
        "report": report.report_path,
    }))
    return 0


def run_encode(args: argparse.Namespace) -> int:
    """``sra preprocess encode``."""
    from sra.data.base import SD_VAE_SCALE
    from sra.data.encode import EncodeConfig, encode_images, report_dict

    _setup_logging()
    cfg = EncodeConfig(
        source=args.source, dest=args.dest, vae=args.vae, resolution=args.resolution,
        crop=args.crop, small=args.small, flip=args.flip, batch_size=args.batch_size,
        workers=args.workers, shard_size=args.shard_size, layouts=args.layouts,
        latent_scale=SD_VAE_SCALE if args.latent_scale is None else args.latent_scale,
        dtype=args.dtype, limit=args.limit, progress=not args.no_progress,
    )
    report = encode_images(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:
        d = report_dict(report)
        d.pop("skipped"), d.pop("upscaled")
        print(json.dumps(d))
    return 0


def run_pack(args: argparse.Namespace) -> int:
    """``sra preprocess pack``."""
    from sra.data.release import pack_release

    _setup_logging()
    ds = pack_release(args.source, args.dest, shard_size=args.shard_size,
                      latent_scale=args.latent_scale, progress=not args.no_progress)
    print(json.dumps({"dest": args.dest, "samples": len(ds), "info": ds.info.to_dict()}))
    return 0


__all__ = ["register", "run", "run_images", "run_encode", "run_pack"]

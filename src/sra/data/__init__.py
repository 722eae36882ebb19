"""Opening a dataset by name (bundled digits, release ``vae-sd`` latents, packed latents).

Training, sampling and evaluation open data through :func:`build_dataset` and see one interface:
``(x, y)`` items plus ``.info`` (:class:`~sra.data.base.DataInfo`); with ``with_images=True``
latent items are ``(x, image_uint8, y)`` (:mod:`sra.data.paired`, for REPA's encoder). The
submodules also hold the preprocessing that makes such data (``images``, ``encode``) and the
layouts' names (``formats``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch.utils.data import Dataset

from sra.data.base import SD_VAE_SCALE, DataInfo, decode_scale, draw_latents
from sra.data.formats import PACKED_DIR, is_packed
from sra.data.vae import DEFAULT_VAE
from sra.errors import SraError

__all__ = [
    "SD_VAE_SCALE", "DataConfig", "DataInfo", "decode_scale", "draw_latents", "build_dataset", "dataset_kind",
]

DIGITS = "digits"


@dataclass(frozen=True)
class DataConfig:
    """Which data a run trains on, and how it is loaded."""

    data_dir: str = DIGITS  # "digits", a release vae-sd dir/ZIP, or a packed dir
    resolution: int | None = None  # image resolution (checked against the data); None → data's
    num_workers: int = 4
    label_dropout: float = 0.1  # --cfg-prob
    vae: str = DEFAULT_VAE  # decodes latent sample grids (hub id or local path)
    image_dir: str | None = None  # raw images of latent data (REPA); None → found beside them


def dataset_kind(spec: str) -> str:
    """Which reader ``spec`` needs: "digits", "packed" or "release" (SraError if none fits)."""
    from sra.data.release import find_release

    if spec == DIGITS:
        return DIGITS
    if not os.path.exists(spec):
        raise SraError(
            f"dataset {spec!r} not found; allowed: 'digits', a packed folder (sra-packed.json), "
            "or a release vae-sd folder/ZIP (dataset.json + img-mean-std-*.npy)"
        )
    if os.path.isdir(spec) and (is_packed(spec) or is_packed(os.path.join(spec, PACKED_DIR))):
        return "packed"
    if find_release(spec) is not None:
        return "release"
    raise SraError(
        f"{spec} is neither a packed dataset (no sra-packed.json) nor release latents (no "
        "dataset.json with img-mean-std-*.npy files, no vae-sd/ inside); allowed: 'digits', a "
        "packed folder, a release vae-sd folder/ZIP"
    )


def build_dataset(
    spec: str, resolution: int | None = None, latent_scale: float | None = None,
    with_images: bool = False, image_dir: str | None = None,
) -> Dataset:
    """Open a dataset by ``spec``: "digits", a packed folder, or a release ``vae-sd`` folder/ZIP.

    An ``encode`` output folder works too (its ``packed/`` is preferred over its ``vae-sd/``).
    ``resolution`` (pixels) is checked against the data (latents: latent size × 8;
    digits: 16). ``latent_scale`` overrides the stored/default 0.18215. ``with_images``: latent
    items become ``(x, image_uint8 (3, H, W), y)`` with the raw image of each latent (found
    beside the latents or in ``image_dir``; missing ones are one error line now). Pixel data
    (the digits) stays ``(x, y)``: there x itself is the clean image.
    """
    kind = dataset_kind(os.fspath(spec))
    if kind == DIGITS:
        from sra.data.digits import DIGITS_SIZE, DigitsDataset

        if resolution is not None and resolution != DIGITS_SIZE:
            raise SraError(f"the digits are {DIGITS_SIZE}x{DIGITS_SIZE} pixels, but --resolution is "
                           f"{resolution}; allowed: {DIGITS_SIZE} (or leave it unset)")
        return DigitsDataset()
    if kind == "packed":
        from sra.data.packed import PackedLatentDataset

        path = spec if is_packed(spec) else os.path.join(spec, PACKED_DIR)
        dataset: Dataset = PackedLatentDataset(path, latent_scale=latent_scale)
    else:
        from sra.data.release import ReleaseLatentDataset

        dataset = ReleaseLatentDataset(spec, latent_scale=latent_scale)
    info: DataInfo = dataset.info  # type: ignore[attr-defined]
    if resolution is not None and info.resolution != resolution:
        raise SraError(
            f"dataset {spec} holds {info.size}x{info.size} latents = {info.resolution}px images, "
            f"but --resolution is {resolution}"
        )
    if with_images:
        from sra.data.paired import with_images as pair_images

        dataset = pair_images(dataset, spec, image_dir)
    return dataset

"""The ADM ("center-crop-dhariwal") ImageNet crop and the image-mode handling around it.

The crop (guided-diffusion, also used by edm2 / REPA / the SRA release):

1. while the short side is ≥ 2·res, halve both sides (floor) with a BOX filter;
2. bicubic-resize so the short side becomes res (the long side is rounded);
3. center-crop res×res (offsets floored).

Images whose short side is below ``res`` are upsampled by step 2, exactly as ADM does; the
callers count them (or skip them when asked to).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sra.errors import SraError

# PIL modes whose values are not 8-bit; they are rescaled to 0..255 instead of clipped.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(frozen=True)
class CropPlan:
    """The geometry of one ADM crop: how many halvings, the bicubic size, the crop corner."""

    halvings: int
    halved_size: tuple[int, int]  # (W, H) after the BOX halvings
    resized_size: tuple[int, int]  # (W, H) after the bicubic resize
    offset: tuple[int, int]  # (x, y) of the crop's top-left corner
    upsampled: bool  # the short side was below res (the bicubic step enlarges)


def adm_crop_plan(width: int, height: int, resolution: int) -> CropPlan:
    """The sizes the ADM crop goes through for a ``width``×``height`` image."""
    if resolution <= 0:
        raise SraError(f"crop resolution must be a positive integer, got {resolution}")
    if width <= 0 or height <= 0:
        raise SraError(f"cannot crop an empty image of size {width}x{height}")
    w, h, halvings = width, height, 0
    while min(w, h) >= 2 * resolution:
        w, h, halvings = w // 2, h // 2, halvings + 1
    scale = resolution / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    return CropPlan(
        halvings=halvings,
        halved_size=(w, h),
        resized_size=(rw, rh),
        offset=((rw - resolution) // 2, (rh - resolution) // 2),
        upsampled=min(width, height) < resolution,
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image (grayscale, palette, RGBA, CMYK, 16-bit, …) as 8-bit RGB.

    Alpha is dropped (as the release's ``convert('RGB')`` does); 16-bit and float grayscale
    is rescaled to 0..255 instead of being clipped to white.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if image.mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    with warnings.catch_warnings():
        # "Palette images with Transparency expressed in bytes should be converted to RGBA"
        warnings.simplefilter("ignore", UserWarning)
        return image.convert("RGB")


def adm_center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM center crop of ``image`` to a (resolution, resolution, 3) uint8 array."""
    image = to_rgb(image)
    plan = adm_crop_plan(image.width, image.height, resolution)
    for _ in range(plan.halvings):
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    image = image.resize(plan.resized_size, resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)  # (H', W', 3)
    x, y = plan.offset
    return np.ascontiguousarray(arr[y : y + resolution, x : x + resolution])

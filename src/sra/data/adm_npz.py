"""The ADM ``.npz`` sample/reference format: streaming writer, batch reader, header validation.

What the ADM evaluation suite reads: an ``.npz`` whose ``arr_0`` is uint8 (N, H, W, 3) (we also
accept (N, H, W, 1), repeated to 3), optionally ``labels`` (N,) and, in reference batches, the
Inception statistics ``mu``/``sigma`` (pool_3) and ``mu_s``/``sigma_s`` (spatial). Both sides
stream: the writer never holds all images, the reader yields batches straight from the zip
member, and the checks read headers only, so a bad file is reported before any heavy work.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from sra.atomic import atomic_path
from sra.errors import SraError

IMAGES_KEY = "arr_0"
LABELS_KEY = "labels"
# Statistics pairs a reference batch may carry: pool_3 features, spatial features.
STAT_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))


# -- writing ------------------------------------------------------------------------------------
def write_adm_npz(path: str | os.PathLike, chunks: Iterable[np.ndarray], num: int,
                  image_shape: tuple[int, int, int], labels: np.ndarray | None = None) -> Path:
    """Stream uint8 image chunks (n, H, W, 3) into ``path`` as an uncompressed ``.npz`` with
    ``arr_0`` (num, H, W, 3) (+ ``labels``) without holding all images in memory; the file is
    renamed into place only when complete. ``np.load(path)["arr_0"]`` reads it back."""
    path = Path(path)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (num, *image_shape)}
    written = 0
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED,
                                                   allowZip64=True) as zf:
        with zf.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for chunk in chunks:
                if chunk.dtype != np.uint8 or tuple(chunk.shape[1:]) != tuple(image_shape):
                    raise SraError(f"image chunk {chunk.dtype} {chunk.shape} does not fit "
                                   f"uint8 (n, {', '.join(map(str, image_shape))})")
                f.write(np.ascontiguousarray(chunk).tobytes())
                written += chunk.shape[0]
        if written != num:
            raise SraError(f"npz assembly got {written} images, expected {num}")
        if labels is not None:
            with zf.open(f"{LABELS_KEY}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
    return path


# -- reading ------------------------------------------------------------------------------------
def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the ``.npy`` stream ``f``, left at the start of the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, fortran, dtype


def npz_keys(path: Path) -> set[str]:
    """The array names in the npz at ``path`` (zipfile.BadZipFile if it is no zip)."""
    with zipfile.ZipFile(path) as zf:
        return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}


class NpzImages:
    """Batches of one array inside an npz, read straight from the zip member (stored or deflated),
    so 50K × 256² × 3 bytes are never loaded at once."""

    def __init__(self, path: str | os.PathLike, key: str = IMAGES_KEY):
        self.path, self.key = Path(path), key
        if not self.path.is_file():
            raise SraError(f"npz file not found: {self.path}")
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(f"{key}.npy") as f:
                self.shape, self.fortran, self.dtype = read_npy_header(f)
        except KeyError:
            raise SraError(f"{self.path} has no '{key}' array") from None
        except zipfile.BadZipFile:
            raise SraError(f"{self.path} is not an npz file") from None

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield consecutive (B, ...) arrays."""
        if self.fortran:  # rare (not written by np.savez of C arrays): fall back to one load
            arr = np.load(self.path)[self.key]
            for i in range(0, len(arr), batch_size):
                yield np.ascontiguousarray(arr[i : i + batch_size])
            return
        row = int(np.prod(self.shape[1:], dtype=np.int64))
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            read_npy_header(f)
            for i in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - i)
                buf = bytearray(f.read(n * row * self.dtype.itemsize))  # writable, for torch.from_numpy
                if len(buf) != n * row * self.dtype.itemsize:
                    raise SraError(f"{self.path}: '{self.key}' is truncated")
                yield np.frombuffer(buf, dtype=self.dtype).reshape((n, *self.shape[1:]))


def to_rgb_uint8(batch: np.ndarray) -> np.ndarray:
    """Validate an ADM image batch (B, H, W, 1|3) uint8 and return it as (B, H, W, 3)."""
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] not in (1, 3):
        raise SraError(
            "images must be uint8 (N, H, W, 3) or (N, H, W, 1) as ADM's npz holds; "
            f"got {batch.dtype} {batch.shape}"
        )
    return np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch


# -- validation from headers alone ---------------------------------------------------------------
def check_npz_file(path: str | os.PathLike | None, what: str) -> Path:
    """``path`` as a Path once it is known to exist and to be a zip; errors name ``what``."""
    if path is None:
        raise SraError(f"{what} npz is required")
    path = Path(path)
    if not path.is_file():
        raise SraError(f"{what} npz not found: {path}")
    try:
        npz_keys(path)
    except zipfile.BadZipFile:
        raise SraError(f"{what} {path} is not an npz file") from None
    return path


def npz_array_info(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of ``key`` in the npz at ``path`` from its header alone (no data is read).

    Raises :class:`SraError` naming the file if the member is missing, its header is unreadable, or
    its data is shorter than the header promises (a truncated file).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{key}.npy")
            with zf.open(info) as f:
                shape, _, dtype = read_npy_header(f)
                offset = f.tell()
    except KeyError:
        raise SraError(f"{path} has no '{key}' array") from None
    except zipfile.BadZipFile:
        raise SraError(f"{path} is not an npz file") from None
    except (ValueError, OSError, EOFError) as exc:
        raise SraError(f"{path}: cannot read the header of '{key}' ({type(exc).__name__})") from None
    if dtype.hasobject:
        raise SraError(f"{path}: '{key}' holds Python objects, not numbers")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if info.file_size < need:
        raise SraError(f"{path}: '{key}' is truncated ({info.file_size} of {need} bytes)")
    return tuple(shape), dtype


def check_images_npz(path: str | os.PathLike | None, what: str) -> tuple[int, ...]:
    """Validate an ADM image npz without reading its pixels: the file exists and is an npz whose
    ``arr_0`` is uint8 (N, H, W, 1|3) with N >= 2. Returns the shape; errors name the file."""
    path = check_npz_file(path, what)
    shape, dtype = npz_array_info(path, IMAGES_KEY)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
        raise SraError(
            f"{what} {path}: '{IMAGES_KEY}' must be uint8 (N, H, W, 3) or (N, H, W, 1) as ADM's npz holds; "
            f"got {dtype} {shape}"
        )
    if shape[0] < 2 or shape[1] < 1 or shape[2] < 1:
        raise SraError(f"{what} {path}: '{IMAGES_KEY}' needs at least 2 non-empty images, got shape {shape}")
    return shape


def check_reference_npz(path: str | os.PathLike | None, stat_dims: tuple[int, int],
                        what: str = "reference (--ref)") -> Path:
    """Validate a reference npz up front: ``arr_0`` as :func:`check_images_npz` asks, and/or stored
    ``mu``/``sigma`` and ``mu_s``/``sigma_s`` of feature dims ``stat_dims`` (pool_3, spatial:
    the feature extractor's, passed in). A pair missing from the file must be computable from
    ``arr_0``. Returns the path."""
    path = check_npz_file(path, what)
    keys = npz_keys(path)
    has_images = IMAGES_KEY in keys
    if has_images:
        check_images_npz(path, what)
    for (mu_key, sigma_key), dim in zip(STAT_PAIRS, stat_dims):
        if mu_key in keys and sigma_key in keys:
            for key, want in ((mu_key, (dim,)), (sigma_key, (dim, dim))):
                shape, dtype = npz_array_info(path, key)
                if shape != want or dtype.kind not in "fi":
                    raise SraError(f"{what} {path}: '{key}' must be a float array of shape {want}, "
                                   f"got {dtype} {shape}")
        elif not has_images:
            raise SraError(f"{what} {path} holds neither images ('{IMAGES_KEY}') nor the statistics "
                           f"{mu_key} and {sigma_key}")
    return path

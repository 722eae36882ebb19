"""The packed latent format, read and written: a few large ``.npy`` shards plus a small header.

Layout of a packed folder::

    sra-packed.json    header: format/version, DataInfo (latent scale included), sample shape,
                       dtype, the shard files and their row counts
    labels.npy         int64 (N,)  class of every row, in row order (shards concatenated)
    index.npy          int64 (N,)  the release-layout file number of every row
                                   (``NNNNN/img-mean-std-<index>.npy``)
    shard-00000.npy    float32 (n_0, 2C, H, W)  posterior mean‖std rows
    shard-00001.npy    …

The header is written last, so a folder with ``sra-packed.json`` is complete. Opening reads the
header, the label array and the shards' ``.npy`` headers only (``np.load(mmap_mode='r')``);
a sample read is one copy out of a mapped large file instead of an open/parse/read/close of a
small file. File names live in :mod:`sra.data.formats`; converting release latents is
:func:`sra.data.release.pack_release`.
"""

from __future__ import annotations

import bisect
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from sra.atomic import atomic_path, atomic_write_json
from sra.data.base import DataInfo
from sra.data.checks import check_labels
from sra.data.formats import INDEX_NAME, LABELS_NAME, PACKED_FORMAT, PACKED_HEADER, PACKED_VERSION
from sra.errors import SraError
from sra.oserrors import writing

_NPY_HEADER_BYTES = 128  # fixed .npy header size, so the row count can be rewritten in place


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """A version-1.0 ``.npy`` header of exactly ``_NPY_HEADER_BYTES`` bytes (64-byte aligned)."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": tuple(int(s) for s in shape)})
    room = _NPY_HEADER_BYTES - 10  # magic (6) + version (2) + length (2)
    if len(text) + 1 > room:
        raise ValueError(f"shape {shape} too long for a {_NPY_HEADER_BYTES}-byte npy header")
    body = (text + " " * (room - len(text) - 1) + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + room.to_bytes(2, "little") + body


class ShardWriter:
    """Appends rows of one shape to ``<path>.partial``; :meth:`close` fixes the row count in the
    ``.npy`` header and renames it to ``path`` (so a finished name is always a whole file)."""

    def __init__(self, path: str, sample_shape: tuple[int, ...], dtype: np.dtype = np.float32):
        self.path, self.tmp = path, path + ".partial"
        self.sample_shape, self.dtype = tuple(sample_shape), np.dtype(dtype)
        self.rows = 0
        with writing(path):
            self._f = open(self.tmp, "wb")
            self._f.write(_npy_header((0, *self.sample_shape), self.dtype))

    def append(self, rows: np.ndarray) -> None:
        """Write rows (n, *sample_shape)."""
        if tuple(rows.shape[1:]) != self.sample_shape:
            raise SraError(f"cannot pack rows of shape {tuple(rows.shape[1:])} into a shard of "
                           f"{self.sample_shape}")
        with writing(self.path):
            self._f.write(np.ascontiguousarray(rows, dtype=self.dtype).data)  # no extra bytes copy
        self.rows += len(rows)

    def close(self) -> int:
        """Finish the file; returns the number of rows."""
        try:
            with writing(self.path):
                self._f.seek(0)
                self._f.write(_npy_header((self.rows, *self.sample_shape), self.dtype))
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
                os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.rows

    def abort(self) -> None:
        """Drop the partial file (closing it may fail again on a full disk)."""
        try:
            self._f.close()
        except OSError:
            pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def _save_npy_atomic(path: str, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def write_packed_header(
    root: str,
    shards: list[tuple[str, int]],
    labels: np.ndarray,
    index: np.ndarray,
    info: DataInfo,
    sample_shape: tuple[int, ...],
    extra: dict | None = None,
) -> str:
    """Write ``labels.npy``, ``index.npy`` and (last) ``sra-packed.json`` for finished shards."""
    n = sum(rows for _, rows in shards)
    if len(labels) != n or len(index) != n:
        raise SraError(f"packed data in {root}: {n} rows but {len(labels)} labels / {len(index)} indices")
    # Never write a header whose labels a reader would refuse.
    check_labels(labels, info.num_classes, os.path.join(root, LABELS_NAME),
                 f"the data has {info.num_classes} classes")
    _save_npy_atomic(os.path.join(root, LABELS_NAME), np.asarray(labels, dtype=np.int64))
    _save_npy_atomic(os.path.join(root, INDEX_NAME), np.asarray(index, dtype=np.int64))
    header = {
        "format": PACKED_FORMAT, "version": PACKED_VERSION, "num_samples": n,
        "sample_shape": list(sample_shape), "dtype": "float32",
        "info": info.to_dict(), "labels": LABELS_NAME, "index": INDEX_NAME,
        "shards": [{"file": f, "rows": int(r)} for f, r in shards],
        **(extra or {}),
    }
    path = os.path.join(root, PACKED_HEADER)
    atomic_write_json(path, header)
    return path


class PackedLatentDataset(Dataset):
    """A packed folder as a dataset of (mean‖std (2C, H, W) float32, label).

    The shards are memory-mapped read-only; a sample is one copy out of the map into a fresh
    (writable) array. DataLoader-worker safe: maps are shared after fork and re-created, not
    pickled, under the spawn start method. (Positioned reads with ``os.preadv`` were measured
    too: slower with a warm page cache, see ``benchmarks/bench_data.py``.)
    """

    def __init__(self, path: str, latent_scale: float | None = None):
        self.path = os.fspath(path)
        header_path = os.path.join(self.path, PACKED_HEADER)
        if not os.path.isfile(header_path):
            raise SraError(f"{self.path} is not a packed dataset (no {PACKED_HEADER})")
        try:
            with open(header_path) as f:
                header = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise SraError(f"cannot read {header_path} ({exc})") from None
        if header.get("format") != PACKED_FORMAT or header.get("version") != PACKED_VERSION:
            raise SraError(f"{header_path}: unsupported format {header.get('format')!r} "
                           f"version {header.get('version')!r} (this sra reads {PACKED_FORMAT} "
                           f"version {PACKED_VERSION})")
        self.header = header
        try:
            info = DataInfo(**header["info"])
        except (KeyError, TypeError) as exc:
            raise SraError(f"{header_path}: corrupt 'info' entry ({exc})") from None
        if latent_scale is not None:
            info = DataInfo(**{**info.to_dict(), "latent_scale": float(latent_scale)})
        self.info = info
        self.sample_shape = tuple(int(s) for s in header["sample_shape"])
        self._files = [os.path.join(self.path, s["file"]) for s in header["shards"]]
        rows = [int(s["rows"]) for s in header["shards"]]
        self._starts = [0]
        for r in rows:
            self._starts.append(self._starts[-1] + r)
        self._len = self._starts[-1]
        if self._len != header["num_samples"]:
            raise SraError(f"{header_path}: shard rows sum to {self._len}, header says "
                           f"{header['num_samples']}")
        self.labels_file = os.path.join(self.path, header["labels"])
        self.labels = self._load_small(header["labels"])
        if len(self.labels) != self._len:
            raise SraError(f"{self.path}: {len(self.labels)} labels for {self._len} samples")
        check_labels(self.labels, info.num_classes, self.labels_file,
                     f"{PACKED_HEADER} declares {info.num_classes} classes", self.sample_name)
        self._maps: list[np.ndarray] | None = None
        self._open_maps()

    def _load_small(self, name: str) -> np.ndarray:
        try:
            return np.load(os.path.join(self.path, name))
        except (OSError, ValueError) as exc:
            raise SraError(f"cannot read {os.path.join(self.path, name)} ({exc})") from None

    def _map(self, k: int) -> np.memmap:
        try:
            return np.load(self._files[k], mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise SraError(f"cannot map packed shard {self._files[k]} ({exc})") from None

    def _open_maps(self) -> list[np.ndarray]:
        maps = []
        for k in range(len(self._files)):
            arr = self._map(k)
            want = (self._starts[k + 1] - self._starts[k], *self.sample_shape)
            if arr.shape != want or arr.dtype != np.float32:
                raise SraError(f"packed shard {self._files[k]} holds {arr.dtype} {arr.shape}; the "
                               f"header says float32 {want}")
            # A plain-ndarray view (kept alive by its base): slicing an np.memmap costs several µs
            # of subclass bookkeeping per sample.
            maps.append(arr.view(np.ndarray))
        self._maps = maps
        return maps

    def memmaps(self) -> list[np.memmap]:
        """The shards as read-only memory maps, (rows_k, 2C, H, W) each, in row order."""
        return [self._map(k) for k in range(len(self._files))]

    @property
    def index(self) -> np.ndarray:
        """Release-layout file number of every row (int64 (N,))."""
        return self._load_small(self.header["index"])

    def __len__(self) -> int:
        return self._len

    def sample_name(self, i: int) -> str:
        """Where sample ``i`` lives: its shard file and row."""
        k = bisect.bisect_right(self._starts, i) - 1
        return f"{os.path.basename(self._files[k])} row {i - self._starts[k]}"

    def _check_index(self, i: int) -> int:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} samples")
        return i

    def read(self, i: int) -> np.ndarray:
        """Row ``i`` as a fresh, writable float32 array (2C, H, W)."""
        i = self._check_index(int(i))
        maps = self._maps if self._maps is not None else self._open_maps()
        k = bisect.bisect_right(self._starts, i) - 1
        return maps[k][i - self._starts[k]].copy()  # the one copy out of the read-only map

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # read() inlined: this is the per-sample hot path of an unbatched DataLoader.
        i = self._check_index(int(i))
        maps = self._maps if self._maps is not None else self._open_maps()
        k = bisect.bisect_right(self._starts, i) - 1
        return torch.from_numpy(maps[k][i - self._starts[k]].copy()), int(self.labels[i])

    def read_many(self, indices) -> np.ndarray:
        """Rows at ``indices`` as one float32 array (B, 2C, H, W) (one copy per row)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + self._len, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(f"indices out of range for {self._len} samples")
        maps = self._maps if self._maps is not None else self._open_maps()
        which = np.searchsorted(np.asarray(self._starts), idx, side="right") - 1
        if idx.size and which.min() == which.max():  # all in one shard: a single gather
            k = int(which[0])
            return np.take(maps[k], idx - self._starts[k], axis=0)
        out = np.empty((len(idx), *self.sample_shape), dtype=np.float32)
        for j, (k, i) in enumerate(zip(which.tolist(), idx.tolist())):
            out[j] = maps[k][i - self._starts[k]]
        return out

    def __getitems__(self, indices) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch used by ``DataLoader``: rows gathered into one array."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        batch = torch.from_numpy(self.read_many(idx))
        return list(zip(batch.unbind(0), self.labels[idx].tolist()))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = None  # re-map in the receiving process instead of pickling the data
        return state

"""The packed latent format: a few large ``.npy`` shards, memory-mapped, plus a small header.

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
small file.
"""

from __future__ import annotations

import bisect
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from sra.data.base import SD_VAE_SCALE, DataInfo
from sra.errors import SraError

PACKED_HEADER = "sra-packed.json"
PACKED_FORMAT = "sra-packed"
PACKED_VERSION = 1
LABELS_NAME = "labels.npy"
INDEX_NAME = "index.npy"
_NPY_HEADER_BYTES = 128  # fixed .npy header size, so the row count can be rewritten in place


def shard_name(k: int) -> str:
    """File name of packed shard ``k``."""
    return f"shard-{k:05d}.npy"


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
        self._f = open(self.tmp, "wb")
        self._f.write(_npy_header((0, *self.sample_shape), self.dtype))

    def append(self, rows: np.ndarray) -> None:
        """Write rows (n, *sample_shape)."""
        if tuple(rows.shape[1:]) != self.sample_shape:
            raise SraError(f"cannot pack rows of shape {tuple(rows.shape[1:])} into a shard of "
                           f"{self.sample_shape}")
        self._f.write(np.ascontiguousarray(rows, dtype=self.dtype).data)  # no extra bytes copy
        self.rows += len(rows)

    def close(self) -> int:
        """Finish the file; returns the number of rows."""
        self._f.seek(0)
        self._f.write(_npy_header((self.rows, *self.sample_shape), self.dtype))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.rows

    def abort(self) -> None:
        """Drop the partial file."""
        self._f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def _save_npy_atomic(path: str, arr: np.ndarray) -> None:
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


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
    with open(path + ".partial", "w") as f:
        json.dump(header, f, indent=1)
    os.replace(path + ".partial", path)
    return path


def is_packed(path: str) -> bool:
    """Whether ``path`` is a finished packed folder."""
    return os.path.isfile(os.path.join(path, PACKED_HEADER))


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
        info = DataInfo(**header["info"])
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
        self.labels = self._load_small(header["labels"])
        if len(self.labels) != self._len:
            raise SraError(f"{self.path}: {len(self.labels)} labels for {self._len} samples")
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

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (B, 2C, H, W), y (B,)) for ``indices``: a batch without a collate step."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return torch.from_numpy(self.read_many(idx)), torch.from_numpy(self.labels[idx])

    def __getitems__(self, indices) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch used by ``DataLoader``: rows gathered into one array."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        batch = torch.from_numpy(self.read_many(idx))
        return list(zip(batch.unbind(0), self.labels[idx].tolist()))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = None  # re-map in the receiving process instead of pickling the data
        return state


def pack_release(
    source: str, dest: str, shard_size: int = 20000, latent_scale: float | None = None,
    progress: bool = True,
) -> PackedLatentDataset:
    """Convert a release ``vae-sd`` folder/ZIP into a packed folder at ``dest``."""
    from tqdm import tqdm

    from sra.data.release import ReleaseLatentDataset

    if shard_size <= 0:
        raise SraError(f"--shard-size must be a positive integer, got {shard_size}")
    if is_packed(dest):
        raise SraError(f"{dest} already holds a packed dataset; choose another --dest or delete it")
    release = ReleaseLatentDataset(source, latent_scale=latent_scale)
    os.makedirs(dest, exist_ok=True)
    shape = release.sample_shape
    shards: list[tuple[str, int]] = []
    bar = tqdm(total=len(release), desc="pack", unit="sample", disable=not progress)
    for k, start in enumerate(range(0, len(release), shard_size)):
        writer = ShardWriter(os.path.join(dest, shard_name(k)), shape)
        try:
            for i in range(start, min(start + shard_size, len(release))):
                writer.append(release.read(i)[None])
                bar.update(1)
        except BaseException:
            writer.abort()
            raise
        shards.append((shard_name(k), writer.close()))
    bar.close()
    write_packed_header(dest, shards, release.labels, release.file_numbers(), release.info, shape,
                        extra={"source": os.path.abspath(source)})
    return PackedLatentDataset(dest)


def moments_info(sample_shape: tuple[int, ...], num_classes: int,
                 latent_scale: float | None = None) -> DataInfo:
    """DataInfo of VAE moments of shape (2C, h, w) (resolution = 8·h)."""
    from sra.data.images import VAE_DOWNSAMPLE

    c2, h, w = sample_shape
    return DataInfo(
        kind="moments", channels=c2 // 2, size=h, num_classes=int(num_classes),
        latent_scale=SD_VAE_SCALE if latent_scale is None else float(latent_scale),
        latent_bias=0.0, resolution=h * VAE_DOWNSAMPLE,
    )

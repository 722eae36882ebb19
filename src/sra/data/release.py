"""The release's (edm2/REPA) latent layout, read as-is from a folder or a ZIP, and packed.

``vae-sd/`` holds one ``.npy`` per image, float32 (8, H/8, W/8) = posterior mean‖std, named
``NNNNN/img-mean-std-NNNNNNNN.npy``, and ``dataset.json`` = ``{"labels": [[relpath, class], ...]}``.
Samples are the ``.npy`` files in sorted relative-path order (as the release lists them), each
with the label ``dataset.json`` gives its path. :func:`pack_release` converts such latents into
the packed format (:mod:`sra.data.packed`).
"""

from __future__ import annotations

import io
import os
import re
import zipfile

import numpy as np
import torch
from torch.utils.data import Dataset

from sra.data.checks import inferred_classes
from sra.data.formats import (
    DEFAULT_SHARD_SIZE, LABELS_FILE, RELEASE_DIR, is_packed, moments_info, shard_name,
)
from sra.data.packed import PackedLatentDataset, ShardWriter, write_packed_header
from sra.data.sources import align_labels, read_labels_json
from sra.errors import SraError

_NUMBER = re.compile(r"img-mean-std-(\d+)\.npy$")  # the NNNNNNNN of a latent_name()


def find_release(path: str) -> str | None:
    """The release latents at or under ``path`` (the ``vae-sd`` folder/ZIP itself, or a data
    folder holding ``vae-sd/`` or ``vae-sd.zip``), or None."""
    path = os.fspath(path)
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if LABELS_FILE in names and any(n.endswith(".npy") for n in names):
            return path
        return None
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, LABELS_FILE)):
        for _root, _dirs, files in os.walk(path):
            if any(f.endswith(".npy") for f in files):
                return path
        return None
    for cand in (os.path.join(path, RELEASE_DIR), os.path.join(path, RELEASE_DIR + ".zip")):
        if os.path.exists(cand):
            return find_release(cand)
    return None


class ReleaseLatentDataset(Dataset):
    """A release ``vae-sd`` folder or ZIP as a dataset of (mean‖std (2C, H, W), label).

    A ZIP is opened lazily in each process (DataLoader workers included), never shared.
    """

    def __init__(self, path: str, latent_scale: float | None = None):
        found = find_release(path)
        if found is None:
            raise SraError(
                f"{path} is not a release latent folder/ZIP (expected {LABELS_FILE} next to "
                f"NNNNN/img-mean-std-NNNNNNNN.npy files, or a {RELEASE_DIR}/ inside)"
            )
        self.path = found
        self.is_zip = os.path.isfile(found)
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        self.labels_file = (f"{found}:{LABELS_FILE}" if self.is_zip
                            else os.path.join(found, LABELS_FILE))
        if self.is_zip:
            with zipfile.ZipFile(found) as zf:
                names = [n for n in zf.namelist() if n.endswith(".npy")]
                labels_map = read_labels_json(zf.read(LABELS_FILE), self.labels_file)
        else:
            names = []
            for root, _dirs, files in os.walk(found):
                rel = os.path.relpath(root, found)
                for f in files:
                    if f.endswith(".npy"):
                        names.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
            with open(self.labels_file, "rb") as fh:
                labels_map = read_labels_json(fh.read(), self.labels_file)
        names.sort()
        if not names:
            raise SraError(f"{found} holds no .npy latent files")
        self.names = names
        self.labels = self._align_labels(names, labels_map)
        # The release format declares no class count, so only a negative label can fall outside
        # it here (against a model's fixed classes: checks.check_labels_fit).
        num_classes = inferred_classes(self.labels, self.labels_file, self.sample_name)
        first = self._load(0)
        if first.ndim != 3 or first.shape[0] % 2 or first.shape[1] != first.shape[2]:
            raise SraError(
                f"{self._where(0)} holds an array of shape {first.shape}; expected mean‖std "
                "(2C, H, H) such as (8, 32, 32)"
            )
        self.sample_shape = tuple(first.shape)
        self.info = moments_info(self.sample_shape, num_classes, latent_scale)

    def _align_labels(self, names: list[str], labels_map: dict[str, int] | None) -> np.ndarray:
        if labels_map is None:  # "labels": null → unconditional data, one class
            return np.zeros(len(names), dtype=np.int64)
        return align_labels(names, labels_map, self.path, ".npy files")

    def sample_name(self, i: int) -> str:
        """The latent file of sample ``i``, relative to the folder/ZIP."""
        return self.names[i]

    def _where(self, i: int) -> str:
        return f"{self.path}{':' if self.is_zip else os.sep}{self.names[i]}"

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path, "r")
            self._zip_pid = os.getpid()
        return self._zip

    def _load(self, i: int) -> np.ndarray:
        try:
            if self.is_zip:
                return np.load(io.BytesIO(self._archive().read(self.names[i])), allow_pickle=False)
            return np.load(os.path.join(self.path, self.names[i]), allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise SraError(f"cannot read latent file {self._where(i)} ({exc})") from None

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> np.ndarray:
        """Sample ``i`` as a float32 array (2C, H, W), checked against the dataset's shape."""
        arr = self._load(i)
        if arr.shape != self.sample_shape or arr.dtype.kind != "f":
            raise SraError(f"{self._where(i)} holds {arr.dtype} {arr.shape}; the dataset's "
                           f"samples are float {self.sample_shape}")
        return arr.astype(np.float32, copy=False)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.read(int(i))), int(self.labels[i])

    def file_numbers(self) -> np.ndarray:
        """The NNNNNNNN of every file name (its position when names do not follow the pattern)."""
        nums = [_NUMBER.search(n) for n in self.names]
        if all(nums):
            return np.array([int(m.group(1)) for m in nums], dtype=np.int64)  # type: ignore[union-attr]
        return np.arange(len(self.names), dtype=np.int64)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_zip"], state["_zip_pid"] = None, None
        return state


def pack_release(
    source: str, dest: str, shard_size: int = DEFAULT_SHARD_SIZE, latent_scale: float | None = None,
    progress: bool = True,
) -> PackedLatentDataset:
    """Convert a release ``vae-sd`` folder/ZIP into a packed folder at ``dest``."""
    from tqdm import tqdm

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

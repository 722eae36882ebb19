"""Image inputs for preprocessing: a class-per-folder tree or a ZIP, listed once, read lazily.

Listing follows edm2's ``dataset_tool`` (the tool the release used): every file with an image
extension, sorted by its relative POSIX path. Labels come from a ``dataset.json`` at the root
(``{"labels": [[relative_path, class_index], ...]}``) when there is one, otherwise from the
top-level folder of each file, indexed in sorted folder order (ImageNet ``train/``: the
synsets ``n01440764`` … → 0 … 999). One top-level name only means no labels (unconditional).
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from sra.data.checks import inferred_classes
from sra.data.formats import LABELS_FILE
from sra.errors import SraError

log = logging.getLogger("sra.data")


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) PIL can open."""
    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _is_image(name: str, exts: frozenset[str]) -> bool:
    return os.path.splitext(name)[1].lower() in exts


def _list_dir(root: str, exts: frozenset[str]) -> list[str]:
    """Relative POSIX paths of all image files under ``root`` (scandir: fast on huge trees)."""
    found: list[str] = []
    stack = [root]
    while stack:
        top = stack.pop()
        with os.scandir(top) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(entry.path)
                elif _is_image(entry.name, exts):
                    found.append(os.path.relpath(entry.path, root).replace(os.sep, "/"))
    return found


def read_labels_json(data: bytes | str, where: str) -> dict[str, int] | None:
    """Parse a ``dataset.json``: relative path → class index, or None for ``"labels": null``."""
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SraError(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise SraError(f"{where} has no 'labels' entry; expected {{\"labels\": [[path, class], ...]}}")
    entries = meta["labels"]
    if entries is None:
        return None
    try:
        return {str(name).replace("\\", "/"): int(label) for name, label in entries}
    except (TypeError, ValueError):
        raise SraError(f"{where}: 'labels' must be a list of [path, class_index] pairs") from None


def _first(items: list[str], k: int = 3) -> str:
    return ", ".join(items[:k]) + (", …" if len(items) > k else "")


def align_labels(names: list[str], labels_map: dict[str, int], where: object,
                 what: str) -> np.ndarray:
    """Labels in the order of ``names``; where the label list and the files disagree, one line
    naming the first few files on each side that the other lacks, and how many in all."""
    unlabelled = [n for n in names if n not in labels_map]
    if not unlabelled and len(labels_map) == len(names):
        return np.fromiter((labels_map[n] for n in names), dtype=np.int64, count=len(names))
    present = set(names)
    absent = [n for n in labels_map if n not in present]
    counts = (f"lists {len(labels_map)} labels but there are {len(names)} {what}"
              if len(labels_map) != len(names) else
              f"lists {len(labels_map)} labels for the {len(names)} {what}, but not the same files")
    parts = []
    if absent:
        parts.append(f"{len(absent)} listed file(s) are not there ({_first(absent)})")
    if unlabelled:
        parts.append(f"{len(unlabelled)} of the {what} have no label ({_first(unlabelled)})")
    raise SraError(f"{where}: {LABELS_FILE} {counts}: " + "; ".join(parts))


@dataclass
class ImageSource:
    """A listed image collection. ``read(i)`` opens image ``i`` (reopening a ZIP per process)."""

    path: str
    is_zip: bool
    names: list[str]  # relative POSIX paths, sorted
    labels: np.ndarray | None  # int64 (N,), None when the data has no classes
    num_classes: int  # 1 when unlabeled
    class_names: list[str] | None = None  # sorted top-level folders, when labels came from them
    _zip: zipfile.ZipFile | None = field(default=None, repr=False, compare=False)
    _zip_pid: int | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.names)

    def label(self, i: int) -> int:
        """Class of image ``i`` (0 when unlabeled)."""
        return 0 if self.labels is None else int(self.labels[i])

    def _archive(self) -> zipfile.ZipFile:
        # A ZipFile handle must not be shared across fork(): reopen in every process.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path, "r")
            self._zip_pid = os.getpid()
        return self._zip

    def read_bytes(self, i: int) -> bytes:
        """The raw file bytes of image ``i``."""
        if self.is_zip:
            return self._archive().read(self.names[i])
        with open(os.path.join(self.path, self.names[i]), "rb") as f:
            return f.read()

    def read(self, i: int) -> Image.Image:
        """Image ``i`` fully decoded (raises OSError / PIL errors on corrupt files)."""
        image = Image.open(io.BytesIO(self.read_bytes(i)))
        image.load()  # decode now, so truncated files fail here and not later
        return image

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_zip"], state["_zip_pid"] = None, None
        return state


def open_image_source(path: str, limit: int | None = None) -> ImageSource:
    """List the images of a directory tree or ``.zip`` at ``path`` with their labels."""
    path = os.fspath(path)
    exts = image_extensions()
    labels_map: dict[str, int] | None = None
    has_labels_file = False
    if os.path.isdir(path):
        is_zip = False
        names = _list_dir(path, exts)
        meta = os.path.join(path, LABELS_FILE)
        if os.path.isfile(meta):
            has_labels_file = True
            with open(meta, "rb") as f:
                labels_map = read_labels_json(f.read(), meta)
    elif os.path.isfile(path):
        if not zipfile.is_zipfile(path):
            raise SraError(f"image source {path} is a file but not a ZIP archive; pass a folder or a .zip")
        is_zip = True
        with zipfile.ZipFile(path) as zf:
            all_names = zf.namelist()
            names = [n for n in all_names if not n.endswith("/") and _is_image(n, exts)]
            if LABELS_FILE in all_names:
                has_labels_file = True
                labels_map = read_labels_json(zf.read(LABELS_FILE), f"{path}:{LABELS_FILE}")
    else:
        raise SraError(f"image source {path} does not exist (expected a folder or a .zip of images)")
    names.sort()
    if not names:
        raise SraError(f"no images found in {path} (looked for {', '.join(sorted(exts)[:8])}, …)")

    class_names = None
    if has_labels_file:
        if labels_map is None:
            labels = None
        else:
            labels = align_labels(names, labels_map, path, "images")
    else:
        tops = [n.split("/", 1)[0] if "/" in n else "" for n in names]
        class_names = sorted(set(tops))
        if len(class_names) > 1:
            index = {c: k for k, c in enumerate(class_names)}
            labels = np.array([index[t] for t in tops], dtype=np.int64)
        else:
            if class_names != [""]:
                log.warning("%s: all images sit under one folder %r, so the data is unlabeled; "
                            "point the source at the folder that holds the class folders",
                            path, class_names[0])
            labels, class_names = None, None
    num_classes = 1
    if class_names is not None:
        num_classes = len(class_names)
    elif labels is not None:  # from dataset.json, which declares no class count
        where = f"{path}:{LABELS_FILE}" if is_zip else os.path.join(path, LABELS_FILE)
        num_classes = inferred_classes(labels, where, names.__getitem__)
    if limit is not None:
        if limit <= 0:
            raise SraError(f"--limit must be a positive integer, got {limit}")
        names = names[:limit]
        labels = None if labels is None else labels[:limit]
    return ImageSource(
        path=path, is_zip=is_zip, names=names, labels=labels,
        num_classes=num_classes, class_names=class_names,
    )

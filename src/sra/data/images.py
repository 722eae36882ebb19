"""``sra preprocess images``: an image tree or ZIP → ADM-cropped PNGs in the edm2/release layout.

Output (a folder, or a ``.zip`` when ``dest`` ends in ``.zip``)::

    00000/img00000000.png  00000/img00000001.png  …  01281/img01281166.png
    dataset.json           {"labels": [["00000/img00000000.png", 0], ...]}  (null if unlabeled)

File number = position of the input in the sorted listing (as edm2 numbers them), so a skipped
corrupt input leaves a gap and every written file keeps its own label. PNGs are uncompressed by
default (fast to decode, like the release). A folder output resumes: files already written are
kept; a ZIP output is written to ``<dest>.partial`` and renamed when complete.

Every run leaves a report (``DEST/preprocess_report.json``, or ``DEST.report.json`` beside a ZIP):
each skipped input with its reason, each upscaled input, and each file of the source that is not
an image (listed, never read). It is written atomically, also when a run fails or is interrupted
(then with ``"complete": false``); a resumed folder run carries over what it knows of kept files.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import zipfile
from dataclasses import dataclass, field

from PIL import Image

from sra.atomic import atomic_write_bytes, atomic_write_json
from sra.data.crop import adm_center_crop
from sra.data.formats import LABELS_FILE, VAE_DOWNSAMPLE, image_name
from sra.data.sources import ImageSource, image_extensions, open_image_source
from sra.errors import SraError, check_choice
from sra.oserrors import writing

log = logging.getLogger("sra.data")

SMALL_POLICIES = ("upscale", "skip")  # images whose short side < resolution
DEFAULT_PNG_COMPRESS = 0  # uncompressed, as the release (decoding speed over disk size)
REPORT_FILE = "preprocess_report.json"  # in a folder --dest
REPORT_VERSION = 1


def check_resolution(resolution: int) -> None:
    """Raise unless ``resolution`` is a positive multiple of the VAE downsampling factor."""
    if not isinstance(resolution, int) or resolution <= 0 or resolution % VAE_DOWNSAMPLE:
        raise SraError(
            f"--resolution must be a positive multiple of {VAE_DOWNSAMPLE} (e.g. 256 or 512), "
            f"got {resolution}"
        )


@dataclass
class ImagesConfig:
    """Settings of :func:`preprocess_images`."""

    source: str  # class-per-folder tree or ZIP (ImageNet ``train/``)
    dest: str  # output folder, or a path ending in .zip
    resolution: int = 256
    small: str = "upscale"  # "upscale" (ADM behaviour, counted) or "skip"
    png_compress: int = DEFAULT_PNG_COMPRESS  # 0..9
    workers: int = max(1, (os.cpu_count() or 1) - 1)
    limit: int | None = None  # only the first N inputs (for trials)
    progress: bool = True


@dataclass
class ImagesReport:
    """What :func:`preprocess_images` did."""

    dest: str
    total: int  # inputs listed
    written: int  # images in the output (including kept ones from an earlier run)
    reused: int  # already present from an interrupted earlier run
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input name, reason)
    upscaled: list[str] = field(default_factory=list)  # inputs smaller than the resolution
    num_classes: int = 1
    not_images: list[str] = field(default_factory=list)  # source files without an image extension
    report_path: str | None = None  # where the JSON report was written


def report_path(dest: str) -> str:
    """Where the report of a run writing to ``dest`` goes: inside a folder, beside a ZIP."""
    if dest.lower().endswith(".zip"):
        return dest + ".report.json"
    return os.path.join(dest, REPORT_FILE)


def list_non_images(path: str) -> list[str]:
    """Relative POSIX paths of the files in a source folder/ZIP that the image listing leaves out
    (no image extension), except the root ``dataset.json``. Sorted; nothing is opened."""
    exts = image_extensions()

    def other(name: str) -> bool:
        return name != LABELS_FILE and os.path.splitext(name)[1].lower() not in exts

    if os.path.isdir(path):
        found, stack = [], [path]
        while stack:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=True):
                        stack.append(entry.path)
                    else:
                        rel = os.path.relpath(entry.path, path).replace(os.sep, "/")
                        if other(rel):
                            found.append(rel)
        return sorted(found)
    with zipfile.ZipFile(path) as zf:
        return sorted(n for n in zf.namelist() if not n.endswith("/") and other(n))


def _report_dict(report: ImagesReport, cfg: ImagesConfig, complete: bool) -> dict:
    return {
        "version": REPORT_VERSION,
        "complete": complete,
        "source": cfg.source,
        "dest": cfg.dest,
        "resolution": cfg.resolution,
        "small": cfg.small,
        "inputs": report.total,
        "written": report.written,
        "reused": report.reused,
        "skipped_count": len(report.skipped),
        "upscaled_count": len(report.upscaled),
        "not_images_count": len(report.not_images),
        "skipped": [{"input": name, "reason": reason} for name, reason in report.skipped],
        "upscaled": list(report.upscaled),
        "not_images": [{"file": name, "reason": "not an image (no image file extension); ignored"}
                       for name in report.not_images],
    }


def _write_report(report: ImagesReport, cfg: ImagesConfig, complete: bool) -> str | None:
    """Write the JSON report atomically; a failure to write it only costs a warning."""
    path = report_path(cfg.dest)
    try:
        atomic_write_json(path, _report_dict(report, cfg, complete))
    except OSError as exc:
        log.warning("could not write the preprocessing report %s: %s", path, exc)
        return None
    report.report_path = path
    return path


def _previous_upscaled(dest: str, kept: set[str]) -> list[str]:
    """Upscaled inputs among ``kept`` (names reused from an earlier run), from its report."""
    try:
        with open(report_path(dest), encoding="utf-8") as f:
            old = json.load(f)
        return [n for n in old.get("upscaled", []) if isinstance(n, str) and n in kept]
    except (OSError, ValueError, AttributeError):
        return []  # no (readable) earlier report: kept files count as not upscaled


def load_and_crop(
    source: ImageSource, i: int, resolution: int, small: str
) -> tuple[object | None, str | None, bool]:
    """Read input ``i`` and ADM-crop it: (uint8 (res, res, 3) array or None, skip reason, upscaled)."""
    try:
        image = source.read(i)
    except Exception as exc:  # any decoder failure is a skip, never a dead run
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x…>"): noise in a report
        detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))
        return None, f"unreadable ({type(exc).__name__}: {detail})", False
    small_input = min(image.size) < resolution
    if small_input and small == "skip":
        return None, f"smaller than {resolution}px ({image.width}x{image.height})", True
    try:
        arr = adm_center_crop(image, resolution)
    except Exception as exc:  # e.g. an exotic mode PIL cannot convert
        return None, f"cannot convert ({type(exc).__name__}: {exc})", small_input
    return arr, None, small_input


# --- worker-side state (set once per pool process; avoids pickling the listing per task) ---
_WORKER: dict = {}


def _init_worker(source: ImageSource, resolution: int, small: str, compress: int) -> None:
    _WORKER.update(source=source, resolution=resolution, small=small, compress=compress)


def _work(i: int) -> tuple[int, bytes | None, str | None, bool]:
    arr, reason, upscaled = load_and_crop(_WORKER["source"], i, _WORKER["resolution"], _WORKER["small"])
    if arr is None:
        return i, None, reason, upscaled
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="png", compress_level=_WORKER["compress"])
    return i, buf.getvalue(), None, upscaled


class _DirSink:
    def __init__(self, root: str):
        self.root = root

    def exists(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.root, name))

    def write(self, name: str, data: bytes) -> None:
        # atomic: a resumed run never sees half a PNG, and a full disk leaves no partial file
        atomic_write_bytes(os.path.join(self.root, name), data)

    def close(self) -> None:
        pass


class _ZipSink:
    def __init__(self, dest: str):
        self.dest, self.tmp = dest, dest + ".partial"
        with writing(dest):
            os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
            self.zf = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED)

    def exists(self, name: str) -> bool:
        return False

    def write(self, name: str, data: bytes) -> None:
        with writing(self.dest):
            self.zf.writestr(name, data)

    def close(self) -> None:
        try:
            with writing(self.dest):
                self.zf.close()  # writes the directory: a full disk may refuse only now
                os.replace(self.tmp, self.dest)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Drop the half-written ZIP (closing it may fail again on a full disk)."""
        with contextlib.suppress(OSError):
            self.zf.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)


def preprocess_images(cfg: ImagesConfig) -> ImagesReport:
    """Crop every input image (ADM) and write the edm2/release ``images`` layout."""
    check_resolution(cfg.resolution)
    check_choice("--small policy", cfg.small, SMALL_POLICIES)
    if not 0 <= cfg.png_compress <= 9:
        raise SraError(f"--png-compress must be in 0..9, got {cfg.png_compress}")
    source = open_image_source(cfg.source, limit=cfg.limit)
    to_zip = cfg.dest.lower().endswith(".zip")
    if to_zip:
        if os.path.exists(cfg.dest):
            raise SraError(f"{cfg.dest} already exists; choose another --dest or delete it")
        sink: _DirSink | _ZipSink = _ZipSink(cfg.dest)
    else:
        if os.path.isfile(os.path.join(cfg.dest, LABELS_FILE)):
            raise SraError(f"{cfg.dest} already holds a finished images dataset ({LABELS_FILE}); "
                           "choose another --dest or delete it")
        if os.path.exists(cfg.dest) and not os.path.isdir(cfg.dest):
            raise SraError(f"--dest {cfg.dest} exists and is not a folder")
        os.makedirs(cfg.dest, exist_ok=True)
        sink = _DirSink(cfg.dest)

    names = [image_name(i) for i in range(len(source))]
    pending, done = [], []
    for i in range(len(source)):
        (done if sink.exists(names[i]) else pending).append(i)
    report = ImagesReport(dest=cfg.dest, total=len(source), written=0, reused=len(done),
                          num_classes=source.num_classes, not_images=list_non_images(cfg.source))
    if report.not_images:  # one line, not one per file: a tree may hold thousands of them
        log.warning("%d file(s) in %s are not images and are ignored (e.g. %s); all are listed in %s",
                    len(report.not_images), cfg.source, ", ".join(report.not_images[:3]),
                    report_path(cfg.dest))
    if done:
        log.info("resuming: %d of %d images already written", len(done), len(source))
        report.upscaled.extend(_previous_upscaled(cfg.dest, {source.names[i] for i in done}))
    written = set(done)

    from tqdm import tqdm

    def handle(result: tuple[int, bytes | None, str | None, bool]) -> None:
        i, data, reason, upscaled = result
        if upscaled and data is not None:
            report.upscaled.append(source.names[i])
        if data is None:
            report.skipped.append((source.names[i], reason or "unknown"))
            log.warning("skipped %s: %s", source.names[i], reason)
            return
        sink.write(names[i], data)
        written.add(i)

    bar = tqdm(total=len(pending), desc="images", unit="img", disable=not cfg.progress)
    try:
        if cfg.workers > 1 and len(pending) > 1:
            init = (source, cfg.resolution, cfg.small, cfg.png_compress)
            with mp.Pool(cfg.workers, initializer=_init_worker, initargs=init) as pool:
                chunk = max(1, min(64, len(pending) // (cfg.workers * 8)))
                for result in pool.imap(_work, pending, chunksize=chunk):
                    handle(result)
                    bar.update(1)
        else:
            _init_worker(source, cfg.resolution, cfg.small, cfg.png_compress)
            for i in pending:
                handle(_work(i))
                bar.update(1)
    except BaseException:
        if to_zip:  # a half-written ZIP is useless; a folder keeps its finished files
            sink.discard()  # type: ignore[union-attr]
        report.written = len(written) if not to_zip else 0
        _write_report(report, cfg, complete=False)  # what is known so far, for the next run
        raise
    finally:
        bar.close()

    if not written:
        if to_zip:
            sink.discard()  # type: ignore[union-attr]
        where = _write_report(report, cfg, complete=False)
        raise SraError(f"none of the {len(source)} images in {cfg.source} could be used "
                       f"(first problem: {report.skipped[0][0]}: {report.skipped[0][1]})"
                       + (f"; every input is listed in {where}" if where else ""))
    order = sorted(written)
    labels = None if source.labels is None else [[names[i], int(source.labels[i])] for i in order]
    sink.write(LABELS_FILE, json.dumps({"labels": labels}).encode())
    sink.close()
    report.written = len(order)
    report.upscaled.sort()  # kept (earlier run) and new ones merged: back to listing order
    if report.upscaled:
        log.info("%d images were smaller than %dpx and were upscaled (ADM behaviour)",
                 len(report.upscaled), cfg.resolution)
    if report.skipped:
        log.warning("%d of %d images skipped", len(report.skipped), len(source))
    where = _write_report(report, cfg, complete=True)
    log.info("wrote %d of %d images to %s (%d skipped, %d upscaled, %d non-image files ignored); "
             "report: %s", report.written, report.total, cfg.dest, len(report.skipped),
             len(report.upscaled), len(report.not_images), where or "not written")
    return report

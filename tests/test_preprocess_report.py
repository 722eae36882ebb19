"""`sra preprocess images` keeps a JSON report: skipped inputs with reasons, upscaled inputs and
non-image files, written atomically, named in the final log line, carried over on resume."""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from sra.cli import main as cli_main
from sra.data.formats import image_name
from sra.data.images import REPORT_FILE, ImagesConfig, preprocess_images, report_path
from sra.errors import SraError

RES = 32


def _tree(root) -> None:
    """a/good.png (big enough), a/small.png (upscaled or skipped), b/corrupt.JPEG, a/notes.txt."""
    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "a" / "good.png")
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / "a" / "small.png")
    (root / "b" / "corrupt.JPEG").write_bytes(rng.bytes(512))
    (root / "a" / "notes.txt").write_text("not an image")


def _cfg(src, dest, **kw) -> ImagesConfig:
    return ImagesConfig(str(src), str(dest), resolution=RES, workers=1, progress=False, **kw)


def test_report_lists_skipped_upscaled_and_non_images(tmp_path, caplog):
    _tree(tmp_path / "raw")
    dest = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="sra.data"):
        rep = preprocess_images(_cfg(tmp_path / "raw", dest))
    path = dest / REPORT_FILE
    assert rep.report_path == str(path) == report_path(str(dest))
    report = json.loads(path.read_text())
    assert report["complete"] is True
    assert (report["inputs"], report["written"], report["reused"]) == (3, 2, 0)
    assert [s["input"] for s in report["skipped"]] == ["b/corrupt.JPEG"]
    assert "unreadable" in report["skipped"][0]["reason"]
    assert report["upscaled"] == ["a/small.png"]
    assert [f["file"] for f in report["not_images"]] == ["a/notes.txt"]
    assert "not an image" in report["not_images"][0]["reason"]
    assert rep.not_images == ["a/notes.txt"]
    # the final log line names the report; no temporary file is left in the output folder
    assert str(path) in caplog.records[-1].getMessage()
    assert sorted(os.listdir(dest)) == sorted(["00000", "dataset.json", REPORT_FILE])
    assert sorted(os.listdir(dest / "00000")) == [os.path.basename(image_name(i)) for i in (0, 1)]

    # --small skip, ZIP output: the report sits beside the ZIP, small input skipped, not upscaled
    zdest = tmp_path / "out.zip"
    rep = preprocess_images(_cfg(tmp_path / "raw", zdest, small="skip"))
    report = json.loads((tmp_path / "out.zip.report.json").read_text())
    assert rep.report_path == str(tmp_path / "out.zip.report.json")
    assert {s["input"]: s["reason"] for s in report["skipped"]}.keys() == {"a/small.png", "b/corrupt.JPEG"}
    assert "smaller than 32px" in next(s["reason"] for s in report["skipped"] if s["input"] == "a/small.png")
    assert report["upscaled"] == [] and report["written"] == 1
    assert [f["file"] for f in report["not_images"]] == ["a/notes.txt"]
    with zipfile.ZipFile(zdest) as zf:  # the report is not inside the dataset
        assert sorted(zf.namelist()) == sorted([image_name(0), "dataset.json"])


def test_report_from_zip_source_and_cli(tmp_path, capsys):
    _tree(tmp_path / "raw")
    src = tmp_path / "raw.zip"
    with zipfile.ZipFile(src, "w") as zf:
        for dirpath, _, files in os.walk(tmp_path / "raw"):
            for f in files:
                full = os.path.join(dirpath, f)
                zf.write(full, os.path.relpath(full, tmp_path / "raw"))
    dest = tmp_path / "out"
    code = cli_main(["preprocess", "images", "--source", str(src), "--dest", str(dest),
                     "--resolution", str(RES), "--workers", "1", "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["report"] == str(dest / REPORT_FILE) and printed["not_images"] == 1
    report = json.loads((dest / REPORT_FILE).read_text())
    assert [f["file"] for f in report["not_images"]] == ["a/notes.txt"]
    assert [s["input"] for s in report["skipped"]] == ["b/corrupt.JPEG"]
    assert report["upscaled"] == ["a/small.png"]


def test_report_on_resume_and_when_nothing_is_usable(tmp_path):
    _tree(tmp_path / "raw")
    dest = tmp_path / "out"
    preprocess_images(_cfg(tmp_path / "raw", dest))
    # simulate an interrupted run: the labels file and the good image are gone, small.png is kept
    os.remove(dest / "dataset.json")
    os.remove(dest / image_name(0))
    rep = preprocess_images(_cfg(tmp_path / "raw", dest))
    report = json.loads((dest / REPORT_FILE).read_text())
    assert (rep.reused, report["reused"], report["written"]) == (1, 1, 2)
    assert report["upscaled"] == ["a/small.png"]  # known from the earlier run's report
    assert [s["input"] for s in report["skipped"]] == ["b/corrupt.JPEG"]

    # every input unusable: one error line pointing at the report, which says it is incomplete
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "raw" / "b", bad / "b")
    with pytest.raises(SraError, match="none of the 1 images.*listed in .*preprocess_report.json") as err:
        preprocess_images(_cfg(bad, tmp_path / "out2"))
    assert "\n" not in str(err.value)
    report = json.loads((tmp_path / "out2" / REPORT_FILE).read_text())
    assert report["complete"] is False and [s["input"] for s in report["skipped"]] == ["b/corrupt.JPEG"]

"""Data that lies is refused when it opens: labels out of range (every format), dataset.json
naming files that are not there, an export folder without its weights; and the check that
blames NaN/inf inputs for a non-finite step, with the indices of the batch that held them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sra.checkpoints import load_weights
from sra.checkpoints.export import write_export
from sra.cli import main
from sra.data import build_dataset
from sra.data.checks import check_labels, check_labels_fit, nonfinite_report, nonfinite_samples
from sra.data.formats import latent_name, moments_info
from sra.data.packed import write_packed_header
from sra.data.paired import with_images
from sra.data.sources import open_image_source
from sra.errors import SraError
from sra.training.batches import Position, ShardedBatchSampler, advance
from tiny_data import packed_data, release_data, zip_dir

OUT_OF_RANGE = [3, 7, -1]  # == num_classes (the null label), > num_classes, negative


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# -- labels out of range -------------------------------------------------------------------------
@pytest.mark.parametrize("bad", OUT_OF_RANGE)
def test_packed_labels_outside_the_declared_classes_are_refused_at_open(tmp_path, bad):
    root = packed_data(tmp_path / "packed", n=8, num_classes=3)
    labels = np.arange(8) % 3
    labels[6] = bad
    np.save(tmp_path / "packed" / "labels.npy", labels)
    with pytest.raises(SraError) as exc:
        build_dataset(root)
    msg = _one_line(exc)
    assert f"labels.npy: label {bad} of sample 6 (shard-00001.npy row 1) is outside 0..2" in msg
    assert "sra-packed.json declares 3 classes" in msg and "1 of 8 labels" in msg
    assert ("null (unconditional) label" in msg) == (bad == 3)


def test_packed_labels_of_another_type_are_refused(tmp_path):
    root = packed_data(tmp_path / "packed", n=4)
    np.save(tmp_path / "packed" / "labels.npy", np.zeros(4, np.float32))
    with pytest.raises(SraError, match="labels must be integers of shape"):
        build_dataset(root)


def test_a_packed_header_is_never_written_for_labels_out_of_range(tmp_path):
    info = moments_info((8, 4, 4), 3)
    with pytest.raises(SraError, match=r"labels.npy: label 3 of sample 1 is outside 0..2"):
        write_packed_header(str(tmp_path), [("shard-00000.npy", 2)], np.array([0, 3]),
                            np.arange(2), info, (8, 4, 4))
    assert not (tmp_path / "sra-packed.json").exists()


@pytest.mark.parametrize("zipped", [False, True])
def test_release_negative_label_is_refused_naming_the_file(tmp_path, zipped):
    release_data(tmp_path / "data", n=6, images=False, labels=[0, 1, 2, -4, 1, 0])
    spec = zip_dir(tmp_path / "data" / "vae-sd", tmp_path / "vae-sd.zip") if zipped \
        else str(tmp_path / "data")
    with pytest.raises(SraError) as exc:
        build_dataset(spec)
    msg = _one_line(exc)
    where = "vae-sd.zip:dataset.json" if zipped else "vae-sd/dataset.json"
    assert f"{where}: label -4 of sample 3 ({latent_name(3)}) is outside 0..2" in msg


@pytest.mark.parametrize("bad", OUT_OF_RANGE)
def test_release_labels_against_a_model_with_fixed_classes(tmp_path, bad):
    """The release format declares no class count (largest label + 1): labels that reach past the
    classes a checkpoint imposes are refused by check_labels_fit, naming the file."""
    labels = [0, 1, 2, 0, bad, 1]
    release_data(tmp_path / "data", n=6, labels=labels)
    if bad < 0:
        with pytest.raises(SraError, match=f"label {bad} of sample 4"):
            build_dataset(str(tmp_path / "data"))
        return
    ds = build_dataset(str(tmp_path / "data"))
    assert ds.info.num_classes == bad + 1
    check_labels_fit(ds, bad + 1, "the --init-from checkpoint c.pt")  # fits: no error
    paired = with_images(ds, str(tmp_path / "data"))  # REPA's (x, image, y) items: same labels
    with pytest.raises(SraError) as exc:
        check_labels_fit(paired, 3, "the --init-from checkpoint c.pt")
    msg = _one_line(exc)
    assert (f"dataset.json: label {bad} of sample 4 ({latent_name(4)}) is outside 0..2 (the "
            "--init-from checkpoint c.pt has 3 classes)") in msg


def test_images_negative_label_is_refused_naming_the_image(tmp_path):
    release_data(tmp_path / "data", n=4, labels=[0, -1, 1, 2])
    (tmp_path / "data" / "vae-sd" / "dataset.json").unlink()  # only images/ is read here
    with pytest.raises(SraError) as exc:
        open_image_source(str(tmp_path / "data" / "images"))
    msg = _one_line(exc)
    assert "images/dataset.json: label -1 of sample 1 (00000/img00000001.png) is outside 0..2" in msg


def test_digits_labels_are_checked(monkeypatch):
    import sra.data.digits as digits

    images, labels = digits.load_digits_arrays()
    labels = labels.copy()
    labels[5] = 10
    monkeypatch.setattr(digits, "load_digits_arrays", lambda size=16: (images, labels))
    with pytest.raises(SraError, match=r"label 10 of sample 5 is outside 0..9 .*null \(uncond"):
        build_dataset("digits")


def test_label_check_is_one_pass_and_finds_the_first_culprit():
    labels = np.zeros(100, np.int64)
    check_labels(labels, 1, "x")
    labels[[40, 70]] = [5, -2]
    with pytest.raises(SraError, match=r"x: label 5 of sample 40 .* 2 of 100 labels"):
        check_labels(labels, 5, "x")
    with pytest.raises(SraError, match="number of classes must be ≥ 1"):
        check_labels(labels[:0], 0, "x")


def test_sra_train_on_packed_labels_out_of_range_exits_2_and_writes_nothing(tmp_path, capsys):
    root = packed_data(tmp_path / "packed", n=40, num_classes=3)
    np.save(tmp_path / "packed" / "labels.npy", np.arange(40) % 4)  # labels 3 = the null label
    code = main(["train", "--preset", "digits", "--data-dir", root, "--output-dir",
                 str(tmp_path / "runs"), "--exp-name", "run", "--report-to", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("sra train: error: ") and "label 3 of sample 3" in err and "0..2" in err
    assert not (tmp_path / "runs").exists()


# -- dataset.json against the files ----------------------------------------------------------------
def test_release_dataset_json_names_the_missing_and_the_unlabelled_files(tmp_path):
    release_data(tmp_path / "data", n=6, images=False)
    root = tmp_path / "data" / "vae-sd"
    for k in (1, 4):
        (root / latent_name(k)).unlink()
    with pytest.raises(SraError) as exc:
        build_dataset(str(root))
    msg = _one_line(exc)
    assert "lists 6 labels but there are 4 .npy files" in msg
    assert f"2 listed file(s) are not there ({latent_name(1)}, {latent_name(4)})" in msg
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = [[n.replace("00000002", "00000009"), c] for n, c in meta["labels"]]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(SraError) as exc:
        build_dataset(str(root))
    msg = _one_line(exc)
    assert f"1 of the .npy files have no label ({latent_name(2)})" in msg


def test_images_dataset_json_names_the_missing_images(tmp_path):
    release_data(tmp_path / "data", n=7, images=True)
    images = tmp_path / "data" / "images"
    for k in range(5):
        (images / f"00000/img{k:08d}.png").unlink()
    with pytest.raises(SraError) as exc:
        open_image_source(str(images))
    msg = _one_line(exc)
    assert "lists 7 labels but there are 2 images" in msg
    assert "5 listed file(s) are not there (00000/img00000000.png, 00000/img00000001.png, " \
           "00000/img00000002.png, …)" in msg


# -- an export folder without its weights -----------------------------------------------------------
def test_an_export_without_its_weights_says_what_is_missing(tmp_path, capsys):
    out = write_export(tmp_path / "export", {"w": torch.zeros(2)}, {"model": {}}, "card")
    (out / "model.safetensors").unlink()
    code = main(["sample", "--ckpt", str(out), "--num-samples", "2", "--output-dir",
                 str(tmp_path / "samples")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == (f"sra sample: error: {out} is an sra export folder but its model.safetensors "
                   "is missing")
    assert not (tmp_path / "samples").exists()
    out = write_export(tmp_path / "torn", {"w": torch.zeros(2)}, {"model": {}}, "card")
    (out / "config.json").unlink()  # written last: an interrupted export or a partial copy
    with pytest.raises(SraError, match="holds model.safetensors but no config.json: an incomplete"):
        load_weights(out)  # what --init-from and --ckpt both go through
    (tmp_path / "empty").mkdir()
    with pytest.raises(SraError, match="holds no complete checkpoint"):
        load_weights(tmp_path / "empty")


# -- non-finite inputs -----------------------------------------------------------------------------
def test_nonfinite_samples_names_the_dataset_indices():
    x = torch.randn(4, 2, 3, 3)
    indices = [17, 3, 250, 9]
    assert nonfinite_samples(x, indices) == [] and nonfinite_report([], 4) is None
    x[1, 0, 2, 2] = float("nan")
    x[3, 1, 0, 0] = float("-inf")
    assert nonfinite_samples(x, indices) == [3, 9]
    assert nonfinite_samples(torch.zeros(2, 3, dtype=torch.uint8), [0, 1]) == []
    with pytest.raises(ValueError, match="3 indices for a batch of 4"):
        nonfinite_samples(x, indices[:3])


def test_the_failing_batch_is_found_from_the_loop_position(tmp_path):
    """The loop counts micro-batches; indices_at(position) gives the rows a batch held, and the
    report names the samples and the file of the first."""
    ds = build_dataset(packed_data(tmp_path / "packed", n=20, num_classes=3))
    sampler = ShardedBatchSampler(len(ds), 3, rank=1, world=2, seed=5, start=Position(0, 1))
    stream = iter(sampler)
    batches = [next(stream) for _ in range(7)]  # crosses the epoch end (3 batches per epoch)
    for k, want in enumerate(batches):
        assert sampler.indices_at(advance(Position(0, 1), k, sampler.batches_per_epoch)) == want
    idx = batches[-1]
    x = torch.stack([ds[i][0] for i in idx])
    x[2, 0, 0, 0] = float("nan")
    report = nonfinite_report(nonfinite_samples(x, idx), len(idx), ds)
    assert report is not None and "\n" not in report
    assert f"1 of 3 samples of the batch, dataset indices {idx[2]} " in report
    assert f"(first: {ds.sample_name(idx[2])})" in report

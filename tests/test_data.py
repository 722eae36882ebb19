"""Data pipeline: ADM crop, images layout, VAE encode (release + packed), resume, bad input."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from sra.data import build_dataset, dataset_kind
from sra.data.base import SD_VAE_SCALE, draw_latents
from sra.data.crop import adm_center_crop, adm_crop_plan, to_rgb
from sra.data.encode import EncodeConfig, encode_images
from sra.data.formats import image_name, latent_name
from sra.data.images import ImagesConfig, preprocess_images
from sra.data.packed import PackedLatentDataset
from sra.data.release import ReleaseLatentDataset, pack_release
from sra.data.sources import open_image_source
from sra.data.vae import encode_moments, load_vae, save_tiny_vae
from sra.errors import SraError
from tiny_data import zip_dir

RES = 32  # image side used throughout: latents are 4×4


# ----------------------------------------------------------------------------- helpers


def _rand_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path, arr_or_image, fmt: str = "png") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    img.save(path, format=fmt)


def _images_layout(root, n: int, seed: int = 0, num_classes: int = 3) -> tuple[list[np.ndarray], list[int]]:
    """An images/ layout of n RES×RES PNGs with dataset.json; returns the arrays and labels."""
    rng = np.random.default_rng(seed)
    arrays, labels, entries = [], [], []
    for i in range(n):
        arr = _rand_image(rng, RES, RES)
        _save(os.path.join(root, image_name(i)), arr)
        arrays.append(arr)
        labels.append(int((i * 7) % num_classes))
        entries.append([image_name(i), labels[-1]])
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"labels": entries}, f)
    return arrays, labels


def _expected_moments(vae, arr: np.ndarray, flip: bool = False) -> np.ndarray:
    px = torch.from_numpy(arr).permute(2, 0, 1)[None]  # (1, 3, H, W)
    if flip:
        px = px.flip(-1)
    return encode_moments(vae, px)[0].numpy()


@pytest.fixture(scope="module")
def data_tiny_vae(tmp_path_factory) -> str:
    """A tiny AutoencoderKL saved with save_pretrained (loaded through from_pretrained)."""
    return save_tiny_vae(str(tmp_path_factory.mktemp("vae") / "tiny-vae"), seed=0)


@pytest.fixture(scope="module")
def data_vae(data_tiny_vae):
    return load_vae(data_tiny_vae)


def _encode_cfg(source, dest, vae_path, **kw) -> EncodeConfig:
    base = dict(source=str(source), dest=str(dest), vae=vae_path, batch_size=3, workers=0,
                shard_size=4, progress=False)
    base.update(kw)
    return EncodeConfig(**base)


# ----------------------------------------------------------------------------- crop


@pytest.mark.parametrize(
    "w,h,res,halvings,resized,offset",
    [
        (1001, 517, 128, 2, (248, 128), (60, 0)),  # 1001x517 → 500x258 → 250x129 → bicubic
        (77, 53, 32, 0, (46, 32), (7, 0)),  # round(77·32/53) = 46
        (513, 1025, 256, 1, (256, 512), (0, 128)),  # exactly 2·res after one halving stops
        (255, 300, 256, 0, (256, 301), (0, 22)),  # smaller than res: upsampled
    ],
)
def test_crop_plan_odd_sizes(w, h, res, halvings, resized, offset):
    plan = adm_crop_plan(w, h, res)
    assert (plan.halvings, plan.resized_size, plan.offset) == (halvings, resized, offset)
    assert plan.upsampled == (min(w, h) < res)
    out = adm_center_crop(Image.fromarray(np.full((h, w, 3), 77, np.uint8)), res)
    assert out.shape == (res, res, 3) and out.dtype == np.uint8
    assert np.all(out == 77)  # a flat image stays flat through BOX + bicubic


def test_crop_takes_the_center_and_matches_the_pil_steps():
    rng = np.random.default_rng(1)
    # No resampling (short side == res): the crop must be exactly the centered columns.
    grad = np.tile(np.arange(97, dtype=np.uint8)[None, :, None], (64, 1, 3))  # (64, 97, 3)
    out = adm_center_crop(Image.fromarray(grad), 64)
    assert np.array_equal(out[0, :, 0], np.arange(16, 80))  # offset (97 − 64) // 2 = 16
    # With halvings and a bicubic step: the same as running the PIL steps by hand.
    arr = _rand_image(rng, 301, 203)
    img = Image.fromarray(arr)
    step = img.resize((150, 101), Image.Resampling.BOX)  # 203 ≥ 2·48 twice → 150x101 → 75x50
    step = step.resize((75, 50), Image.Resampling.BOX)
    step = np.asarray(step.resize((72, 48), Image.Resampling.BICUBIC))  # round(75·48/50) = 72
    assert np.array_equal(adm_center_crop(img, 48), step[:, 12:60])


def test_to_rgb_handles_grayscale_palette_alpha_cmyk_and_16bit():
    base = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rgb = Image.fromarray(base)
    for mode in ("L", "LA", "P", "RGBA", "CMYK", "1"):
        out = np.asarray(to_rgb(rgb.convert(mode)))
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8, mode
    assert np.array_equal(np.asarray(to_rgb(rgb.convert("RGBA"))), base)  # alpha dropped, colour kept
    wide = Image.fromarray(np.full((4, 4), 32896, np.uint16))  # mid-grey in 16 bits
    assert np.all(np.asarray(to_rgb(wide)) == 128)  # rescaled, not clipped to white


# ----------------------------------------------------------------------------- images step


def _class_tree(root) -> dict[str, list[str]]:
    """Three classes created out of sorted order, odd sizes and odd modes."""
    rng = np.random.default_rng(3)
    tree = {"zebra": ["b.png", "a.jpg"], "apple": ["x.png"], "mango": ["m2.png", "m1.png", "m0.bmp"]}
    for cls, files in tree.items():
        for j, f in enumerate(files):
            img = Image.fromarray(_rand_image(rng, 40 + 7 * j, 33 + 5 * j))
            if f == "a.jpg":
                img = img.convert("CMYK")
            elif f == "m1.png":
                img = img.convert("L")
            elif f == "m2.png":
                img = img.convert("RGBA")
            _save(os.path.join(root, cls, f), img, fmt={"png": "png", "jpg": "jpeg", "bmp": "bmp"}[f[-3:]])
    (root / "notes.txt").write_text("not an image")
    return tree


def test_images_label_order_layout_and_zip(tmp_path):
    _class_tree(tmp_path / "raw")
    report = preprocess_images(ImagesConfig(str(tmp_path / "raw"), str(tmp_path / "img"),
                                            resolution=RES, workers=2, progress=False))
    assert (report.total, report.written, report.num_classes, report.skipped) == (6, 6, 3, [])
    labels = json.loads((tmp_path / "img" / "dataset.json").read_text())["labels"]
    # sorted relative paths: apple/x, mango/m0, mango/m1, mango/m2, zebra/a, zebra/b
    assert labels == [[image_name(i), c] for i, c in enumerate([0, 1, 1, 1, 2, 2])]
    src = open_image_source(str(tmp_path / "raw"))
    assert src.class_names == ["apple", "mango", "zebra"]
    for i, name in enumerate(src.names):
        out = np.asarray(Image.open(tmp_path / "img" / image_name(i)))
        assert out.shape == (RES, RES, 3)
        assert np.array_equal(out, adm_center_crop(Image.open(tmp_path / "raw" / name), RES))
    # The ZIP output holds the same files, and reading it back as a source keeps the labels.
    preprocess_images(ImagesConfig(str(tmp_path / "raw"), str(tmp_path / "img.zip"), resolution=RES,
                                   workers=1, progress=False))
    with zipfile.ZipFile(tmp_path / "img.zip") as zf:
        assert sorted(zf.namelist()) == sorted([image_name(i) for i in range(6)] + ["dataset.json"])
        assert zf.read(image_name(4)) == (tmp_path / "img" / image_name(4)).read_bytes()
    zsrc = open_image_source(str(tmp_path / "img.zip"))
    assert zsrc.labels.tolist() == [0, 1, 1, 1, 2, 2]


def test_class_folders_one_level_below_a_single_root_warn(tmp_path, caplog):
    rng = np.random.default_rng(6)
    for cls in ("n2", "n1"):
        _save(str(tmp_path / "data" / "train" / cls / "a.png"), _rand_image(rng, 9, 9))
    assert open_image_source(str(tmp_path / "data" / "train")).labels.tolist() == [0, 1]
    zpath = zip_dir(tmp_path / "data", tmp_path / "train.zip")  # names start with train/
    with caplog.at_level(logging.WARNING, logger="sra.data"):
        src = open_image_source(zpath)
    assert src.labels is None and src.num_classes == 1 and "one folder 'train'" in caplog.text


def test_images_bad_input_and_skips(tmp_path, caplog):
    with pytest.raises(SraError, match="does not exist"):
        preprocess_images(ImagesConfig(str(tmp_path / "nope"), str(tmp_path / "o1"), resolution=RES))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(SraError, match="no images found"):
        preprocess_images(ImagesConfig(str(tmp_path / "empty"), str(tmp_path / "o2"), resolution=RES))
    with pytest.raises(SraError, match="multiple of 8"):
        preprocess_images(ImagesConfig(str(tmp_path / "empty"), str(tmp_path / "o3"), resolution=30))
    rng = np.random.default_rng(4)
    raw = tmp_path / "raw"
    _save(str(raw / "a" / "good.png"), _rand_image(rng, 50, 40))
    _save(str(raw / "a" / "small.png"), _rand_image(rng, 20, 24))
    buf = io.BytesIO()
    Image.fromarray(_rand_image(rng, 64, 64)).save(buf, format="png")
    (raw / "b").mkdir()
    (raw / "b" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (raw / "b" / "garbage.jpg").write_bytes(b"definitely not a jpeg")
    _save(str(raw / "b" / "ok.png"), _rand_image(rng, 33, 35))
    with caplog.at_level(logging.WARNING, logger="sra.data"):
        rep = preprocess_images(ImagesConfig(str(raw), str(tmp_path / "out"), resolution=RES,
                                             small="skip", workers=1, progress=False))
    skipped = {name for name, _ in rep.skipped}
    assert skipped == {"b/truncated.png", "b/garbage.jpg", "a/small.png"}
    for name in skipped:
        assert name in caplog.text
    # Input numbering is kept: gaps where inputs were skipped, labels still those of the inputs.
    labels = json.loads((tmp_path / "out" / "dataset.json").read_text())["labels"]
    assert labels == [[image_name(0), 0], [image_name(3), 1]]  # a/good, b/ok (sorted listing)
    # Default policy upscales small inputs (ADM) and counts them.
    rep2 = preprocess_images(ImagesConfig(str(raw / "a"), str(tmp_path / "out2"), resolution=RES,
                                          workers=1, progress=False))
    assert rep2.upscaled == ["small.png"] and rep2.written == 2
    with pytest.raises(SraError, match="already holds"):
        preprocess_images(ImagesConfig(str(raw / "a"), str(tmp_path / "out2"), resolution=RES, workers=1))


# ----------------------------------------------------------------------------- encode


def test_encode_release_and_packed_round_trip(tmp_path, data_tiny_vae, data_vae):
    arrays, labels = _images_layout(tmp_path / "images", 10)
    rep = encode_images(_encode_cfg(tmp_path / "images", tmp_path / "lat", data_tiny_vae, flip=True))
    assert (rep.total_images, rep.encoded_images, rep.samples, rep.shards) == (10, 10, 20, 3)
    # (a) the release layout: one float32 (8, 4, 4) file per sample, flips at N + i.
    meta = json.loads((tmp_path / "lat" / "vae-sd" / "dataset.json").read_text())
    assert meta["labels"] == [[latent_name(k), labels[k % 10]] for k in range(20)]
    for k in (0, 3, 9, 10, 17):
        got = np.load(tmp_path / "lat" / "vae-sd" / latent_name(k))
        assert got.dtype == np.float32 and got.shape == (8, 4, 4)
        want = _expected_moments(data_vae, arrays[k % 10], flip=k >= 10)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    release = ReleaseLatentDataset(str(tmp_path / "lat" / "vae-sd"))
    assert len(release) == 20 and release.info.resolution == RES and release.info.channels == 4
    # (b) packed: equal to the per-file data row by row, labels and scale stored inside.
    packed = build_dataset(str(tmp_path / "lat"), resolution=RES)
    assert isinstance(packed, PackedLatentDataset) and len(packed) == 20
    assert packed.info == release.info
    assert packed.info.num_classes == 3 and packed.info.latent_scale == SD_VAE_SCALE
    pos = {int(n): j for j, n in enumerate(release.file_numbers())}
    for row, number in enumerate(packed.index):
        x, y = packed[row]
        rx, ry = release[pos[int(number)]]
        assert torch.equal(x, rx) and y == ry
    batch = packed.read_many([19, 0, 7, 7, 12])
    assert np.array_equal(batch[2], packed.read(7)) and np.array_equal(batch[0], packed.read(19))
    # The release ZIP reads the same, also from DataLoader workers (lazy per-process open).
    zpath = zip_dir(tmp_path / "lat" / "vae-sd", tmp_path / "vae-sd.zip")
    zds = build_dataset(zpath, resolution=RES)
    assert isinstance(zds, ReleaseLatentDataset) and zds.is_zip
    xs, ys = next(iter(torch.utils.data.DataLoader(zds, batch_size=20, num_workers=2)))
    assert torch.equal(xs, torch.stack([release[i][0] for i in range(20)]))
    assert ys.tolist() == release.labels.tolist()
    # A DataLoader over packed data uses the batched fetch and gives the same rows.
    px, py = next(iter(torch.utils.data.DataLoader(packed, batch_size=20, num_workers=0)))
    assert torch.equal(px[5], packed[5][0]) and py.tolist() == packed.labels.tolist()
    assert len(pickle.dumps(packed)) < 10_000  # pickles the paths, not the mapped data
    with pytest.raises(SraError, match="--resolution is 64"):
        build_dataset(str(tmp_path / "lat" / "vae-sd"), resolution=64)
    # pack: release ZIP → packed equals the encoder's packed data.
    repacked = pack_release(zpath, str(tmp_path / "repacked"), shard_size=6, progress=False)
    assert len(repacked) == 20 and repacked.info == packed.info
    for j in range(20):
        assert np.array_equal(repacked.read(j), release.read(j))
    assert repacked.index.tolist() == release.file_numbers().tolist()


def test_encode_resume_after_interrupt(tmp_path, data_tiny_vae, monkeypatch):
    import sra.data.encode as enc
    import sra.data.encode_shards as shards

    _images_layout(tmp_path / "images", 11)  # shards of 4: [0-3] [4-7] [8-10], batches of 3
    real_moments, real_shard = shards.encode_moments, enc.encode_shard
    n_calls = [0]

    def dying(vae, pixels):
        n_calls[0] += 1
        if n_calls[0] == 4:  # second batch of shard 1: dies mid-shard, half a packed file written
            raise KeyboardInterrupt
        return real_moments(vae, pixels)

    monkeypatch.setattr(shards, "encode_moments", dying)
    cfg = _encode_cfg(tmp_path / "images", tmp_path / "lat", data_tiny_vae)
    with pytest.raises(KeyboardInterrupt):
        encode_images(cfg)
    assert sorted(os.listdir(tmp_path / "lat" / "progress")) == ["shard-00000.json"]
    assert sorted(os.listdir(tmp_path / "lat" / "packed")) == ["shard-00000.npy"]  # no .partial left
    monkeypatch.setattr(shards, "encode_moments", real_moments)
    calls: list[int] = []

    def counting(k, *args, **kw):
        calls.append(k)
        return real_shard(k, *args, **kw)

    monkeypatch.setattr(enc, "encode_shard", counting)
    rep = encode_images(cfg)
    assert calls == [1, 2] and rep.shards_reused == 1 and rep.samples == 11
    fresh = encode_images(_encode_cfg(tmp_path / "images", tmp_path / "fresh", data_tiny_vae))
    a, b = build_dataset(rep.packed_dir), build_dataset(fresh.packed_dir)
    assert np.array_equal(a.read_many(range(11)), b.read_many(range(11)))
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.index, b.index)
    assert (tmp_path / "lat" / "vae-sd" / "dataset.json").read_text() == \
        (tmp_path / "fresh" / "vae-sd" / "dataset.json").read_text()
    calls.clear()
    assert encode_images(cfg).shards_reused == 3 and calls == []  # finished: nothing redone
    with pytest.raises(SraError, match="other settings.*flip"):
        encode_images(_encode_cfg(tmp_path / "images", tmp_path / "lat", data_tiny_vae, flip=True))


def test_encode_skips_corrupt_images_and_keeps_labels(tmp_path, data_tiny_vae, caplog):
    arrays, labels = _images_layout(tmp_path / "images", 9)
    bad = {2: image_name(2), 5: image_name(5)}
    data = (tmp_path / "images" / bad[2]).read_bytes()
    (tmp_path / "images" / bad[2]).write_bytes(data[: len(data) // 3])  # truncated PNG
    (tmp_path / "images" / bad[5]).write_bytes(b"\x89PNG garbage")  # unreadable
    with caplog.at_level(logging.WARNING, logger="sra.data"):
        rep = encode_images(_encode_cfg(tmp_path / "images", tmp_path / "lat", data_tiny_vae))
    assert sorted(n for n, _ in rep.skipped) == sorted(bad.values())
    assert all(name in caplog.text for name in bad.values())
    assert rep.encoded_images == 7 and rep.samples == 7
    assert json.loads((tmp_path / "lat" / "skipped.json").read_text())["count"] == 2
    packed = build_dataset(rep.packed_dir)
    assert sorted(packed.index.tolist()) == [0, 1, 3, 4, 6, 7, 8]
    assert packed.labels.tolist() == [labels[i] for i in packed.index]
    release = build_dataset(rep.release_dir)
    assert release.labels.tolist() == [labels[i] for i in (0, 1, 3, 4, 6, 7, 8)]
    assert not (tmp_path / "lat" / "vae-sd" / latent_name(2)).exists()


def test_encode_crop_mode_zip_source_and_workers(tmp_path, data_tiny_vae, data_vae):
    _class_tree(tmp_path / "raw")
    zpath = zip_dir(tmp_path / "raw", tmp_path / "raw.zip")
    rep = encode_images(_encode_cfg(zpath, tmp_path / "lat", data_tiny_vae, crop=True,
                                    resolution=RES, workers=2, layouts=("packed",), latent_scale=0.5))
    assert rep.samples == 6 and rep.release_dir is None
    assert not (tmp_path / "lat" / "vae-sd").exists()
    ds = build_dataset(str(tmp_path / "lat"))
    assert ds.info.latent_scale == 0.5 and ds.labels.tolist() == [0, 1, 1, 1, 2, 2]
    src = open_image_source(zpath)
    for row, i in enumerate(ds.index):
        want = _expected_moments(data_vae, adm_center_crop(src.read(int(i)), RES))
        np.testing.assert_allclose(ds.read(row), want, rtol=1e-5, atol=1e-5)
    # draw_latents uses the stored scale: with std zeroed, z = mean · 0.5.
    x = torch.from_numpy(ds.read_many([0, 1]))
    x[:, 4:] = 0
    assert torch.allclose(draw_latents(x, ds.info), x[:, :4] * 0.5)


def test_encode_bad_input(tmp_path, data_tiny_vae):
    _images_layout(tmp_path / "images", 3)
    with pytest.raises(SraError, match="does not match|but --resolution is 64"):
        encode_images(_encode_cfg(tmp_path / "images", tmp_path / "a", data_tiny_vae, resolution=64))
    with pytest.raises(SraError, match="--crop needs --resolution"):
        encode_images(_encode_cfg(tmp_path / "images", tmp_path / "b", data_tiny_vae, crop=True))
    with pytest.raises(SraError, match="cannot load VAE"):
        encode_images(_encode_cfg(tmp_path / "images", tmp_path / "c", str(tmp_path / "no-vae")))
    with pytest.raises(SraError, match="unknown layout"):
        encode_images(_encode_cfg(tmp_path / "images", tmp_path / "d", data_tiny_vae, layouts=("tar",)))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(SraError, match="not empty"):
        encode_images(_encode_cfg(tmp_path / "images", tmp_path / "busy", data_tiny_vae))
    # Label count in dataset.json not matching the images.
    meta = json.loads((tmp_path / "images" / "dataset.json").read_text())
    meta["labels"] = meta["labels"][:2]
    (tmp_path / "images" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(SraError, match="lists 2 labels but there are 3 images"):
        encode_images(_encode_cfg(tmp_path / "images", tmp_path / "e", data_tiny_vae))
    # Non-square raw images without --crop.
    _save(str(tmp_path / "raw" / "a" / "x.png"), np.zeros((40, 48, 3), np.uint8))
    with pytest.raises(SraError, match="48x40"):
        encode_images(_encode_cfg(tmp_path / "raw", tmp_path / "f", data_tiny_vae))


def test_release_reader_bad_input(tmp_path):
    root = tmp_path / "vae-sd"
    (root / "00000").mkdir(parents=True)
    rng = np.random.default_rng(5)
    for k in range(3):
        np.save(root / latent_name(k), rng.standard_normal((8, 4, 4)).astype(np.float32))
    (root / "dataset.json").write_text(json.dumps({"labels": [[latent_name(k), k] for k in range(3)]}))
    ds = build_dataset(str(tmp_path))  # a data folder holding vae-sd/
    assert len(ds) == 3 and ds.info.num_classes == 3 and dataset_kind(str(root)) == "release"
    np.save(root / latent_name(1), np.zeros((8, 4, 5), np.float32))  # wrong shape mid-dataset
    with pytest.raises(SraError, match="img-mean-std-00000001.npy holds"):
        ds[1]
    np.save(root / latent_name(0), np.zeros((8, 4, 5), np.float32))  # wrong shape at open
    with pytest.raises(SraError, match=r"expected mean‖std \(2C, H, H\)"):
        build_dataset(str(root))
    np.save(root / latent_name(0), np.zeros((8, 4, 4), np.float32))
    np.save(root / latent_name(1), np.zeros((8, 4, 4), np.float32))
    (root / "dataset.json").write_text(json.dumps({"labels": [[latent_name(0), 0]]}))
    with pytest.raises(SraError, match="lists 1 labels but there are 3 .npy files"):
        build_dataset(str(root))
    (root / "dataset.json").unlink()
    with pytest.raises(SraError, match="neither a packed dataset"):
        build_dataset(str(root))
    with pytest.raises(SraError, match="not found; allowed: 'digits'"):
        build_dataset(str(tmp_path / "missing"))
    assert build_dataset("digits", resolution=16).info.kind == "pixels"
    with pytest.raises(SraError, match="the digits are 16x16 pixels, but --resolution is 256"):
        build_dataset("digits", resolution=256)


def test_cli_preprocess_end_to_end(tmp_path, data_tiny_vae, capsys):
    from sra.cli import main

    _class_tree(tmp_path / "raw")
    assert main(["preprocess", "images", "--source", str(tmp_path / "raw"), "--dest",
                 str(tmp_path / "img"), "--resolution", str(RES), "--workers", "1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 6
    assert main(["preprocess", "encode", "--source", str(tmp_path / "img"), "--dest",
                 str(tmp_path / "lat"), "--vae", data_tiny_vae, "--workers", "0", "--batch-size", "4",
                 "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["samples"] == 6 and out["skipped_count"] == 0
    assert main(["preprocess", "pack", "--source", str(tmp_path / "lat" / "vae-sd"), "--dest",
                 str(tmp_path / "pk"), "--no-progress"]) == 0
    assert len(build_dataset(str(tmp_path / "pk"))) == 6
    capsys.readouterr()
    rc = main(["preprocess", "encode", "--source", str(tmp_path / "img"), "--dest", str(tmp_path / "x"),
               "--vae", data_tiny_vae, "--resolution", "64", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--resolution is 64" in err
    shutil.rmtree(tmp_path / "x", ignore_errors=True)

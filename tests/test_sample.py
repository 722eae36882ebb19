"""`sra sample`: world-size invariance (real processes), the ADM npz, resuming, VAE decoding."""

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sra.cli import main
from sra.data.base import DataInfo
from sra.errors import SraError
from sra.models import ModelConfig, build_model
from sra.data.adm_npz import write_adm_npz
from sra.sampling import fixed, outputs
from sra.sampling.decode import ImageDecoder, to_uint8
from sra.sampling.job import SampleJobConfig
from sra.sampling.runner import run_sampling
from sra.sampling.seeding import batch_ranges, make_labels, sample_noise
from sra.viz.grid import make_grid, save_grid

REPO = Path(__file__).resolve().parents[1]


def tiny_state_dict(family="SiT", input_size=16, in_channels=1, seed=0):
    """A tiny model with random (not adaLN-zero) weights so that outputs depend on x, t and y."""
    cfg = ModelConfig(family=family, depth=2, hidden_size=32, num_heads=4, patch_size=2,
                      input_size=input_size, in_channels=in_channels, num_classes=10)
    torch.manual_seed(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    save_file(tiny_state_dict(), str(path))
    return path


def sample_args(ckpt, out, *extra):
    return ["sample", "--ckpt", str(ckpt), "--data-kind", "pixels", "--output-dir", str(out),
            "--no-progress", *extra]


def load_npz(path):
    with np.load(path) as z:
        return z["arr_0"], z["labels"]


def count_generate(monkeypatch):
    calls = []
    real = fixed.generate

    def counting(model, noise, y, cfg, **kw):
        calls.append(noise.shape[0])
        return real(model, noise, y, cfg, **kw)

    monkeypatch.setattr(fixed, "generate", counting)
    return calls


# -- pieces ---------------------------------------------------------------------------------------
def test_labels_noise_and_batches_depend_on_the_index_only():
    lab = make_labels(3, 25, 10, "balanced")
    counts = torch.bincount(lab, minlength=10)
    assert counts.min() == 2 and counts.max() == 3 and counts.sum() == 25
    assert torch.equal(lab, make_labels(3, 25, 10, "balanced"))
    assert not torch.equal(lab, make_labels(4, 25, 10, "balanced"))
    rnd = make_labels(3, 1000, 10, "random")
    assert rnd.min() >= 0 and rnd.max() <= 9 and torch.bincount(rnd).min() < torch.bincount(rnd).max()
    assert torch.all(make_labels(0, 7, 10, class_label=4) == 4)
    with pytest.raises(SraError, match=r"outside 0\.\.9"):
        make_labels(0, 7, 10, class_label=10)
    # noise of sample i does not depend on which other samples share its batch
    a = sample_noise(5, [3, 7, 8], (1, 4, 4))
    b = sample_noise(5, [7], (1, 4, 4))
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(sample_noise(6, [7], (1, 4, 4)), b)
    assert batch_ranges(12, 5) == [(0, 5), (5, 10), (10, 12)]


def test_to_uint8_rounding_and_channels():
    # 255·(x+1)/2 = 10.7 → round 11, truncate 10; out of range is clamped
    x = torch.tensor([10.7 / 127.5 - 1.0, -3.0, 3.0, 1.0]).view(1, 1, 2, 2)
    r, t = to_uint8(x, "round"), to_uint8(x, "truncate")
    assert r.shape == (1, 2, 2, 3) and r.dtype == np.uint8
    assert r[0, :, :, 0].ravel().tolist() == [11, 0, 255, 255]
    assert t[0, :, :, 0].ravel().tolist() == [10, 0, 255, 255]
    assert np.array_equal(r[..., 0], r[..., 2])  # gray repeated to RGB
    # "truncate" is bit-exact with the release's formula
    z = torch.randn(4, 3, 8, 8)
    release = torch.clamp(255.0 * ((z + 1) / 2.0), 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert np.array_equal(to_uint8(z, "truncate"), release)
    diff = to_uint8(z, "round").astype(int) - release.astype(int)
    assert set(np.unique(diff)) <= {0, 1} and 0.3 < diff.mean() < 0.7
    with pytest.raises(SraError, match="1\\|3"):
        to_uint8(torch.zeros(1, 4, 2, 2))


def test_write_adm_npz_streams_an_adm_readable_file(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, (n, 5, 6, 3), dtype=np.uint8) for n in (4, 4, 2)]
    path = write_adm_npz(tmp_path / "s.npz", iter(chunks), 10, (5, 6, 3), np.arange(10))
    arr, labels = load_npz(path)
    assert arr.dtype == np.uint8 and arr.shape == (10, 5, 6, 3)
    assert np.array_equal(arr, np.concatenate(chunks)) and labels.tolist() == list(range(10))
    # what the ADM evaluator does: open arr_0.npy inside the zip and read its npy header
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert (shape, fortran, dtype) == ((10, 5, 6, 3), False, np.dtype(np.uint8))
        assert zf.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED
    with pytest.raises(SraError, match="got 8 images, expected 10"):
        write_adm_npz(tmp_path / "t.npz", iter(chunks[:2]), 10, (5, 6, 3))
    assert not (tmp_path / "t.npz").exists()  # nothing half-written left in place


def test_save_grid_layout(tmp_path):
    imgs = np.stack([np.full((4, 4, 3), 10 * k, np.uint8) for k in range(5)])
    path = save_grid(imgs, tmp_path / "g" / "grid.png", nrow=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 6 + 2, 3 * 6 + 2, 3)
    assert grid[2, 2].tolist() == [0, 0, 0] and grid[8, 8].tolist() == [40, 40, 40]  # tile 4
    assert grid[0, 0].tolist() == [255, 255, 255] and grid[10, 16].tolist() == [255, 255, 255]
    flt = make_grid(torch.ones(4, 1, 3, 3))  # float (N, C, H, W) in [-1, 1]: 2×2
    assert flt.shape == (2 * 5 + 2, 2 * 5 + 2, 3) and flt[2, 2].tolist() == [255, 255, 255]


# -- distribution -----------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_world_size_invariance_two_real_processes(pixel_ckpt, tmp_path):
    """2 processes (env as `accelerate launch` sets it, gloo on CPU) = 1 process, bit for bit,
    with the SDE (per-step noise) and CFG inside a guidance interval."""
    flags = ["--mode", "sde", "--num-steps", "4", "--cfg-scale", "2.0", "--guidance-high", "0.7",
             "--num-samples", "12", "--per-proc-batch-size", "5", "--format", "both"]
    assert main(sample_args(pixel_ckpt, tmp_path / "one", *flags)) == 0
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    procs = [
        subprocess.Popen([sys.executable, "-m", "sra.cli", *sample_args(pixel_ckpt, tmp_path / "two", *flags)],
                         env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    cfg = json.loads((tmp_path / "two" / "sampling_config.json").read_text())
    assert cfg["last_run"]["world_size"] == 2 and cfg["last_run"]["batches_sampled_on_main"] == 2
    one, two = load_npz(tmp_path / "one" / "samples.npz"), load_npz(tmp_path / "two" / "samples.npz")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
    assert one[0].std() > 20  # real images, not a constant
    for i in (0, 6, 11):  # every process wrote its PNGs under the global index
        assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / "samples" / f"{i:06d}.png")), two[0][i])


# -- end to end ------------------------------------------------------------------------------------
def test_end_to_end_pixels_npz_png_and_resume(pixel_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    flags = ["--mode", "euler", "--num-steps", "4", "--num-samples", "12",
             "--per-proc-batch-size", "5", "--format", "both", "--seed", "7"]
    calls = count_generate(monkeypatch)
    assert main(sample_args(pixel_ckpt, out, *flags)) == 0
    assert calls == [5, 5, 2]
    arr, labels = load_npz(out / "samples.npz")
    assert arr.dtype == np.uint8 and arr.shape == (12, 16, 16, 3)
    assert np.array_equal(arr[..., 0], arr[..., 1])  # 1-channel model → gray RGB
    assert np.array_equal(labels, make_labels(7, 12, 10).numpy())
    assert sorted(np.bincount(labels, minlength=10).tolist()) == [1] * 8 + [2] * 2
    assert np.array_equal(np.asarray(Image.open(out / "samples" / "000004.png")), arr[4])
    assert Image.open(out / "grid.png").size == (4 * 18 + 2, 3 * 18 + 2)  # 12 tiles, 4 per row
    cfg = json.loads((out / "sampling_config.json").read_text())
    assert cfg["complete"] and cfg["sampler"]["mode"] == "euler" and cfg["image_shape"] == [16, 16, 3]
    assert cfg["rounding"]["mode"] == "round" and not (out / "shards").exists()

    # resume: a deleted PNG is redone (its batch only) and the npz re-assembled identically
    (out / "samples" / "000007.png").unlink()
    calls.clear()
    assert main(sample_args(pixel_ckpt, out, *flags)) == 0
    assert calls == [5] and (out / "samples" / "000007.png").is_file()
    assert np.array_equal(load_npz(out / "samples.npz")[0], arr)
    calls.clear()
    assert main(sample_args(pixel_ckpt, out, *flags)) == 0
    assert calls == []
    # a different config in the same folder is refused
    with pytest.raises(SraError, match="differs in: seed"):
        run_sampling(SampleJobConfig(ckpt=str(pixel_ckpt), output_dir=str(out), num_samples=12,
                                     batch_size=5, seed=8, data_kind="pixels", progress=False,
                                     sampler_overrides={"mode": "euler", "steps": 4},
                                     formats=("png", "npz")))

    # an npz-only run interrupted after 2 batches resumes from its shards to the same result
    out2 = tmp_path / "out2"
    flags2 = [f for f in flags if f != "both"]
    flags2[flags2.index("--format") + 1:flags2.index("--format") + 1] = ["npz"]
    real_write = outputs.write_shard

    def crash_on_third(path, *a):
        if len(list(path.parent.glob("batch-*.npz"))) == 2:
            raise KeyboardInterrupt
        real_write(path, *a)

    monkeypatch.setattr(outputs, "write_shard", crash_on_third)
    calls.clear()
    assert main(sample_args(pixel_ckpt, out2, *flags2)) == 130
    assert len(list((out2 / "shards").glob("batch-*.npz"))) == 2 and not (out2 / "samples.npz").exists()
    monkeypatch.setattr(outputs, "write_shard", real_write)
    calls.clear()
    assert main(sample_args(pixel_ckpt, out2, *flags2)) == 0
    assert calls == [2]
    assert np.array_equal(load_npz(out2 / "samples.npz")[0], arr)
    assert not (out2 / "shards").exists() and not (out2 / "samples").exists()


def test_sample_fixed_gives_what_sra_sample_gives(pixel_ckpt, tmp_path):
    """The one fixed-noise scheme: sample_fixed with a job's seed, labels and batch size returns
    that job's samples bit for bit (SDE: the solver noise is per batch too)."""
    from sra.checkpoints import load_model
    from sra.sampling import SamplerConfig, sample_fixed

    flags = ["--mode", "sde", "--num-steps", "3", "--cfg-scale", "2.0", "--num-samples", "7",
             "--per-proc-batch-size", "3", "--seed", "5", "--grid-size", "0"]
    assert main(sample_args(pixel_ckpt, tmp_path / "job", *flags)) == 0
    arr, labels = load_npz(tmp_path / "job" / "samples.npz")
    model, _ = load_model(str(pixel_ckpt))
    sampler = SamplerConfig(mode="sde", steps=3, cfg_scale=2.0)
    x = sample_fixed(model, 7, seed=5, sampler=sampler, labels=torch.from_numpy(labels), batch_size=3)
    assert x.shape == (7, 1, 16, 16) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert np.array_equal(to_uint8(x), arr)
    # default labels cycle the classes; a trace of the autocast factory shows it wraps the network
    entered = []

    class Ctx:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    y = sample_fixed(model, 4, seed=5, sampler=sampler, batch_size=3, autocast=Ctx)
    z = sample_fixed(model, 4, seed=5, sampler=sampler, labels=torch.arange(4) % 10, batch_size=3)
    assert torch.equal(y, z) and len(entered) == 2 * 3  # 2 batches × 3 network calls
    with pytest.raises(SraError, match="labels must have shape"):
        sample_fixed(model, 4, seed=5, sampler=sampler, labels=torch.arange(3))


def test_run_sampling_without_grid_writer_writes_no_grid(pixel_ckpt, tmp_path):
    job = SampleJobConfig(ckpt=str(pixel_ckpt), output_dir=str(tmp_path / "o"), num_samples=3,
                          batch_size=2, data_kind="pixels", progress=False,
                          sampler_overrides={"mode": "euler", "steps": 2})
    path = run_sampling(job)
    cfg = json.loads((tmp_path / "o" / "sampling_config.json").read_text())
    assert path.is_file() and not (tmp_path / "o" / "grid.png").exists() and cfg["files"]["grid"] is None
    written = []
    job = dataclasses.replace(job, output_dir=str(tmp_path / "g"), grid_size=2)
    run_sampling(job, write_grid=lambda images, p: written.append((images.shape, p.name)))
    assert written == [((2, 16, 16, 3), "grid.png")]


def test_release_pt_ema_weights_and_dit_modes(tmp_path, capsys):
    ema, raw = tiny_state_dict(seed=1), tiny_state_dict(seed=2)
    torch.save({"ema": ema, "model": raw, "args": argparse.Namespace(path_type="linear")},
               tmp_path / "release.pt")
    save_file(ema, str(tmp_path / "ema.safetensors"))
    flags = ["--mode", "heun", "--num-steps", "3", "--num-samples", "4", "--per-proc-batch-size", "4"]
    for name, ckpt, extra in (("ema", "release.pt", []), ("model", "release.pt", ["--weights", "model"]),
                              ("bare", "ema.safetensors", [])):
        assert main(sample_args(tmp_path / ckpt, tmp_path / name, *flags, *extra)) == 0
    a, b, c = (load_npz(tmp_path / n / "samples.npz")[0] for n in ("ema", "model", "bare"))
    assert np.array_equal(a, c) and not np.array_equal(a, b)

    save_file(tiny_state_dict("DiT"), str(tmp_path / "dit.safetensors"))
    for mode in ("ddpm", "ddim"):
        args = sample_args(tmp_path / "dit.safetensors", tmp_path / mode, "--mode", mode, "--num-steps",
                           "5", "--cfg-scale", "1.5", "--num-samples", "3", "--per-proc-batch-size", "2",
                           "--mixed-precision", "bf16", "--class-label", "3")
        assert main(args) == 0
        arr, labels = load_npz(tmp_path / mode / "samples.npz")
        assert arr.shape == (3, 16, 16, 3) and labels.tolist() == [3, 3, 3]
    capsys.readouterr()

    # bad input: one line on stderr, exit code 2
    bad = [
        (sample_args(tmp_path / "ema.safetensors", tmp_path / "x", "--mode", "ddpm"), "allowed: euler, heun, sde"),
        (sample_args(tmp_path / "dit.safetensors", tmp_path / "x", "--preset", "paper-256"), "allowed: ddpm, ddim"),
        (["sample", "--ckpt", str(tmp_path / "ema.safetensors"), "--output-dir", str(tmp_path / "x")], "--data-kind"),
        (sample_args(tmp_path / "ema.safetensors", tmp_path / "x", "--class-label", "10"), "outside 0..9"),
        (sample_args(tmp_path / "missing.pt", tmp_path / "x"), "not found"),
    ]
    for argv, message in bad:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    assert not (tmp_path / "x").exists()


def test_vae_decoding(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32,
    ).eval()
    vae.save_pretrained(tmp_path / "vae")
    info = DataInfo(kind="moments", channels=4, size=4, num_classes=10, latent_scale=0.5, latent_bias=0.1)
    z = torch.randn(3, 4, 4, 4)
    dec = ImageDecoder(info, vae=str(tmp_path / "vae"), vae_batch_size=2).load()
    with torch.no_grad():
        want = to_uint8(vae.decode((z - 0.1) / 0.5).sample)
    got = dec(z)
    assert got.shape == (3, 32, 32, 3) and np.abs(got.astype(int) - want.astype(int)).max() <= 1

    save_file(tiny_state_dict(input_size=4, in_channels=4), str(tmp_path / "lat.safetensors"))
    args = ["sample", "--ckpt", str(tmp_path / "lat.safetensors"), "--data-kind", "moments",
            "--vae", str(tmp_path / "vae"), "--output-dir", str(tmp_path / "out"), "--no-progress",
            "--mode", "euler", "--num-steps", "2", "--num-samples", "5", "--per-proc-batch-size", "3"]
    assert main(args) == 0
    arr, _ = load_npz(tmp_path / "out" / "samples.npz")
    assert arr.shape == (5, 32, 32, 3) and arr.dtype == np.uint8 and arr.std() > 0
    cfg = json.loads((tmp_path / "out" / "sampling_config.json").read_text())
    assert cfg["identity"]["vae"] == str(tmp_path / "vae")
    assert cfg["identity"]["data_info"]["latent_scale"] == pytest.approx(0.18215)
    # a VAE whose latent width does not fit the model is refused before any sampling
    AutoencoderKL(latent_channels=3, block_out_channels=(8,), norm_num_groups=8, layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                  ).save_pretrained(tmp_path / "vae3")
    with pytest.raises(SraError, match="3 latent channels but the model makes 4"):
        ImageDecoder(info, vae=str(tmp_path / "vae3")).load()


def test_release_flag_aliases_and_preset_merge():
    from sra.cli import build_parser
    from sra.commands.sample import sampler_overrides
    from sra.sampling.job import resolve_sampler

    args = build_parser().parse_args(
        ["sample", "--ckpt", "x.pt", "--mode", "ode", "--heun", "--num-fid-samples", "100",
         "--global-seed", "3", "--sample-dir", "out", "--cfg-scale", "4.0"])
    assert (args.num_samples, args.seed, args.output_dir) == (100, 3, "out")
    over = sampler_overrides(args)
    assert over == {"mode": "heun", "cfg_scale": 4.0}
    # preset fills, explicit flags win, the checkpoint supplies the path type
    job = SampleJobConfig(preset="paper-256", sampler_overrides={"cfg_scale": 4.0})
    cfg = resolve_sampler(job, "SiT", "cosine")
    assert (cfg.mode, cfg.steps, cfg.cfg_scale, cfg.guidance_high, cfg.path_type) == ("sde", 250, 4.0, 0.7, "cosine")
    assert resolve_sampler(SampleJobConfig(), "DiT", "linear").mode == "ddpm"
    assert resolve_sampler(SampleJobConfig(sampler_overrides={"path_type": "linear"}), "SiT", "cosine").path_type == "linear"
    with pytest.raises(SraError, match="--heun is for the ODE"):
        sampler_overrides(build_parser().parse_args(["sample", "--ckpt", "x", "--mode", "sde", "--heun"]))
    with pytest.raises(SraError, match="allowed: png, npz"):
        SampleJobConfig(formats=("jpg",))


def test_tf32_flag_defaults_on_and_sets_both_backends():
    """--allow-tf32 is on by default (the release's generate.py); --no-tf32 / --tf32 false turn it
    off; set_tf32 sets the matmul and cuDNN switches together on CUDA, nothing elsewhere; the
    job records it."""
    import torch

    from sra.cli import build_parser
    from sra.devices import set_tf32
    from sra.sampling.job import SampleJobConfig

    parse = lambda *extra: build_parser().parse_args(["sample", "--ckpt", "x", *extra]).allow_tf32
    assert parse() is True and parse("--allow-tf32") is True and parse("--tf32") is True
    assert parse("--no-tf32") is False and parse("--allow-tf32", "false") is False
    assert SampleJobConfig().allow_tf32 is True
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        cuda = torch.device("cuda")
        set_tf32(True, cuda)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(False, cuda)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        set_tf32(True, torch.device("cpu"))  # a CPU job leaves the CUDA switches alone
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

"""`sra pca`: token-grid shapes for any patch/resolution, normalised deterministic PCA, the figure,
the VAE / pixel inputs, checkpoint formats, --compare, boolean flags and one-line errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sra.cli import build_parser, main
from sra.commands._args import float_list, int_list, str2bool
from sra.errors import SraError
from sra.models import ModelConfig, build_model
from sra.viz.pca import XL_BLOCKS, default_blocks, feature_pca_maps, token_pca
from sra.viz.pca_figure import plot_pca_grid
from sra.viz.pca_inputs import prepare_input


# ----------------------------------------------------------------------------- helpers


def tiny_model(patch: int = 2, size: int = 8, channels: int = 4, family: str = "SiT", seed: int = 0):
    """A 4-block model with random (not adaLN-Zero) weights so every block changes the tokens."""
    cfg = ModelConfig(family=family, depth=4, hidden_size=32, num_heads=4, patch_size=patch,
                      input_size=size, in_channels=channels, num_classes=10)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def backbone_sd(model) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("ap_head.")}


def assert_normalised(maps: np.ndarray) -> None:
    """Every (time, block) map has each of its 3 components spanning exactly [0, 1]."""
    flat = maps.reshape(maps.shape[0], maps.shape[1], -1, 3)
    np.testing.assert_allclose(flat.min(axis=2), 0.0, atol=1e-6)
    np.testing.assert_allclose(flat.max(axis=2), 1.0, atol=1e-6)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints in three formats + a tiny SD-geometry VAE saved with save_pretrained."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("pca")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64,
    )
    vae.save_pretrained(root / "vae")
    latent = tiny_model(patch=2, size=8, channels=4)  # 64 px images, 4×4 tokens
    save_file(backbone_sd(latent), root / "latent.safetensors")
    # release style: {"model", "ema", "args"}, with the SRA head (dropped by the loader)
    release = tiny_model(patch=4, size=8, channels=4, seed=1)  # 2×2 tokens
    sd = {k: v.clone() for k, v in release.state_dict().items()}
    torch.save({"model": sd, "ema": sd, "args": argparse.Namespace(model=None, resolution=64)},
               root / "release.pt")
    digits = tiny_model(patch=4, size=16, channels=1, seed=2)  # pixel model, 4×4 tokens
    save_file(backbone_sd(digits), root / "digits.safetensors")
    return {"root": root, "vae": str(root / "vae"), "latent": str(root / "latent.safetensors"),
            "release": str(root / "release.pt"), "digits": str(root / "digits.safetensors")}


# ----------------------------------------------------------------------------- library


def test_default_blocks_spread_over_depth():
    assert default_blocks(28) == [1, 4, 8, 13, 18, 23, 28] == list(XL_BLOCKS)
    for depth in (1, 2, 4, 12, 24, 40):
        blocks = default_blocks(depth)
        assert blocks[0] == 1 and blocks[-1] == depth
        assert blocks == sorted(set(blocks)) and len(blocks) == min(7, depth)
    assert default_blocks(12) == [1, 3, 5, 7, 8, 10, 12]
    assert default_blocks(4) == [1, 2, 3, 4]


def test_token_pca_matches_sklearn_and_is_sign_stable():
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(64, 32, generator=g) @ torch.randn(32, 32, generator=g)  # (T, D)
    rgb = token_pca(tokens)
    assert rgb.shape == (64, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb.min(0), 0, atol=1e-7)
    np.testing.assert_allclose(rgb.max(0), 1, atol=1e-7)
    ref = PCA(3, svd_solver="full").fit_transform(tokens.double().numpy())
    ref = (ref - ref.min(0)) / (ref.max(0) - ref.min(0))
    for c in range(3):  # same components; sign conventions may differ between sklearn versions
        err = min(np.abs(rgb[:, c] - ref[:, c]).max(), np.abs(rgb[:, c] - (1 - ref[:, c])).max())
        assert err < 1e-5
    # the sign is fixed by the loadings (not by the SVD's arbitrary choice): shifting or
    # reordering tokens leaves the colours, negating the features mirrors them
    np.testing.assert_allclose(token_pca(tokens + 5.0), rgb, atol=1e-5)
    perm = torch.randperm(64, generator=g)
    np.testing.assert_allclose(token_pca(tokens[perm]), rgb[perm.numpy()], atol=1e-5)
    np.testing.assert_allclose(token_pca(-tokens), 1 - rgb, atol=1e-5)


def test_token_pca_rank_deficient_components_are_zero():
    same = torch.ones(16, 8)
    assert not token_pca(same).any()
    rank1 = torch.arange(16.0)[:, None] * torch.randn(1, 8)  # one direction only
    rgb = token_pca(rank1)
    np.testing.assert_allclose([rgb[:, 0].min(), rgb[:, 0].max()], [0, 1], atol=1e-7)
    assert not rgb[:, 1:].any()


@pytest.mark.parametrize("patch,size,grid", [(2, 8, 4), (4, 16, 4), (2, 16, 8), (8, 16, 2)])
def test_feature_pca_maps_grid_follows_patch_and_size(patch, size, grid):
    model = tiny_model(patch=patch, size=size, channels=3)
    x0 = torch.rand(1, 3, size, size) * 2 - 1
    times, blocks = (0.7, 0.5, 0.3, 0.1), [1, 3, 4]
    maps = feature_pca_maps(model, x0, label=2, times=times, blocks=blocks, seed=0)
    assert maps.shape == (4, 3, grid, grid, 3) and maps.dtype == np.float32
    assert_normalised(maps)
    again = feature_pca_maps(model, x0, label=2, times=times, blocks=blocks, seed=0)
    np.testing.assert_array_equal(maps, again)  # fixed seed → identical figure
    other = feature_pca_maps(model, x0, label=2, times=times, blocks=blocks, seed=1)
    assert not np.allclose(maps, other)  # the seed is the noise sample


def test_one_truncated_forward_per_time_and_time_inputs():
    """SiT sees flow t on x_t = (1-t)x + tε; DiT sees the step round(t·999); the final layer never runs."""
    for family, expect in (("SiT", [0.7, 0.5, 0.1]), ("DiT", [699, 500, 100])):
        model = tiny_model(patch=2, size=8, channels=4, family=family)
        seen_t, ran_blocks = [], []
        model.t_embedder.register_forward_hook(lambda m, i, o: seen_t.append(i[0].clone()))
        for k, blk in enumerate(model.blocks, start=1):
            blk.register_forward_hook(lambda m, i, o, k=k: ran_blocks.append(k))
        model.final_layer.register_forward_hook(lambda *a: pytest.fail("final layer ran"))
        x0 = torch.randn(1, 4, 8, 8)
        maps = feature_pca_maps(model, x0, 1, times=(0.7, 0.5, 0.1), blocks=[3, 1], seed=0)
        assert maps.shape == (3, 2, 4, 4, 3)
        assert ran_blocks == [1, 2, 3] * 3  # one forward per time, stopping after block 3
        fed = torch.cat(seen_t)
        if family == "DiT":
            assert fed.dtype == torch.long and fed.tolist() == expect
        else:
            assert fed.is_floating_point()
            np.testing.assert_allclose(fed.numpy(), expect, atol=1e-6)


def test_feature_pca_maps_rejects_bad_blocks_times_label():
    model = tiny_model()
    x0 = torch.randn(1, 4, 8, 8)
    with pytest.raises(SraError, match=r"1\.\.4"):
        feature_pca_maps(model, x0, 0, blocks=[0, 2])
    with pytest.raises(SraError, match=r"0\.\.1"):
        feature_pca_maps(model, x0, 0, times=[1.5], blocks=[1])
    with pytest.raises(SraError, match=r"0\.\.9"):
        feature_pca_maps(model, x0, 10, blocks=[1])


def test_prepare_input_encodes_through_the_vae(files):
    from sra.data.vae import load_vae
    from sra.viz.images import load_image_tensor

    vae = load_vae(files["vae"])
    cfg = tiny_model().config
    x0, made = prepare_input(cfg, None, None, 0, None, lambda: vae)
    assert x0.shape == (1, 4, 8, 8) and made["input"] == "latents"
    assert made["image"] == "sklearn:china.jpg" and made["resolution"] == 64
    pixels, _ = load_image_tensor(None, 64)
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean * 0.18215
    torch.testing.assert_close(x0, expected)
    with pytest.raises(SraError, match="64px"):
        prepare_input(cfg, None, None, 0, 128, lambda: vae)


def test_plot_pca_grid_labels_and_stacking(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.random((4, 3, 4, 4, 3)).astype(np.float32)
    b = rng.random((4, 2, 8, 8, 3)).astype(np.float32)  # another grid size and block count
    one = plot_pca_grid([a], (0.7, 0.5, 0.3, 0.1), [1, 2, 4], ["m"], tmp_path / "one.png")
    two = plot_pca_grid([a, b], (0.7, 0.5, 0.3, 0.1), [[1, 2, 4], [1, 12]], ["m", "n"],
                        tmp_path / "sub" / "two.png")
    w1, h1 = Image.open(one).size
    w2, h2 = Image.open(two).size
    assert w1 == w2 and h2 > 1.8 * h1
    with pytest.raises(SraError):
        plot_pca_grid([a], (0.7, 0.5), [1, 2, 4], ["m"], tmp_path / "bad.png")


# ----------------------------------------------------------------------------- CLI


def test_cli_latent_model_writes_png_npz_json(files, tmp_path):
    out = tmp_path / "figs" / "pca.png"
    assert main(["pca", "--ckpt", files["latent"], "--vae", files["vae"], "--label", "3",
                 "--out", str(out), "--baseline"]) == 0
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.width > 300
    z = np.load(out.with_suffix(".npz"))
    assert set(z.files) == {"maps", "times", "blocks"}
    assert z["maps"].shape == (4, 4, 4, 4, 3)  # 4 default times × depth-4 default blocks, 4×4 grid
    assert z["blocks"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(z["times"], [0.7, 0.5, 0.3, 0.1], rtol=1e-6)
    assert_normalised(z["maps"])
    settings = json.loads(out.with_suffix(".json").read_text())
    m = settings["models"][0]
    assert m["input"] == "latents" and m["vae"] == files["vae"] and m["image"] == "sklearn:china.jpg"
    assert m["grid"] == 4 and m["path_type"] == "linear" and settings["baseline"] is True
    assert "baseline" in m["title"]


def test_cli_compare_release_checkpoint_is_taller(files, tmp_path):
    single, pair = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--vae", files["vae"], "--times", "0.5,0.1", "--blocks", "2,4"]
    assert main(["pca", "--ckpt", files["latent"], "--out", str(single), *common]) == 0
    assert main(["pca", "--ckpt", files["latent"], "--compare", files["release"],
                 "--out", str(pair), "--baseline=False", *common]) == 0
    assert Image.open(pair).height > 1.8 * Image.open(single).height
    z = np.load(pair.with_suffix(".npz"))
    assert z["maps"].shape == (2, 2, 4, 4, 3)
    assert z["maps_compare"].shape == (2, 2, 2, 2, 3)  # patch 4 on 8×8 latents → 2×2 tokens
    np.testing.assert_array_equal(z["maps"], np.load(single.with_suffix(".npz"))["maps"])
    settings = json.loads(pair.with_suffix(".json").read_text())
    assert settings["baseline"] is False and settings["models"][1]["source"] == "release"


def test_cli_pixel_model_uses_digits_or_an_image(files, tmp_path):
    out = tmp_path / "d.png"
    assert main(["pca", "--ckpt", files["digits"], "--label", "7", "--out", str(out),
                 "--vae", str(tmp_path / "no-such-vae")]) == 0  # no VAE needed for pixels
    m = json.loads(out.with_suffix(".json").read_text())["models"][0]
    assert m["input"] == "pixels" and m["image"].startswith("digits:") and m["vae"] is None
    assert np.load(out.with_suffix(".npz"))["maps"].shape == (4, 4, 4, 4, 3)
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(img)
    out2 = tmp_path / "e.png"
    assert main(["pca", "--ckpt", files["digits"], "--image", str(img), "--out", str(out2)]) == 0
    assert json.loads(out2.with_suffix(".json").read_text())["models"][0]["image"] == str(img)


def test_boolean_and_list_flags_parse():
    parser = build_parser()
    base = ["pca", "--ckpt", "x"]
    assert parser.parse_args(base).baseline is False
    assert parser.parse_args(base + ["--baseline"]).baseline is True
    assert parser.parse_args(base + ["--baseline=False"]).baseline is False
    assert parser.parse_args(base + ["--baseline", "no"]).baseline is False
    assert parser.parse_args(base + ["--baseline=TRUE"]).baseline is True
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(base + ["--baseline=maybe"])
    assert exc.value.code == 2
    args = parser.parse_args(base + ["--times", "0.9, 0.2", "--blocks", "1,8"])
    assert args.times == (0.9, 0.2) and args.blocks == (1, 8)
    assert str2bool("1") is True and str2bool("off") is False
    with pytest.raises(argparse.ArgumentTypeError):
        int_list("1,x")
    with pytest.raises(argparse.ArgumentTypeError):
        float_list("")


@pytest.mark.parametrize("extra,needle", [
    (["--blocks", "1,9"], "1..4"),
    (["--label", "10"], "0..9"),
    (["--times", "0.5,2"], "0..1"),
    (["--resolution", "128"], "64px"),
    (["--out", "fig.jpg"], ".png"),
])
def test_cli_user_errors_are_one_line_exit_2(files, tmp_path, capsys, extra, needle):
    out = ["--out", str(tmp_path / "p.png")] if "--out" not in extra else []
    code = main(["pca", "--ckpt", files["latent"], "--vae", files["vae"], *out, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "p.png").exists()

"""REPA, the external-encoder baseline (docs/method.md §9.3): projector head, loss, token resizing, encoders
(tiny random ones saved to disk and loaded through the real path), images beside latents, the
digits positive control and end-to-end runs from the CLI."""

import itertools
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from sra import checkpoints as ckpts
from sra.cli import main
from sra.data import build_dataset
from sra.encoders import EncoderSpec, build_encoder, register_encoder
from sra.encoders.digits import (DIGITS_ENCODER_CONFIG, DIGITS_ENCODER_FILE, digits_encoder_path)
from sra.errors import SraError
from sra.eval.digits import CLASSIFIER_FILE, DigitsClassifierConfig, load_digits_classifier
from sra.models import ModelConfig, build_model
from sra.objectives.denoising import FlowMatching
from sra.objectives.repa import (EncoderAlignConfig, EncoderAlignObjective, negative_cosine,
                                 resize_tokens)
from sra.training.config import override, preset
from sra.training.loop import Trainer
from tiny_data import release_data

TINY_ARGS = ["--depth", "3", "--hidden-size", "32", "--num-heads", "2", "--block-out-s", "1",
             "--projector-dim", "64", "--batch-size", "32", "--report-to", "none",
             "--sample-steps", "0", "--grid-samples", "4", "--eval-samples", "0", "--log-every", "2"]
TINY_VIT = EncoderSpec("tiny-dinov2", "timm", 32, resolution=56, patch=14,
                       arch="vit_small_patch14_dinov2", tag="lvd142m",
                       model_kwargs=dict(embed_dim=32, depth=1, num_heads=2))


def tiny(**kw) -> ModelConfig:
    base = dict(depth=3, hidden_size=32, num_heads=2, patch_size=4, input_size=16, in_channels=1,
                num_classes=10)
    return ModelConfig(**{**base, **kw})


# -- fixtures: encoders on disk ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_digits_encoder(tmp_path_factory):
    """The positive control's classifier, trained once per module through the caching code."""
    path = tmp_path_factory.mktemp("enc") / DIGITS_ENCODER_FILE
    load_digits_classifier(path, config=DIGITS_ENCODER_CONFIG)
    return path


@pytest.fixture
def digits_encoder_cached(trained_digits_encoder):
    """Put the trained encoder where the (per-test, empty) cache expects it."""
    digits_encoder_path().parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained_digits_encoder, digits_encoder_path())
    return digits_encoder_path()


@pytest.fixture
def tiny_vit_weights(tmp_path):
    """A tiny random DINOv2-architecture ViT registered by name, its weights saved as safetensors
    at another input size (so loading resamples the position table)."""
    import timm

    register_encoder(TINY_VIT)
    net = timm.create_model(TINY_VIT.arch, pretrained=False, img_size=98, num_classes=0,
                            **TINY_VIT.model_kwargs)
    path = tmp_path / "tiny-dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


# -- the model's REPA head -----------------------------------------------------------------------------
def test_projector_shapes_and_sra_keys_unchanged():
    model = build_model(tiny(head="repa", head_out=48, projector_dim=64))
    head = model.ap_head
    assert [tuple(getattr(head, f"linear{i}").weight.shape) for i in (1, 2, 3)] == [
        (64, 32), (64, 64), (48, 64)]
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([1, 2])
    out = model(x, t, y, return_blocks=(2,), head_blocks=(2,))
    raw = out.features[2]  # (2, 16, 32): the raw tokens beside the head's, one forward
    assert raw.shape == (2, 16, 32) and out.projected[2].shape == (2, 16, 48)
    assert torch.allclose(out.projected[2], head(raw))
    # Existing configs keep today's state-dict keys (release checkpoints load strictly).
    sra_keys = set(build_model(tiny()).state_dict())
    assert {k for k in sra_keys if k.startswith("ap_head.")} == {
        f"ap_head.linear{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    assert set(build_model(tiny(use_head=False)).state_dict()) == sra_keys - {
        k for k in sra_keys if k.startswith("ap_head.")}
    with pytest.raises(SraError, match="output width"):
        tiny(head="repa")


# -- the loss and token resizing -----------------------------------------------------------------------
def test_loss_is_minus_mean_cosine_on_a_hand_computed_case():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2, 2)
    z = torch.tensor([[[3.0, 0.0], [1.0, 1.0]]])  # cosines per token: 1 and 1/√2
    assert negative_cosine(s, z).item() == pytest.approx(-(1 + 1 / math.sqrt(2)) / 2, abs=1e-6)
    with pytest.raises(SraError, match="differ in shape"):
        negative_cosine(s, z[:, :1])


def test_resize_tokens_pools_and_interpolates():
    g4 = torch.arange(16.0).view(1, 16, 1)  # a 4×4 grid, value = row-major index
    assert torch.equal(resize_tokens(g4, 4), g4)
    pooled = resize_tokens(g4, 2)[0, :, 0]  # 2×2 windows
    assert pooled.tolist() == [2.5, 4.5, 10.5, 12.5]
    big = torch.randn(2, 256, 8)  # 16×16 encoder tokens → the 8×8 grid of a patch-4 model
    ref = F.avg_pool2d(big.transpose(1, 2).reshape(2, 8, 16, 16), 2).flatten(2).transpose(1, 2)
    assert torch.allclose(resize_tokens(big, 8), ref)
    assert resize_tokens(torch.randn(1, 9, 3), 2).shape == (1, 4, 3)  # 3×3 → 2×2, adaptive
    up = resize_tokens(torch.ones(1, 4, 5), 4)  # 2×2 → 4×4 bilinear: a constant stays constant
    assert up.shape == (1, 16, 5) and torch.allclose(up, torch.ones(1, 16, 5))
    with pytest.raises(SraError, match="square"):
        resize_tokens(torch.randn(1, 12, 3), 2)


class _NeverCalled(torch.nn.Module):
    def forward(self, *a, **k):
        raise AssertionError("REPA ran the EMA teacher")


class _FixedEncoder(torch.nn.Module):
    """A stand-in encoder: 8×8 tokens of width 48 from a fixed random projection of the pixels."""

    width = 48

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(1, 48, 2, stride=2)

    def tokens(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)  # (N, 64, 48)


def test_objective_never_runs_a_teacher_and_trains_the_projector():
    torch.manual_seed(0)
    model = build_model(tiny(head="repa", head_out=48, projector_dim=64)).train()
    encoder = _FixedEncoder()
    cfg = EncoderAlignConfig(encoder="digits-classifier", student_block=2, weight=0.5,
                             projector_dim=64)
    obj = EncoderAlignObjective(FlowMatching(), cfg, 0.1, 10, encoder, grid=model.config.grid_size)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    out = obj(model, _NeverCalled(), x0, torch.tensor([0, 1, 2, 3]), images=x0)
    out.total.backward()
    assert model.ap_head.linear3.weight.grad.abs().sum() > 0  # the projector is trained
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())  # frozen
    # align is −mean cosine between the projected block-2 tokens and the pooled encoder tokens
    assert out.align.item() == pytest.approx(-out.stats["cosine"].item())
    assert -1 <= out.align.item() <= 1 and out.weight == 0.5
    assert torch.allclose(out.total.detach(), out.denoise + 0.5 * out.align)
    with pytest.raises(SraError, match="clean images"):
        obj(model, None, x0, torch.zeros(4, dtype=torch.long))


# -- encoders: real loading paths on tiny random weights --------------------------------------------------
def test_tiny_vit_loads_from_safetensors_and_the_original_dinov2_layout(tiny_vit_weights, tmp_path):
    enc = build_encoder(TINY_VIT.name, str(tiny_vit_weights))  # 56 px → 4×4 tokens
    images = torch.rand(2, 3, 64, 64) * 2 - 1  # any size: resized to the encoder's resolution
    tokens = enc.tokens(images)
    assert tokens.shape == (2, 16, 32) and enc.grid == 4 and enc.width == 32
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert enc.tokens(images[:, :1]).shape == (2, 16, 32)  # grey images are repeated to RGB
    # Meta's layout (mask_token present) goes through timm's converter, as a tensors-only .pth
    sd = load_file(str(tiny_vit_weights))
    sd["mask_token"] = torch.zeros(1, 32)
    torch.save(sd, tmp_path / "meta.pth")
    enc2 = build_encoder(TINY_VIT.name, str(tmp_path / "meta.pth"), resolution=28)
    assert enc2.tokens(images).shape == (2, 4, 32)
    with pytest.raises(SraError, match="not a multiple"):
        build_encoder(TINY_VIT.name, str(tiny_vit_weights), resolution=30)
    wrong = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    save_file({k: v.contiguous() for k, v in wrong.items()}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(SraError, match="does not fit"):
        build_encoder(TINY_VIT.name, str(tmp_path / "wrong.safetensors"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_random_bytes_as_encoder_weights_is_one_line(tiny_vit_weights, tmp_path, suffix):
    bad = tmp_path / f"random{suffix}"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(SraError) as err:
        build_encoder(TINY_VIT.name, str(bad))
    assert str(bad) in str(err.value) and len(str(err.value).splitlines()) == 1


def test_cli_encoder_weights_random_bytes_is_one_line(tmp_path, capsys):
    bad = tmp_path / "random.safetensors"
    bad.write_bytes(os.urandom(4096))
    code = main(["train", "--preset", "digits-repa", *TINY_ARGS, "--max-train-steps", "2",
                 "--encoder-weights", str(bad), "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("sra train: error:") and str(bad) in err


def test_digits_encoder_is_not_the_scoring_classifier(digits_encoder_cached):
    enc = build_encoder("digits-classifier")  # from the cache: no training here
    assert enc.width == 48 and enc.grid == 4
    assert enc.tokens(torch.zeros(3, 1, 16, 16)).shape == (3, 16, 48)  # the digits' 16 tokens
    scoring = load_digits_classifier()  # trained in this test's empty cache
    assert DIGITS_ENCODER_FILE != CLASSIFIER_FILE and digits_encoder_cached.name == DIGITS_ENCODER_FILE
    assert DIGITS_ENCODER_CONFIG.seed != DigitsClassifierConfig().seed
    assert DIGITS_ENCODER_CONFIG.width != DigitsClassifierConfig().width
    assert scoring.convs[3].out_channels == 32 != enc.width  # another network, another width
    assert enc.convs[0].weight.shape[0] == 24 and scoring.convs[0].weight.shape[0] == 16


# -- data: images beside latents -------------------------------------------------------------------------
def test_latents_come_with_their_images_by_relative_numbering(tmp_path):
    release_data(tmp_path / "data", n=6, skip={2})  # latent 2 missing: a gap, not a shift
    ds = build_dataset(str(tmp_path / "data"), with_images=True)
    assert len(ds) == 5
    x, image, y = ds[2]  # the third latent is file number 3 → the fourth image
    want = np.array(Image.open(tmp_path / "data" / "images" / "00000" / "img00000003.png"))
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and y == 0
    assert torch.equal(image, torch.from_numpy(want).permute(2, 0, 1))
    assert x.shape == (8, 4, 4)


def test_encode_output_finds_its_image_source_and_mirrors_flipped_latents(tmp_path):
    from sra.data.encode import EncodeConfig, encode_images
    from sra.data.vae import save_tiny_vae

    release_data(tmp_path / "src", n=4)  # only its images/ are used
    vae = save_tiny_vae(str(tmp_path / "vae"), seed=0)
    encode_images(EncodeConfig(source=str(tmp_path / "src" / "images"), dest=str(tmp_path / "lat"),
                               vae=vae, batch_size=4, workers=0, flip=True, progress=False))
    ds = build_dataset(str(tmp_path / "lat"), with_images=True)  # packed/, images from encode.json
    assert len(ds) == 8
    for i in (1, 5):  # latent 5 = image 1 mirrored
        _, image, _ = ds[i]
        want = np.asarray(Image.open(tmp_path / "src" / "images" / "00000" / "img00000001.png"))
        want = want[:, ::-1] if i == 5 else want
        assert torch.equal(image, torch.from_numpy(want.copy()).permute(2, 0, 1))
    batch = ds.__getitems__([0, 6])  # the DataLoader's batched path
    assert [b[1].shape for b in batch] == [(3, 32, 32)] * 2


def test_latent_dataset_without_images_fails_at_start_up_in_one_line(tmp_path, capsys):
    release_data(tmp_path / "data", images=False)
    code = main(["train", "--data-dir", str(tmp_path / "data"), "--align-target", "encoder",
                 "--model", "SiT-S/2", "--output-dir", str(tmp_path / "runs"), "--report-to", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("sra train: error:") and "images" in err and "--image-dir" in err
    assert not (tmp_path / "runs").exists()


# -- the trainer ------------------------------------------------------------------------------------------
def train_tiny(preset_name: str, steps: int, out, capsys):
    """``sra train --preset NAME`` on the tiny model: the run dir, its config and its metrics."""
    code = main(["train", "--preset", preset_name, *TINY_ARGS, "--max-train-steps", str(steps),
                 "--checkpoint-steps", "2", "--output-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    run = out / preset_name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, json.loads((run / "config.json").read_text()), rows


def test_cli_digits_repa_end_to_end(tmp_path, digits_encoder_cached, capsys):
    run, config, rows = train_tiny("digits-repa", 4, tmp_path, capsys)
    assert config["align_target"] == "encoder"
    assert config["encoder_align"]["encoder"] == "digits-classifier"
    assert config["model"]["head"] == "repa" and config["model"]["head_out"] == 48
    assert "cosine" in rows[-1] and "teacher_norm" not in rows[-1]
    model, info = ckpts.load_model(run)  # for sampling: the head is dropped
    assert model.ap_head is None and info["model_config"].head == "repa"
    student, _ = ckpts.load_model(run, weights="model", with_head=True)  # round trip with it
    assert student.ap_head.linear3.weight.shape == (48, 64)


def test_flags_route_to_the_chosen_target(capsys):
    assert main(["train", "--preset", "digits", "--align-target", "encoder", "--encoder",
                 "digits-classifier", "--block-out-s", "3", "--align-weight", "0.7",
                 "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["encoder_align"]["student_block"] == 3 and cfg["encoder_align"]["weight"] == 0.7
    assert cfg["align"]["student_block"] == 2  # SRA's own fields untouched
    assert main(["train", "--preset", "digits-repa", "--block-out-t", "5", "--print-config"]) == 2
    assert "--block-out-t" in capsys.readouterr().err
    assert main(["train", "--preset", "digits", "--encoder", "dinov2-vit-b14", "--print-config"]) == 2
    assert "--align-target encoder" in capsys.readouterr().err
    assert main(["train", "--preset", "sit-xl2-repa-256", "--print-config"]) == 0
    xl = json.loads(capsys.readouterr().out)
    assert xl["encoder_align"] == {**xl["encoder_align"], "encoder": "dinov2-vit-b14",
                                   "student_block": 8, "weight": 0.5, "projector_dim": 2048}
    assert preset("digits-repa").uses_encoder and not preset("digits").uses_encoder


def test_latent_run_with_images_has_no_host_sync_in_a_step(tmp_path, tiny_vit_weights, monkeypatch):
    release_data(tmp_path / "data", n=8)
    cfg = preset("sit-xl2-repa-256")
    for k, v in {"model.name": "SiT-S/2", "model.depth": 2, "model.hidden_size": 32,
                 "model.num_heads": 2, "data.data_dir": str(tmp_path / "data"),
                 "data.resolution": None, "data.num_workers": 0,
                 "encoder_align.encoder": TINY_VIT.name, "encoder_align.student_block": 1,
                 "encoder_align.encoder_weights": str(tiny_vit_weights),
                 "encoder_align.projector_dim": 16, "loop.global_batch_size": 4,
                 "loop.mixed_precision": "no", "loop.max_train_steps": 3, "loop.log_every": 3,
                 "loop.checkpoint_steps": 3, "loop.grid_samples": 0, "loop.sample_steps": 0,
                 "loop.report_to": "none", "output_dir": str(tmp_path / "runs")}.items():
        cfg = override(cfg, k, v)
    trainer = Trainer(cfg)
    monkeypatch.setattr(trainer, "teacher_model", _NeverCalled())
    batches = list(itertools.islice(iter(trainer.loader), 3))
    assert len(batches[0]) == 3 and batches[0][1].dtype == torch.uint8  # (x, image, y)
    from host_reads import HostReads

    it, reads = iter(batches), HostReads(monkeypatch)
    with reads:
        stats, finite, weight = trainer._train_step(it)
    assert reads.events == [] and weight == 0.5 and "cosine" in stats
    trainer.loader = batches
    run = trainer.fit()
    model, info = ckpts.load_model(run)
    assert info["model_config"].head_out == 32 and model.ap_head is None


# -- iREPA: the conv projector and z-scored targets ---------------------------------------------------
def test_spatial_zscore_equals_a_loop_over_samples_and_channels():
    from sra.objectives.repa import spatial_zscore

    torch.manual_seed(0)
    f = torch.randn(2, 5, 3) * 3 + 1  # (N, T, E)
    got = spatial_zscore(f, 0.6)
    for n in range(2):
        for e in range(3):
            col = [float(v) for v in f[n, :, e]]
            mean = sum(col) / 5
            std = math.sqrt(sum((v - mean) ** 2 for v in col) / 4)  # Bessel's correction
            want = [(v - 0.6 * mean) / (std + 1e-6) for v in col]
            assert got[n, :, e].tolist() == pytest.approx(want, abs=1e-6)
    assert torch.allclose(spatial_zscore(f, 1.0).mean(dim=1), torch.zeros(2, 3), atol=1e-6)


def test_conv_projector_works_on_the_token_grid():
    model = build_model(tiny(head="repa-conv", head_out=48))
    head = model.ap_head
    assert set(head.state_dict()) == {"conv.weight", "conv.bias"}
    assert head.conv.weight.shape == (48, 32, 3, 3) and head.conv.padding == (1, 1)
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([1, 2])
    out = model(x, t, y, return_blocks=(2,), head_blocks=(2,))
    raw = out.features[2]  # (2, 16, 32): a 4×4 grid, row-major
    want = F.conv2d(raw.transpose(1, 2).reshape(2, 32, 4, 4), head.conv.weight, head.conv.bias,
                    padding=1).flatten(2).transpose(1, 2)
    assert out.projected[2].shape == (2, 16, 48) and torch.allclose(out.projected[2], want, atol=1e-6)
    # a token moves only its 3×3 neighbourhood: token (1, 2) → tokens of rows 0..2, columns 1..3
    bumped = raw.clone()
    bumped[:, 1 * 4 + 2] += 1.0
    changed = (head(bumped) - head(raw)).abs().sum(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [r * 4 + c for r in (0, 1, 2) for c in (1, 2, 3)]
    with pytest.raises(SraError, match="4×4 tokens, got 9"):
        head(torch.randn(1, 9, 32))


def test_zscored_targets_and_the_conv_head_in_the_objective():
    from sra.objectives.repa import spatial_zscore

    torch.manual_seed(1)
    model = build_model(tiny(head="repa-conv", head_out=48)).train()
    encoder = _FixedEncoder()
    cfg = EncoderAlignConfig(student_block=2, weight=1.0, projector="conv", target_norm="zscore")
    obj = EncoderAlignObjective(FlowMatching(), cfg, 0.1, 10, encoder, grid=4)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    want = spatial_zscore(resize_tokens(encoder.tokens(x0), 4), 0.6)  # on the model's grid
    assert torch.allclose(obj.targets(x0), want)
    out = obj(model, _NeverCalled(), x0, torch.tensor([0, 1, 2, 3]), images=x0)
    out.total.backward()
    assert model.ap_head.conv.weight.grad.abs().sum() > 0 and out.weight == 1.0
    with pytest.raises(SraError, match="allowed: mlp, conv"):
        EncoderAlignConfig(projector="linear")
    with pytest.raises(SraError, match="allowed: none, zscore"):
        EncoderAlignConfig(target_norm="l2")


def test_a_conv_head_checkpoint_initialises_only_a_conv_head(tmp_path):
    from sra.checkpoints.weights import config_from_state_dict
    from sra.training.resume import init_from_weights

    torch.manual_seed(2)
    conv = build_model(tiny(head="repa-conv", head_out=48))
    path = tmp_path / "conv.safetensors"
    save_file({k: v.contiguous() for k, v in conv.state_dict().items()}, str(path))
    inferred = config_from_state_dict(load_file(str(path)))
    assert (inferred.head, inferred.head_out, inferred.use_head) == ("repa-conv", 48, True)
    again = build_model(tiny(head="repa-conv", head_out=48))
    init_from_weights(again, str(path))
    assert torch.equal(again.ap_head.conv.weight, conv.ap_head.conv.weight)  # its kind: kept
    mlp = build_model(tiny(head="repa", head_out=48, projector_dim=64))
    own = mlp.ap_head.linear1.weight.clone()
    init_from_weights(mlp, str(path))  # another kind of head: the backbone only
    assert torch.equal(mlp.ap_head.linear1.weight, own)
    assert torch.equal(mlp.blocks[0].attn.qkv.weight, conv.blocks[0].attn.qkv.weight)
    sampler, _ = ckpts.load_model(path)  # sampling drops the conv head too
    assert sampler.ap_head is None


def test_cli_digits_irepa_end_to_end(tmp_path, digits_encoder_cached, capsys):
    run, config, rows = train_tiny("digits-irepa", 2, tmp_path, capsys)
    assert config["model"]["head"] == "repa-conv" and config["model"]["head_out"] == 48
    rep = config["encoder_align"]
    assert (rep["encoder"], rep["projector"], rep["target_norm"], rep["zscore_alpha"],
            rep["weight"]) == ("digits-classifier", "conv", "zscore", 0.6, 1.0)
    assert rows[-1]["weight"] == 1.0 and -1 <= rows[-1]["align"] <= 1
    model, _ = ckpts.load_model(run)
    assert model.ap_head is None
    student, _ = ckpts.load_model(run, weights="model", with_head=True)
    assert student.ap_head.conv.weight.shape == (48, 32, 3, 3)
    capsys.readouterr()
    assert main(["train", "--preset", "sit-xl2-irepa-256", "--print-config"]) == 0
    xl = json.loads(capsys.readouterr().out)["encoder_align"]
    assert (xl["encoder"], xl["student_block"], xl["projector"], xl["target_norm"], xl["weight"]) == (
        "dinov2-vit-b14", 8, "conv", "zscore", 1.0)
    assert main(["train", "--preset", "digits", "--projector", "conv", "--print-config"]) == 2
    assert "--align-target encoder" in capsys.readouterr().err

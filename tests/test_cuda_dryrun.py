"""The CUDA dry run on a CPU machine: the per-step code of every sampler loop (CFG on an interval),
the in-training quality probe's sampling step, the Inception feature step and every objective's
forward, on fake CUDA tensors (tests/fake_cuda.py). FakeTensorMode raises on any host read of a
device value and on any CPU tensor in a CUDA op, so passing is both a device and a sync check.
Host-side set-up (time grids, label checks, weights files) runs before the mode and is reused."""

from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                          FakeTensorDeviceMismatchError)

from fake_cuda import CUDA, cuda_autocast, fake_cuda, to_fake, to_fake_cuda
from sra.data.base import DataInfo
from sra.models import ModelConfig, build_model
from sra.objectives.groups import TEACHER_TIMES
from sra.sampling import SamplerConfig, generate
from sra.sampling.fixed import Autocast
from sra.sampling.schedules import sampler_grid
from sra.training.config import build_objective, override, preset, resolve_model_config
from tiny import TINY_OVERRIDES

N = 4  # batch
DIGITS = DataInfo(kind="pixels", channels=1, size=16, num_classes=10)


def bf16() -> torch.autocast:
    return cuda_autocast(torch.bfloat16)


def _tiny(family: str) -> torch.nn.Module:
    return build_model(ModelConfig(family=family, depth=2, hidden_size=32, num_heads=4, patch_size=4,
                                   input_size=16, in_channels=1, num_classes=10))


def test_the_dry_run_catches_host_reads_and_cpu_tensors():
    """The mode is not blind: host reads and CPU tensors in CUDA ops raise; 0-d CPU scalars (fine on
    a GPU too) do not; bf16 autocast really is on for fake CUDA tensors."""
    with fake_cuda():
        t = torch.rand(3, device="cuda")
        for read in (lambda: float(t[0]), lambda: bool(t.min() < 0), t.tolist,
                     lambda: torch.repeat_interleave(t, torch.tensor([1, 2, 3], device="cuda"))):
            with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
                read()
        with pytest.raises(FakeTensorDeviceMismatchError):
            t + torch.ones(3)
        assert (t * torch.tensor(2.0)).device == CUDA
        with bf16():
            assert (t[None] @ t[:, None]).dtype == torch.bfloat16
    real = torch.ones(())
    with pytest.raises(Exception, match="convert all Tensors to FakeTensors"), fake_cuda():
        torch.rand(3, device="cuda") + real  # a real tensor (made outside) never enters unnoticed


# -- sampling ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["euler", "heun", "sde", "ddpm", "ddim"])
def test_every_sampler_loop_with_guidance_on_an_interval(mode):
    """The network in bf16 autocast (as ``--mixed-precision bf16``), the solver in fp32; CFG 1.5 for
    t ≤ 0.7, so both sides of the interval run; DDIM with eta > 0 draws noise."""
    model = _tiny("DiT" if mode in ("ddpm", "ddim") else "SiT")
    cfg = SamplerConfig(mode=mode, steps=4, cfg_scale=1.5, guidance_high=0.7,
                        ddim_eta=0.5 if mode == "ddim" else 0.0)
    sampler_grid(cfg)  # host set-up: the grid is built here once and reused inside
    seen = []
    with fake_cuda() as fm:
        net = Autocast(to_fake_cuda(model, fm), bf16)
        noise = torch.randn(N, 1, 16, 16, device="cuda")
        y = torch.randint(0, 10, (N,), device="cuda")
        out = generate(net, noise, y, cfg, callback=lambda info: seen.append(info["x"].device))
    assert out.shape == noise.shape and out.device == CUDA and out.dtype == torch.float32
    assert seen == [CUDA] * 4


@pytest.mark.parametrize("sampler", [
    preset("digits").fid.sampler,  # the digits preset's probe: Heun, no guidance
    SamplerConfig(mode="sde", cfg_scale=1.8, guidance_high=0.7),  # the paper's guided SDE
], ids=["digits-heun", "sde-cfg"])
def test_quality_probe_sampling_step(monkeypatch, sampler):
    """QualityProbe.my_images up to its decoder (the batch's end, a host copy by design): fixed
    noise from host generators, host labels carried to the device, the run's autocast."""
    from sra.training.fid import FIDConfig, QualityProbe

    # A CUDA generator needs a driver: the solver noise comes from the default one instead.
    monkeypatch.setattr("sra.sampling.fixed.solver_generator", lambda seed, batch, device: None)
    entered = []
    acc = SimpleNamespace(device=CUDA, num_processes=1, process_index=0,
                          autocast=lambda: entered.append(1) or bf16())
    cfg = FIDConfig(every=1, samples=6, batch_size=4, sampler=replace(sampler, steps=3))
    ema = _tiny("SiT")
    probe = QualityProbe(cfg, acc, ema.config, DIGITS, "linear", vae="unused", digits=True)
    sampler_grid(probe.sampler)  # host set-up
    batches = []
    probe.decoder = lambda x: batches.append((x.shape, x.device)) or np.zeros((x.shape[0], 16, 16, 3))
    with fake_cuda() as fm:
        probe.labels = to_fake(probe.labels, fm, "cpu")  # made on the host once per run
        out = probe.my_images(to_fake_cuda(ema, fm))
    assert [k for k, _ in out] == [0, 1]
    assert batches == [((4, 1, 16, 16), CUDA), ((2, 1, 16, 16), CUDA)]
    assert len(entered) >= 2 * 3  # the network ran under the run's autocast at every step


def test_inception_feature_step(monkeypatch):
    """InceptionFeatures.forward on host uint8 images: copied to the device, resized, pool/spatial/
    logits read in one pass (the network is the real architecture with fresh modules)."""
    from sra.eval import inception as I

    # No 95 MB weights file: the architecture with fresh modules is all a dry run needs.
    monkeypatch.setattr(I, "resolve_weights", lambda weights: "fresh-modules")
    monkeypatch.setattr(I, "load_inception_state_dict", lambda path: {})
    monkeypatch.setattr(I, "build_inception", lambda state, where: I._bare_inception().eval())
    net = I.InceptionFeatures("fresh-modules", device="cpu")
    with fake_cuda() as fm:
        to_fake_cuda(net, fm)
        images = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8)  # host images
        out = net(images)
    assert {k: (tuple(v.shape), v.device, v.dtype) for k, v in out.items()} == {
        "pool": ((N, I.POOL_DIM), CUDA, torch.float32),
        "spatial": ((N, I.SPATIAL_DIM), CUDA, torch.float32),
        "logits": ((N, I.LOGITS_DIM), CUDA, torch.float32)}


# -- objectives --------------------------------------------------------------------------------------
def _tiny_vit(tmp_path) -> dict:
    """A tiny random DINOv2-architecture ViT registered by name, weights on disk (host set-up)."""
    import timm
    from safetensors.torch import save_file

    from sra.encoders import EncoderSpec, register_encoder

    spec = register_encoder(EncoderSpec("dryrun-dinov2", "timm", 32, resolution=28, patch=14,
                                        arch="vit_small_patch14_dinov2", tag="lvd142m",
                                        model_kwargs=dict(embed_dim=32, depth=1, num_heads=2)))
    net = timm.create_model(spec.arch, pretrained=False, img_size=28, num_classes=0, **spec.model_kwargs)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return {"encoder_align.encoder": spec.name, "encoder_align.encoder_weights": str(path),
            "encoder_align.student_block": 1, "encoder_align.projector_dim": 64}


# (preset, overrides) per case; "tiny-vit" stands for _tiny_vit's overrides (built per test).
SRA_CASES = [pytest.param("digits", {}, id="sra-sit"),
             pytest.param("digits", {"model.name": "DiT-S/4"}, id="sra-dit")]
REPA_CASES = [pytest.param("digits-repa", "tiny-vit", id="repa-vit")]
DTS_CASES = [pytest.param("digits-dts-as", {"groups.teacher_t": tt}, id=f"dts-as-{tt}")
             for tt in TEACHER_TIMES] + [
    pytest.param("digits-dts-as", {"groups.full_sample_prob": 0.5}, id="dts-as-full-samples")]
# Dispersive Loss alone (vanilla SiT), on top of SRA and of DTS/AS; iREPA (conv head, z-scored
# targets) toward the tiny ViT.
DISPERSIVE_CASES = [pytest.param("digits-dispersive", {}, id="dispersive"),
                    pytest.param("digits", {"dispersive.weight": 0.5}, id="sra-dispersive"),
                    pytest.param("digits-dts-as", {"dispersive.weight": 0.5}, id="dts-as-dispersive"),
                    pytest.param("digits-irepa", "tiny-vit", id="irepa-vit")]
OBJECTIVE_CASES = SRA_CASES + REPA_CASES + DTS_CASES + DISPERSIVE_CASES


@pytest.mark.parametrize("preset_name,overrides", OBJECTIVE_CASES)
def test_objective_forward(tmp_path, preset_name, overrides):
    """One micro-batch of the objective the trainer builds for the preset (tiny model, bf16
    autocast as the loop's), student and EMA teacher on the device."""
    if overrides == "tiny-vit":
        overrides = _tiny_vit(tmp_path)
    cfg = preset(preset_name)
    for k, v in {**TINY_OVERRIDES, "output_dir": str(tmp_path), **overrides}.items():
        cfg = override(cfg, k, v)
    mcfg = resolve_model_config(cfg, DIGITS)
    torch.manual_seed(0)
    model = build_model(mcfg).train()
    teacher = copy.deepcopy(model).requires_grad_(False)
    objective = build_objective(cfg, mcfg)
    with fake_cuda() as fm:
        to_fake_cuda(model, fm), to_fake_cuda(teacher, fm)
        if getattr(objective, "encoder", None) is not None:
            to_fake_cuda(objective.encoder, fm)
        x0 = torch.randn(N, 1, 16, 16, device="cuda")
        y = torch.randint(0, 10, (N,), device="cuda")
        extra = {"images": x0} if getattr(objective, "needs_images", False) else {}
        with bf16():
            out = objective(model, teacher, x0, y, 10, **extra)
    # the alignment term ran, or the dispersive one (alone: λ_align = 0)
    assert isinstance(out.weight, float) and (out.weight > 0 or cfg.dispersive.active)
    assert ("dispersive" in out.stats) == cfg.dispersive.active
    for name, v in {"total": out.total, "denoise": out.denoise, "align": out.align, **out.stats}.items():
        assert v.shape == () and v.device == CUDA, name
    assert out.total.requires_grad

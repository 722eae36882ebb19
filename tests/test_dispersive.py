"""Dispersive Loss (docs/method.md §9.4): each kind against a direct loop over its formula, the
degenerate batches, the gradient, fp32 under autocast, the term inside every objective (one
forward, raw tokens, its weight switched off by --align-until) and a run from the CLI."""

import copy
import json
import math

import pytest
import torch

from sra.cli import main
from sra.errors import SraError
from sra.objectives import AlignConfig, SRAObjective, make_process
from sra.objectives.dispersive import (DISPERSIVE_KINDS, DispersiveConfig, DispersiveTerm,
                                       build_term, dispersive_loss)
from sra.objectives.groups import DualTimeObjective, GroupConfig
from sra.objectives.repa import EncoderAlignConfig, EncoderAlignObjective
from sra.training.config import preset
from tiny import live_model


# -- the formulas, written out as loops over samples (and features) -------------------------------
def _rows(z):
    return [[float(v) for v in row] for row in z.reshape(z.shape[0], -1).double()]


def loop_loss(z, kind, tau=0.5, eps=1.0):
    rows = _rows(z)
    n, d = len(rows), len(rows[0])

    def sq(i, j):  # ‖z_i − z_j‖² / d
        return sum((a - b) ** 2 for a, b in zip(rows[i], rows[j])) / d

    def cos(i, j):
        dot = sum(a * b for a, b in zip(rows[i], rows[j]))
        return dot / math.sqrt(sum(a * a for a in rows[i]) * sum(b * b for b in rows[j]))

    if kind == "infonce-l2":
        return math.log(sum(math.exp(-sq(i, j) / tau) for i in range(n) for j in range(n)) / n**2)
    if kind == "infonce-cos":
        return math.log(sum(math.exp(cos(i, j) / tau) for i in range(n) for j in range(n)) / n**2)
    if kind == "hinge":
        return sum(max(0.0, eps - sq(i, j)) ** 2
                   for i in range(n) for j in range(n) if i != j) / n**2
    # covariance: features standardised over the batch (biased moments + 1e-6), C = ẑᵀẑ / N
    cols = list(zip(*rows))
    zhat = []
    for col in cols:
        mean = sum(col) / n
        var = sum((v - mean) ** 2 for v in col) / n
        zhat.append([(v - mean) / math.sqrt(var + 1e-6) for v in col])
    off = [sum(zhat[m][i] * zhat[k][i] for i in range(n)) / n
           for m in range(d) for k in range(d) if m != k]
    return sum(c * c for c in off) / len(off)


@pytest.mark.parametrize("kind", DISPERSIVE_KINDS)
def test_each_kind_equals_its_formula_as_a_loop(kind):
    torch.manual_seed(0)
    z = torch.randn(5, 3, 4)  # N = 5 samples of T = 3 tokens, D = 4 (d = 12)
    for tau, eps in ((0.5, 1.0), (1.0, 3.0)):  # ε = 3 puts most pairs inside the hinge
        got = dispersive_loss(z, kind, tau=tau, epsilon=eps)
        assert got.dtype == torch.float32 and got.shape == ()
        assert got.item() == pytest.approx(loop_loss(z, kind, tau, eps), abs=1e-6, rel=1e-6)
    # a shifted batch of tokens with a large common offset: the same distances
    if kind in ("infonce-l2", "hinge", "covariance"):
        assert dispersive_loss(z + 50, kind).item() == pytest.approx(
            dispersive_loss(z, kind).item(), abs=1e-5)


@pytest.mark.parametrize("kind", DISPERSIVE_KINDS)
def test_one_sample_and_identical_samples_are_finite(kind):
    z = torch.randn(1, 3, 4, requires_grad=True)
    tau, eps = 0.5, 1.0
    # InfoNCE over the diagonal alone: log exp(0) = 0 (ℓ2) or 1/τ (cos); no pairs for the others
    want_one = {"infonce-l2": 0.0, "infonce-cos": 1 / tau, "hinge": 0.0, "covariance": 0.0}[kind]
    one = dispersive_loss(z, kind, tau, eps)
    one.backward()
    assert one.item() == pytest.approx(want_one, abs=1e-6) and torch.isfinite(z.grad).all()
    same = z.detach().expand(4, 3, 4).clone().requires_grad_(True)
    # identical samples: every distance 0, every cosine 1, every feature constant
    want_same = {"infonce-l2": 0.0, "infonce-cos": 1 / tau, "hinge": 12 / 16 * eps**2,
                 "covariance": 0.0}[kind]
    loss = dispersive_loss(same, kind, tau, eps)
    loss.backward()
    assert loss.item() == pytest.approx(want_same, abs=1e-5) and torch.isfinite(same.grad).all()


@pytest.mark.parametrize("kind", DISPERSIVE_KINDS)
def test_gradcheck_in_float64(kind):
    torch.manual_seed(1)
    z = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert dispersive_loss(z, kind).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda v: dispersive_loss(v, kind, 0.7, 2.0), (z,))


def test_fp32_whatever_the_autocast_and_bad_inputs():
    torch.manual_seed(2)
    z = torch.randn(8, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for kind in DISPERSIVE_KINDS:
            got = dispersive_loss(z.bfloat16(), kind)
            assert got.dtype == torch.float32
            assert got.item() == pytest.approx(dispersive_loss(z.bfloat16().float(), kind).item(),
                                               abs=1e-6)
    with pytest.raises(SraError, match="allowed: infonce-l2, infonce-cos, hinge, covariance"):
        dispersive_loss(z, "nce")
    with pytest.raises(SraError, match=r"\(N, T, D\)"):
        dispersive_loss(z[0])
    for bad, flag in ((dict(tau=0.0), "--dispersive-tau"), (dict(weight=-1.0), "--dispersive-weight"),
                      (dict(block=0), "--dispersive-block"), (dict(kind="l2"), "--dispersive-kind")):
        with pytest.raises(SraError, match=flag):
            DispersiveConfig(**bad)


# -- the term in the objectives --------------------------------------------------------------------
def test_the_term_is_switched_off_after_until_and_its_block_defaults_to_depth_over_4():
    term = DispersiveTerm(DispersiveConfig(weight=0.5, until=3), depth=12)
    assert term.block == 3 and DispersiveConfig().block_for(2) == 1  # at least block 1
    assert [term.weight(s) for s in range(5)] == [0.5, 0.5, 0.5, 0.0, 0.0]  # steps 1..3 on
    assert term.blocks(2) == (3,) and term.blocks(3) == ()
    value, stats = term({}, 3, torch.ones(()))
    assert value.item() == 0 and stats["dispersive_weight"].item() == 0
    assert build_term(DispersiveConfig(), 12) is None  # λ = 0: no term at all


def _tiny_model(head="sra", **kw):
    return live_model(depth=4, hidden_size=32, num_heads=2, patch_size=4, input_size=16,
                      in_channels=1, num_classes=10, head=head, **kw)


class _Encoder(torch.nn.Module):
    width = 24

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(1, 24, 4, stride=4)

    def tokens(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)  # (N, 16, 24)


def _objectives():
    """(model, objective) for every family member with the dispersive term on block 2."""
    proc, term = make_process("SiT"), DispersiveTerm(DispersiveConfig(weight=0.25, block=2), 4)
    sra = AlignConfig(student_block=2, teacher_block=3, weight=0.5)
    groups = GroupConfig(mask_ratios=(0.25,))
    return [
        pytest.param(_tiny_model(use_head=False),
                     SRAObjective(proc, AlignConfig(enabled=False), 0.1, 10, term), id="vanilla"),
        pytest.param(_tiny_model(), SRAObjective(proc, sra, 0.1, 10, term), id="sra"),
        pytest.param(_tiny_model(), DualTimeObjective(proc, groups, sra, 0.1, 10, grid=4, patch=4,
                                                      extra=term), id="dts-as"),
        pytest.param(_tiny_model("repa", head_out=24, projector_dim=16), EncoderAlignObjective(
            proc, EncoderAlignConfig(student_block=2), 0.1, 10, _Encoder(), grid=4, extra=term),
            id="repa"),
    ]


class _Spy(torch.nn.Module):
    """The student, recording each forward's output."""

    def __init__(self, model):
        super().__init__()
        self.model, self.outputs = model, []

    def forward(self, *a, **k):
        self.outputs.append(self.model(*a, **k))
        return self.outputs[-1]


@pytest.mark.parametrize("model,objective", _objectives())
def test_every_objective_adds_the_term_on_raw_tokens_of_its_one_forward(model, objective):
    torch.manual_seed(3)
    teacher = copy.deepcopy(model).requires_grad_(False)
    student, raw = _Spy(model), {}
    model.blocks[1].register_forward_hook(lambda m, a, out: raw.update(z=out))
    x0 = torch.rand(6, 1, 16, 16) * 2 - 1
    images = {"images": x0} if isinstance(objective, EncoderAlignObjective) else {}
    out = objective(student, teacher, x0, torch.arange(6), 0, **images)
    assert len(student.outputs) == 1  # one student forward: the term reads its tokens
    tokens = student.outputs[0].features[2]  # (N, T, D): block 2's raw tokens, not the head's
    if not isinstance(objective, DualTimeObjective):  # (there the blocks see a reordered batch)
        assert torch.equal(tokens, raw["z"])
    assert out.stats["dispersive"].item() == pytest.approx(dispersive_loss(tokens).item(), abs=1e-6)
    assert out.stats["dispersive_weight"].item() == 0.25
    want = out.denoise + out.weight * out.align + 0.25 * out.stats["dispersive"]
    assert torch.allclose(out.total.detach(), want, atol=1e-6)
    assert (out.weight > 0) == (model.ap_head is not None)  # both terms on SRA / DTS / REPA
    out.total.backward()
    assert all(p.grad is not None for p in model.blocks[0].parameters())


def test_cli_dispersive_alone_and_switched_off_by_align_until(tmp_path, capsys):
    args = ["train", "--preset", "digits-dispersive", "--depth", "2", "--hidden-size", "32",
            "--num-heads", "2", "--batch-size", "16", "--max-train-steps", "4",
            "--checkpoint-steps", "4", "--log-every", "1", "--grid-samples", "0",
            "--eval-samples", "0", "--report-to", "none", "--align-until", "2",
            "--output-dir", str(tmp_path)]
    assert main(args) == 0, capsys.readouterr().err
    run = tmp_path / "digits-dispersive"
    config = json.loads((run / "config.json").read_text())
    assert config["dispersive"] == {**config["dispersive"], "weight": 0.5, "tau": 0.5,
                                    "kind": "infonce-l2", "until": 2, "block": None}
    assert config["model"]["use_head"] is False and config["align"]["enabled"] is False
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["dispersive_weight"] for r in rows] == [0.5, 0.5, 0.0, 0.0]  # off after step 2
    assert all(r["weight"] == 0.0 for r in rows)  # no alignment term, no teacher
    assert rows[0]["dispersive"] < 0 and rows[-1]["dispersive"] == 0.0
    assert rows[0]["loss"] == pytest.approx(rows[0]["denoise"] + 0.5 * rows[0]["dispersive"], abs=1e-5)


def test_flags_presets_and_one_line_refusals(capsys):
    assert main(["train", "--preset", "digits", "--dispersive-weight", "0.3", "--dispersive-kind",
                 "hinge", "--disp-epsilon", "2", "--dispersive-block", "3", "--dispersive-tau",
                 "1", "--align-until", "7", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["dispersive"] == {"weight": 0.3, "tau": 1.0, "kind": "hinge", "block": 3,
                                 "epsilon": 2.0, "until": 7}
    assert cfg["align"]["until"] == 7 and cfg["align"]["enabled"]  # SRA + dispersive
    b2 = preset("sit-b2-dispersive")
    assert (b2.model.name, b2.align.enabled, b2.dispersive.weight, b2.dispersive.tau,
            b2.dispersive.kind, b2.dispersive.block_for(12)) == ("SiT-B/2", False, 0.5, 0.5,
                                                                "infonce-l2", 3)
    assert main(["train", "--dispersive-kind", "nce", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "infonce-l2, infonce-cos, hinge, covariance" in err
    assert "per process" in _help(capsys)


def _help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_the_model_card_names_the_method():
    from dataclasses import asdict

    from sra.training.config import override
    from sra.training.publish import _method

    card = _method(asdict(override(preset("digits-dispersive"), "dispersive.until", 300)))
    assert card.startswith("vanilla (no alignment); Dispersive Loss (infonce-l2, λ 0.5, τ 0.5)")
    assert card.endswith("switched off after step 300")
    assert _method(asdict(preset("digits-irepa"))).startswith("iREPA: the student's block-2 tokens "
                                                             "through a conv projector")
    assert _method(asdict(preset("digits-repa"))).startswith("REPA:")  # not SRA's description
    assert _method(asdict(preset("digits-vanilla"))) == "vanilla (denoising loss only, no alignment)"

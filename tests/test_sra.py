"""The SRA objective: who gets gradients, what the teacher sees, when it runs, the losses."""

import copy

import pytest
import torch

from sra.errors import SraError
from sra.models import ModelConfig
from sra.objectives import (
    AlignConfig, FlowConfig, FlowMatching, SRAObjective, align_loss, align_weight, drop_labels,
    make_process,
)
from tiny import live_model


def tiny(family="SiT") -> torch.nn.Module:
    return live_model(family=family, depth=4, hidden_size=32, num_heads=4, patch_size=2,
                      input_size=8, in_channels=2, num_classes=3)


class BlockCounter:
    def __init__(self, model):
        self.calls = []
        self.handles = [b.register_forward_hook(lambda *a, i=i: self.calls.append(i))
                        for i, b in enumerate(model.blocks, start=1)]
        self.final = []
        self.handles.append(model.final_layer.register_forward_hook(lambda *a: self.final.append(1)))


@pytest.mark.parametrize("family", ["SiT", "DiT"])
def test_gradients_reach_student_and_head_only_and_teacher_stops_early(family):
    torch.manual_seed(0)
    model = tiny(family)
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    before = copy.deepcopy(teacher.state_dict())
    counter = BlockCounter(teacher)
    obj = SRAObjective(make_process(family), AlignConfig(student_block=1, teacher_block=3, weight=0.5),
                       label_dropout=0.1, num_classes=3)
    x, y = torch.randn(4, 2, 8, 8), torch.randint(0, 3, (4,))
    out = obj(model, teacher, x, y)
    out.total.backward()
    assert counter.calls == [1, 2, 3] and counter.final == []  # never block 4 or the final layer
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert model.ap_head.linear1.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert torch.isfinite(out.total) and out.align > 0 and out.weight == 0.5
    assert set(out.stats) == {"student_norm", "teacher_norm", "cosine"}
    assert torch.allclose(out.total.detach(), out.denoise + 0.5 * out.align)


def test_alignment_gradient_flows_through_head_into_early_blocks_only():
    torch.manual_seed(1)
    model = tiny()
    student = model(torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([0, 1]),
                    head_blocks=(2,)).projected[2]
    align_loss(student, torch.randn(2, 16, 32), AlignConfig()).backward()
    assert model.blocks[1].mlp.fc2.weight.grad.abs().sum() > 0
    assert model.blocks[2].mlp.fc2.weight.grad is None  # block 3 is after s
    assert model.final_layer.linear.weight.grad is None


def test_teacher_sees_same_noise_same_labels_and_less_noise():
    torch.manual_seed(2)
    model = tiny()
    seen = {}

    class SpyTeacher(torch.nn.Module):
        def forward(self, x, t, y, **kw):
            seen.update(x=x, t=t, y=y, kw=kw)
            return model(x, t, y, **kw)

    class SpyStudent(torch.nn.Module):
        def forward(self, x, t, y, **kw):
            seen.update(xs=x, ts=t, ys=y)
            return model(x, t, y, **kw)

    proc = FlowMatching(FlowConfig(path_type="linear"))
    obj = SRAObjective(proc, AlignConfig(student_block=1, teacher_block=2, t_max=0.3), 0.5, 3)
    x0 = torch.randn(64, 2, 8, 8)
    obj(SpyStudent(), SpyTeacher(), x0, torch.randint(0, 3, (64,)))
    t, tt = seen["ts"], seen["t"]
    assert torch.all(tt <= t) and torch.all(t - tt <= 0.3 + 1e-6) and torch.all(tt >= 0)
    assert torch.equal(seen["y"], seen["ys"]) and (seen["y"] == 3).any()  # dropped labels shared
    assert seen["kw"] == {"return_blocks": (2,), "stop_after": 2}
    # same ε: recover it from the student's input and check the teacher's input
    a, s = (1 - t)[:, None, None, None], t[:, None, None, None]
    eps = (seen["xs"] - a * x0) / s
    at, st = (1 - tt)[:, None, None, None], tt[:, None, None, None]
    assert torch.allclose(seen["x"], at * x0 + st * eps, atol=1e-4)


def test_dit_teacher_steps_are_clamped_integers():
    proc = make_process("DiT")
    t = torch.randint(0, 1000, (5000,))
    tt = proc.teacher_t(t, 0.2)
    assert tt.dtype == t.dtype and tt.min() >= 1 and tt.max() <= 999
    gap = (t - tt)[t > 250]
    assert gap.min() >= 0 and gap.max() <= 199


@pytest.mark.parametrize("weight,enabled", [(0.0, True), (0.5, False)])
def test_vanilla_runs_no_teacher(weight, enabled):
    model = tiny()
    teacher = tiny()
    counter = BlockCounter(teacher)
    obj = SRAObjective(FlowMatching(), AlignConfig(enabled=enabled, weight=weight,
                                                   student_block=1, teacher_block=2), 0.1, 3)
    out = obj(model, teacher, torch.randn(2, 2, 8, 8), torch.tensor([0, 1]))
    assert counter.calls == [] and out.align == 0 and out.weight == 0.0
    obj(model, None, torch.randn(2, 2, 8, 8), torch.tensor([0, 1]))  # no teacher needed at all


def test_loss_types():
    s = torch.randn(2, 5, 8)
    assert align_loss(s, s, AlignConfig(loss_type="cos")) < 1e-6
    assert abs(align_loss(s, -s, AlignConfig(loss_type="cos")) - 2) < 1e-5
    t = torch.randn(2, 5, 8)
    per_token = 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)
    assert torch.allclose(align_loss(s, t, AlignConfig(loss_type="cos")), per_token.mean())
    per_channel = 1 - torch.nn.functional.cosine_similarity(s, t, dim=1)  # (N, D): the release
    assert torch.allclose(align_loss(s, t, AlignConfig(loss_type="cos-release")), per_channel.mean())
    # centred cos ignores a shared offset added to every token
    assert torch.allclose(align_loss(s + 10, t, AlignConfig(loss_type="cos-centered")),
                          align_loss(s, t, AlignConfig(loss_type="cos-centered")), atol=1e-5)
    d = torch.full((1, 1, 4), 0.01)
    assert torch.allclose(align_loss(d, torch.zeros_like(d), AlignConfig(loss_type="sml1")),
                          torch.tensor(0.5 * 0.01**2 / 0.05))
    assert torch.allclose(align_loss(s, t, AlignConfig(loss_type="l2")), ((s - t) ** 2).mean())
    assert torch.allclose(align_loss(s, t, AlignConfig(loss_type="l1")), (s - t).abs().mean())
    half = align_loss(s.half(), t.half(), AlignConfig())
    assert half.dtype == torch.float32


def test_weight_schedules():
    c = AlignConfig(weight=0.2, schedule="exp-decay", decay_start=100, decay_steps=1000)
    assert align_weight(c, 0) == 0.2 and align_weight(c, 100) == 0.2
    assert abs(align_weight(c, 1100) - 0.02) < 1e-12
    assert align_weight(AlignConfig(weight=0.5), 10**7) == 0.5
    assert align_weight(AlignConfig(enabled=False), 0) == 0.0


def test_label_dropout():
    torch.manual_seed(0)
    y = torch.zeros(100000, dtype=torch.long)
    d = drop_labels(y, 0.1, 7)
    assert abs((d == 7).float().mean() - 0.1) < 0.005 and set(d.unique().tolist()) == {0, 7}


def test_bad_config_messages():
    with pytest.raises(SraError, match="must be smaller"):
        AlignConfig(student_block=8, teacher_block=8)
    with pytest.raises(SraError, match=r"t_max must be in \(0, 1\]"):
        AlignConfig(t_max=0.0)
    with pytest.raises(SraError, match="allowed: cos, cos-release"):
        AlignConfig(loss_type="kl")
    with pytest.raises(SraError, match="allowed: linear, cosine"):
        FlowConfig(path_type="vp")
    with pytest.raises(SraError, match="allowed: uniform, lognormal"):
        FlowConfig(weighting="sigmoid")
    obj = SRAObjective(FlowMatching(), AlignConfig(student_block=2, teacher_block=9), 0.1, 3)
    with pytest.raises(SraError, match=r"block-out-t 9 is outside 1\.\.4"):
        obj.check_model(ModelConfig(depth=4, hidden_size=32, num_heads=2))


def test_centered_loss_logs_the_angle_it_pulls_on():
    torch.manual_seed(2)
    model = tiny()
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    obj = SRAObjective(make_process("SiT"), AlignConfig(student_block=1, teacher_block=3,
                                                        loss_type="cos-centered"),
                       label_dropout=0.0, num_classes=3)
    out = obj(model, teacher, torch.randn(4, 2, 8, 8), torch.randint(0, 3, (4,)))
    assert set(out.stats) == {"student_norm", "teacher_norm", "cosine", "cosine_centered"}
    assert torch.allclose(out.align, 1 - out.stats["cosine_centered"], atol=1e-6)

"""Token groups (dual-time scheduling) and attention separation: the model, the objective and
the teacher strategies, each against a hand-written reference on tiny shapes."""

import math
import random

import pytest
import torch

from host_reads import HostReads
from sra.errors import SraError
from sra.models import build_model, model_config
from sra.models.transformer import TokenGroups
from sra.objectives import AlignConfig, FlowConfig
from sra.objectives.denoising import FlowMatching
from sra.objectives.groups import (DualTimeObjective, GroupConfig, GroupSampler, group_sizes,
                                   present_min, time_map)


def sample_groups(n, sizes, device, full_sample_prob=0.0):
    return GroupSampler(sizes, full_sample_prob)(n, device).ids


def tiny(**kw):
    cfg = model_config("SiT-S/2", depth=3, hidden_size=32, num_heads=4, input_size=8,
                       in_channels=2, num_classes=5, **kw)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # adaLN-Zero starts at zero: randomise so every path matters
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def test_group_sizes_floor_and_largest_remainder():
    assert group_sizes((0.25,), 16) == [4, 12]
    assert group_sizes((0.3,), 16) == [5, 11]  # 4.8, 11.2: the missing token to 0.8
    assert group_sizes((0.3,), 10) == [3, 7]
    assert group_sizes((0.95,), 10) == [10, 0]  # float32 9.5 and 0.5: a tie, the lower group
    assert group_sizes((0.0,), 16) == [16] and group_sizes((1.0,), 16) == [16]
    assert group_sizes((), 16) == [16]
    assert group_sizes((1, 1, 1), 16) == [6, 5, 5]  # 5.33 each: one extra token to the first
    assert group_sizes((0.5, 0.3, 0.2), 7) == [4, 2, 1]  # 3.5, 2.1, 1.4 → 3, 2, 1 + 1 to 3.5
    assert sum(group_sizes((0.2, 0.7), 9)) == 9


def _authors_counts(ratios, T):
    """The reference code's count (SiT-SRA_DTS_AS/loss.py, _normalize_mask_ratios and
    _compute_group_counts), rewritten: float32 products floored, the rest by torch.topk of the
    fractional parts. Returns the counts and whether topk had to break a tie."""
    if len(ratios) == 1:
        ratios = [1.0] if not 0 < ratios[0] < 1 else [ratios[0], 1.0 - ratios[0]]
    else:
        ratios = [r / sum(ratios) for r in ratios]
    expected = torch.tensor(ratios, dtype=torch.float32) * T
    counts = torch.floor(expected).long()
    frac = expected - counts.float()
    missing = T - int(counts.sum())
    tie = 0 < missing < len(ratios) and bool(
        (frac == frac.sort(descending=True).values[missing - 1]).sum() > 1)
    if missing:
        counts[torch.topk(frac, k=missing).indices] += 1
    return counts.tolist(), tie


def test_group_sizes_equal_the_authors_code_for_many_ratios_and_token_counts():
    rng = random.Random(0)
    cases = [((k / 100,), T) for k in range(1, 100) for T in range(1, 130)]
    cases += [((rng.random(),), rng.choice([256, 1024, 4096])) for _ in range(300)]
    cases += [(tuple(rng.uniform(0.05, 1) for _ in range(rng.randint(2, 5))), rng.randint(2, 300))
              for _ in range(300)]
    ties = 0
    for ratios, T in cases:
        want, tie = _authors_counts(ratios, T)
        got = group_sizes(ratios, T)
        assert sum(got) == T, (ratios, T)
        if tie:  # topk does not specify which of equal parts wins; here the lower group does
            ties += 1
            assert sorted(got) == sorted(want), (ratios, T)
        else:
            assert got == want, (ratios, T)
    assert ties < len(cases) // 20


def test_group_sampler_deals_a_permutation_per_sample_with_tables_built_once():
    torch.manual_seed(1)
    sampler = GroupSampler([4, 12])
    g = sampler(64, "cpu")
    assert isinstance(g, TokenGroups) and g.ids.shape == (64, 16) and g.ids.dtype == torch.long
    assert torch.all((g.ids == 0).sum(1) == 4) and torch.all((g.ids == 1).sum(1) == 12)
    assert len({tuple(row.tolist()) for row in g.ids}) > 50  # fresh membership per sample
    assert g.sizes == (4, 12) and g.num_full == 0 and g.rows is None
    assert sampler.table("cpu") is sampler.table(torch.device("cpu"))  # once per device
    random.seed(0)
    whole = GroupSampler([4, 12], 0.3, full_group=1)(2000, "cpu")
    full = (whole.ids == 1).all(1)
    assert abs(whole.num_full / 2000 - 0.3) < 0.05 and int(full.sum()) == whole.num_full
    assert full[whole.rows[:whole.num_full]].all() and not full[whole.rows[whole.num_full:]].any()
    assert torch.all((whole.ids[~full] == 0).sum(1) == 4)  # the others keep their sizes
    every = GroupSampler([4, 12], 1.0)(3, "cpu")
    assert every.num_full == 3 and torch.equal(every.ids, torch.zeros(3, 16, dtype=torch.long))


def test_time_map_puts_each_tokens_time_on_its_patch():
    groups = torch.tensor([[0, 1, 1, 0]])  # 2×2 grid of 2×2 patches
    t = torch.tensor([[0.1, 0.7]])
    m = time_map(t, groups, grid=2, patch=2)
    want = torch.tensor([[0.1, 0.1, 0.7, 0.7], [0.1, 0.1, 0.7, 0.7],
                         [0.7, 0.7, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1]])
    assert m.shape == (1, 1, 4, 4) and torch.equal(m[0, 0], want)
    assert torch.equal(present_min(torch.tensor([[0.5, 0.2], [0.5, 0.2]]),
                                   torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])),
                       torch.tensor([0.2, 0.5]))  # a full sample only has group 0


def test_one_group_per_token_model_equals_the_plain_model():
    model = tiny()
    x, t, y = torch.randn(3, 2, 8, 8), torch.rand(3), torch.tensor([0, 4, 5])
    plain = model(x, t, y, return_blocks=(2,))
    groups = torch.zeros(3, 16, dtype=torch.long)
    per_token = model(x, t[:, None], y, groups=groups, return_blocks=(2,))
    assert (per_token.output - plain.output).abs().max() < 1e-5
    assert (per_token.features[2] - plain.features[2]).abs().max() < 1e-5
    # one group with attention separation: every token attends to every token, still plain
    sep = model(x, t[:, None], y, groups=groups, separate=True)
    assert (sep.output - plain.output).abs().max() < 1e-5


def test_modulation_is_computed_once_per_group_not_per_token():
    model = tiny()
    rows = []
    hooks = [b.adaLN_modulation.register_forward_hook(lambda m, i, o: rows.append(i[0].shape))
             for b in model.blocks]
    groups = sample_groups(2, [4, 12], "cpu")
    model(torch.randn(2, 2, 8, 8), torch.rand(2, 2), torch.tensor([1, 2]), groups=groups)
    for h in hooks:
        h.remove()
    assert rows and all(r == (2, 2, 32) for r in rows)  # (N, G, D), never (N, T, D)


def _reference_forward(model, x, t_tok, y, groups, separate):
    """Per-token adaLN written out naively: conditioning of every token from its own time, and
    attention with an explicit masked softmax. The slow reference for the fast model."""
    n = x.shape[0]
    D = model.config.hidden_size
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t_tok.reshape(-1)).view(n, -1, D) + model.y_embedder(y)[:, None]  # (N, T, D)
    mask = (groups[:, :, None] == groups[:, None, :]) if separate else None
    for blk in model.blocks:
        sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=-1)  # (N, T, D) each
        a = blk.norm1(h) * (1 + sc1) + sh1
        att = blk.attn
        qkv = att.qkv(a).reshape(n, -1, 3, att.num_heads, att.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        s = q @ k.transpose(-1, -2) / math.sqrt(att.head_dim)  # (N, H, T, T)
        if mask is not None:
            s = s.masked_fill(~mask[:, None], float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(n, -1, D)
        h = h + g1 * att.proj(o)
        h = h + g2 * blk.mlp(blk.norm2(h) * (1 + sc2) + sh2)
    sh, sc = model.final_layer.adaLN_modulation(c).chunk(2, dim=-1)
    return model.unpatchify(model.final_layer.linear(model.final_layer.norm_final(h) * (1 + sc) + sh))


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_groups_and_separation_match_a_naive_per_token_reference(separate, fused):
    model = tiny()
    model.set_fused_attention(fused)
    torch.manual_seed(3)
    groups = sample_groups(3, [4, 12], "cpu")
    groups[2] = 0  # a full-sample row among group rows
    t, x, y = torch.rand(3, 2), torch.randn(3, 2, 8, 8), torch.tensor([0, 1, 5])
    got = model(x, t, y, groups=groups, separate=separate).output
    want = _reference_forward(model, x, torch.gather(t, 1, groups), y, groups, separate)
    assert (got - want).abs().max() < 1e-4


def _objective(**kw):
    g = GroupConfig(**{"mask_ratios": (0.25,), **kw})
    align = AlignConfig(student_block=1, teacher_block=2, t_max=0.3, weight=0.5)
    return DualTimeObjective(FlowMatching(FlowConfig()), g, align, 0.0, 5, grid=4, patch=2)


def test_mixed_token_loss_is_each_token_against_its_own_groups_velocity():
    model = tiny()
    obj = _objective(attention_separation=False)
    x0, y = torch.randn(2, 2, 8, 8), torch.tensor([1, 3])
    torch.manual_seed(5)
    out = obj(model, model, x0, y)
    # replay the draws by hand
    torch.manual_seed(5)
    groups = sample_groups(2, [4, 12], "cpu")
    t = torch.rand(4).view(2, 2)  # DTS: one uniform time per group
    eps = torch.randn_like(x0)
    loss = 0.0
    pred = model(path_input(x0, eps, t, groups), t, y, groups=groups).output
    for n in range(2):
        for tok in range(16):
            r, c = divmod(tok, 4)
            tg = t[n, groups[n, tok]]
            patch = (slice(None), slice(2 * r, 2 * r + 2), slice(2 * c, 2 * c + 2))
            v = -x0[n][patch] + eps[n][patch]  # linear path: velocity = ε − x, any time
            loss += ((pred[n][patch] - v) ** 2).sum()
            assert torch.allclose(path_input(x0, eps, t, groups)[n][patch],
                                  (1 - tg) * x0[n][patch] + tg * eps[n][patch])
    assert out.denoise == pytest.approx((loss / pred.numel()).item(), rel=1e-5)


def path_input(x0, eps, t, groups):
    m = time_map(t, groups, grid=4, patch=2)
    return (1 - m) * x0 + m * eps


@pytest.mark.parametrize("strategy", ["self_flow", "same", "sra"])
@pytest.mark.parametrize("teacher_mask", [False, True])
def test_teacher_inputs_per_strategy(strategy, teacher_mask):
    obj = _objective(teacher_t=strategy, teacher_mask=teacher_mask)
    torch.manual_seed(6)
    x0, eps = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    ids = sample_groups(3, [4, 12], "cpu")
    ids[2] = 0
    groups = TokenGroups.from_ids(ids)
    t = torch.rand(3, 2)
    x_t = path_input(x0, eps, t, ids)
    torch.manual_seed(7)
    xin, tin, gin = obj.teacher_inputs(x0, eps, x_t, t, groups, t_max=0.3)
    if strategy == "same":
        assert xin is x_t and tin is t and gin is groups
    elif strategy == "sra":
        torch.manual_seed(7)
        want_t = (t - 0.3 * torch.rand_like(t)).clamp(0, 1)
        assert torch.equal(tin, want_t) and torch.all(tin <= t) and gin is groups
        assert torch.allclose(xin, path_input(x0, eps, want_t, ids))
    else:
        tau = torch.stack([t[0].min(), t[1].min(), t[2, 0]])  # row 2 has only group 0
        x_tau = (1 - tau)[:, None, None, None] * x0 + tau[:, None, None, None] * eps
        assert torch.allclose(xin, x_tau)
        if teacher_mask:
            assert torch.equal(tin, tau[:, None].expand(3, 2)) and gin is groups
        else:
            assert torch.equal(tin, tau) and gin is None


def test_self_flow_clean_latent_quirk_only_on_purpose():
    with pytest.raises(SraError, match="compat option needs"):
        GroupConfig(mask_ratios=(0.25,), teacher_t="sra", self_flow_clean_compat=True)
    obj = _objective(teacher_t="self_flow", teacher_mask=True, self_flow_clean_compat=True)
    x0, eps = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    ids = torch.tensor([[0, 1, 1, 1] * 4])
    t = torch.tensor([[0.4, 0.8]])
    xin, tin, _ = obj.teacher_inputs(x0, eps, path_input(x0, eps, t, ids), t,
                                     TokenGroups(ids, (4, 12)), 0.3)
    m = time_map(torch.tensor([[0.0, 1.0]]), ids, 4, 2).bool().expand_as(x0)
    assert torch.equal(xin[m], x0[m])  # groups ≥ 1: the clean latent …
    assert torch.allclose(xin[~m], (0.6 * x0 + 0.4 * eps)[~m])  # … group 0 at τ = 0.4
    assert torch.equal(tin, torch.tensor([[0.4, 0.4]]))  # while τ is embedded everywhere


def test_objective_gradients_and_alignment_off():
    model = tiny(use_head=True).train()
    teacher = tiny(use_head=True)
    obj = _objective()
    out = obj(model, teacher, torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 2, 3]))
    out.total.backward()
    assert out.align > 0 and model.ap_head.linear1.weight.grad is not None
    off = DualTimeObjective(FlowMatching(FlowConfig()), GroupConfig(mask_ratios=(0.25,)),
                            AlignConfig(enabled=False), 0.0, 5, grid=4, patch=2)
    calls = []
    res = off(model, lambda *a, **k: calls.append(1), torch.randn(2, 2, 8, 8), torch.tensor([0, 1]))
    assert calls == [] and float(res.align) == 0.0  # no teacher at all
    with pytest.raises(SraError, match="SiT"):
        from sra.objectives.denoising import DDPMProcess
        DualTimeObjective(DDPMProcess(), GroupConfig(mask_ratios=(0.25,)), AlignConfig(), 0.0, 5, 4, 2)


def test_reference_compat_switches():
    # 1. a full sample joins group 1, as in the reference: with the clean-latent quirk its
    #    teacher then sees the whole clean latent
    with pytest.raises(SraError, match="allowed: 0, 1"):
        GroupConfig(mask_ratios=(0.25,), full_sample_group=2)
    obj = _objective(full_sample_prob=1.0, full_sample_group=1, teacher_t="self_flow",
                     self_flow_clean_compat=True)
    groups = obj.sampler(2, "cpu")
    assert torch.equal(groups.ids, torch.ones(2, 16, dtype=torch.long))
    x0, eps, t = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8), torch.tensor([[0.3, 0.6]] * 2)
    xin, tin, _ = obj.teacher_inputs(x0, eps, x0, t, groups, 0.3)
    assert torch.equal(xin, x0) and torch.equal(tin, torch.full((2, 2), 0.6))
    # 2. self_flow's τ over every group's time, also for a full sample (one group present)
    ids = torch.zeros(1, 16, dtype=torch.long)
    for all_groups, tau in ((False, 0.6), (True, 0.3)):
        obj = _objective(teacher_t="self_flow", teacher_mask=False,
                         self_flow_tau_all_groups=all_groups)
        _, tin, _ = obj.teacher_inputs(x0[:1], eps[:1], x0[:1], torch.tensor([[0.6, 0.3]]),
                                       TokenGroups(ids, (4, 12)), 0.3)
        assert torch.equal(tin, torch.tensor([tau]))
    # 3. the teacher sees the undropped labels (the reference) or the student's (ours)
    for undropped in (False, True):
        obj = DualTimeObjective(FlowMatching(FlowConfig()), GroupConfig(
            mask_ratios=(0.25,), teacher_undropped_labels=undropped), AlignConfig(
            student_block=1, teacher_block=2, weight=0.5), 0.9, 5, grid=4, patch=2)
        seen = {}
        def spy(name, model):
            def call(x, t, y, **kw):
                seen[name] = y
                return model(x, t, y, **kw)
            return call
        y = torch.arange(8) % 5
        torch.manual_seed(0)
        obj(spy("student", tiny(use_head=True)), spy("teacher", tiny()), torch.randn(8, 2, 8, 8), y)
        assert (seen["student"] == 5).any()  # some labels dropped to the null label
        assert torch.equal(seen["teacher"], y if undropped else seen["student"])


@pytest.mark.parametrize("strategy,p", [("sra", 0.0), ("sra", 0.5), ("same", 1.0),
                                        ("self_flow", 0.5)])
def test_a_dual_time_step_reads_nothing_back(monkeypatch, strategy, p):
    model, teacher = tiny(use_head=True).train(), tiny()
    obj = _objective(teacher_t=strategy, full_sample_prob=p)
    x0, y = torch.randn(6, 2, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    reads = HostReads(monkeypatch)
    random.seed(1)
    with reads:
        for _ in range(2):
            obj(model, teacher, x0, y).total.backward()
    assert reads.events == []


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_dual_time_step_runs_on_fake_cuda_tensors(p):
    # FakeTensorMode raises on any data-dependent shape or value read and on a CPU tensor mixed
    # into a CUDA op: the step (both forwards) is sync-free and device-clean without a GPU.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    model, teacher = tiny(use_head=True), tiny()
    random.seed(2)
    for strategy in ("self_flow", "same", "sra"):
        obj = _objective(teacher_t=strategy, full_sample_prob=p)
        with FakeTensorMode() as mode:
            def fake(m):
                state = {k: mode.from_tensor(v).to("cuda")
                         for k, v in [*m.named_parameters(), *m.named_buffers()]}
                return lambda *a, **k: functional_call(m, state, a, k)

            x0 = torch.empty(6, 2, 8, 8, device="cuda")
            out = obj(fake(model), fake(teacher), x0, torch.zeros(6, dtype=torch.long, device="cuda"))
            assert out.total.device.type == "cuda" and out.total.shape == ()


def test_model_rejects_bad_group_inputs():
    model = tiny()
    x, y = torch.randn(2, 2, 8, 8), torch.tensor([0, 1])
    with pytest.raises(SraError, match="token groups must be int64"):
        model(x, torch.rand(2, 2), y, groups=torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(SraError, match="one time per group"):
        model(x, torch.rand(2), y, groups=torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(SraError, match="attention separation needs token groups"):
        model(x, torch.rand(2), y, separate=True)



def test_digits_dts_as_preset_trains_end_to_end_from_the_cli(tmp_path, capsys):
    from sra.cli import main
    from sra.checkpoints import load_model

    args = ["train", "--preset", "digits-dts-as", "--depth", "2", "--hidden-size", "32",
            "--num-heads", "2", "--block-out-s", "1", "--block-out-t", "2", "--batch-size", "32",
            "--max-train-steps", "3", "--checkpoint-steps", "3", "--grid-samples", "4",
            "--eval-samples", "0", "--report-to", "none", "--output-dir", str(tmp_path)]
    assert main(args) == 0, capsys.readouterr().err
    run = tmp_path / "digits-dts-as"
    import json

    cfg = json.loads((run / "config.json").read_text())
    assert cfg["groups"]["mask_ratios"] == [0.25] and cfg["groups"]["attention_separation"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["align"] > 0
    # a DTS-trained model samples like any SiT (one group): the ordinary loader and samplers
    model, info = load_model(run)
    assert model(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 1])).output.shape == (2, 1, 16, 16)
    assert main(args[:-2] + ["--output-dir", str(tmp_path / "dit"), "--model", "DiT-S/4"]) == 2
    assert "for SiT models only" in capsys.readouterr().err

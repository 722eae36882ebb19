"""Attention separation without a mask: the model's reorder-by-group path against a reference
that runs the previous boolean-mask attention, for every option combination (outputs, block
features, loss and gradients), and no attn_mask ever reaching scaled_dot_product_attention."""

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from sra.models import TransformerOutput, build_model, model_config
from sra.models.layers import modulate, per_token
from sra.models.transformer import TokenGroups
from sra.objectives import AlignConfig, FlowConfig
from sra.objectives.denoising import FlowMatching
from sra.objectives.groups import DualTimeObjective, GroupConfig, GroupSampler
from sra.objectives.sra import SRAObjective

REL = 1e-6  # fp32, ‖Δ‖ / ‖reference‖


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one thread is ≈5× faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed=0, **kw):
    cfg = model_config("SiT-S/2", depth=3, hidden_size=32, num_heads=4, input_size=8,
                       in_channels=2, num_classes=5, use_head=True, **kw)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # adaLN-Zero starts at zero: randomise so every path matters
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


# -- the reference: the boolean-mask attention the model used before (tests only) -------------
def masked_attention(att, x, mask):
    """``att``'s attention with an optional bool (N, 1, T, T) mask, True = may attend."""
    N, T, D = x.shape
    q, k, v = att.qkv(x).reshape(N, T, 3, att.num_heads, att.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = att.q_norm(q), att.k_norm(k)
    if att.fused:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        s = (q * att.head_dim**-0.5) @ k.transpose(-2, -1)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        o = s.softmax(dim=-1) @ v
    return att.proj(o.transpose(1, 2).reshape(N, T, D))


class MaskedReference:
    """``model``'s forward with attention separation as a (N, 1, T, T) mask in every block, on
    the model's own weights (so gradients compare parameter by parameter)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, t, y, *, groups=None, separate=False, return_blocks=(), head_blocks=(),
                 stop_after=None):
        m = self.model
        ids = groups.ids if isinstance(groups, TokenGroups) else groups
        h = m.x_embedder(x) + m.pos_embed
        if ids is None:
            c, onehot = m.t_embedder(t) + m.y_embedder(y), None
        else:
            n, g = t.shape
            c = m.t_embedder(t.reshape(-1)).view(n, g, -1) + m.y_embedder(y)[:, None]
            onehot = F.one_hot(ids, g)
        mask = (ids[:, :, None] == ids[:, None, :])[:, None] if separate else None
        feats, projected = {}, {}
        for i, blk in enumerate(m.blocks[: stop_after or len(m.blocks)], start=1):
            sh1, sc1, g1, sh2, sc2, g2 = per_token(blk.adaLN_modulation(c), onehot).chunk(6, -1)
            h = h + g1 * masked_attention(blk.attn, modulate(blk.norm1(h), sh1, sc1), mask)
            h = h + g2 * blk.mlp(modulate(blk.norm2(h), sh2, sc2))
            if i in return_blocks:
                feats[i] = h
            if i in head_blocks:
                projected[i] = m.ap_head(h)
        out = None if stop_after else m.unpatchify(m.final_layer(h, c, onehot))
        return TransformerOutput(out, feats, projected)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def layout(n, p, seed):
    """A batch's groups of sizes [4, 12] with a mixed count of full samples when 0 < p < 1."""
    random.seed(seed)
    torch.manual_seed(seed)
    return GroupSampler([4, 12], p)(n, "cpu")


# -- the model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_reordered_attention_equals_the_masked_path(fused, p):
    model = tiny()
    model.set_fused_attention(fused)
    groups = layout(6, p, seed=2)
    assert groups.num_full == 0 if p == 0 else groups.num_full == 6 if p == 1 else \
        0 < groups.num_full < 6  # p = 0.5: a batch of both kinds
    torch.manual_seed(3)
    x = torch.randn(6, 2, 8, 8, requires_grad=True)
    t, y = torch.rand(6, 2), torch.tensor([0, 1, 2, 3, 4, 5])
    for separate in (False, True):
        # raw tokens (Dispersive Loss) and head tokens (SRA) of block 1 from the same forward
        kw = dict(groups=groups, separate=separate, return_blocks=(1, 2), head_blocks=(1,))
        got = model(x, t, y, **kw)
        want = MaskedReference(model)(x, t, y, **kw)
        assert rel(got.output, want.output) < REL
        assert all(rel(got.features[b], want.features[b]) < REL for b in (1, 2))
        assert rel(got.projected[1], want.projected[1]) < REL
        g_got = torch.autograd.grad((got.output ** 2).sum() + got.projected[1].sum()
                                    + got.features[1].sum(), x)[0]
        g_want = torch.autograd.grad((want.output ** 2).sum() + want.projected[1].sum()
                                     + want.features[1].sum(), x)[0]
        assert rel(g_got, g_want) < REL
    # the teacher's call: stop after block 2, block 2's tokens; and a bare id tensor (host read)
    got = model(x, t, y, groups=groups.ids, separate=True, return_blocks=(2,), stop_after=2)
    want = MaskedReference(model)(x, t, y, groups=groups.ids, separate=True, return_blocks=(2,),
                                  stop_after=2)
    assert got.output is None and rel(got.features[2], want.features[2]) < REL


def test_each_group_attends_only_to_itself():
    # Attention on tokens ordered by group (a full sample first) equals running each group's
    # tokens alone through ordinary attention.
    att = tiny().blocks[0].attn
    torch.manual_seed(4)
    x = torch.randn(3, 16, 32)
    got = att(x, split=(1, (4, 12)))
    assert (got[:1] - att(x[:1])).abs().max() < 1e-6  # the full sample: all 16 tokens
    for run in (slice(0, 4), slice(4, 16)):
        assert (got[1:, run] - att(x[1:, run])).abs().max() < 1e-6


# -- the objective, every option combination ----------------------------------------------------
def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_objective_equals_the_masked_path_for_every_option_combination():
    student, teacher = tiny(seed=0), tiny(seed=1)
    x0, y = torch.randn(6, 2, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    align = AlignConfig(student_block=1, teacher_block=2, t_max=0.3, weight=0.5)
    seen_mixed = 0
    for dual, sep, p, strategy, tmask, fused in itertools.product(
            (True, False), (True, False), (0.0, 0.5, 1.0), ("self_flow", "same", "sra"),
            (True, False), (True, False)):
        cfg = GroupConfig(mask_ratios=(0.25,), dual_time=dual, attention_separation=sep,
                          full_sample_prob=p, teacher_t=strategy, teacher_mask=tmask)
        obj = DualTimeObjective(FlowMatching(FlowConfig()), cfg, align, 0.2, 5, grid=4, patch=2)
        for m in (student, teacher):
            m.set_fused_attention(fused)
        results = []
        for fast in (True, False):
            random.seed(7)
            torch.manual_seed(7)
            student.zero_grad(set_to_none=True)
            s_call = student if fast else MaskedReference(student)
            t_call = teacher if fast else MaskedReference(teacher)
            out = obj(s_call, t_call, x0, y)
            out.total.backward()
            results.append((out.denoise.detach(), out.align.detach(), _grads(student)))
        (d1, a1, g1), (d0, a0, g0) = results
        where = f"dual={dual} sep={sep} p={p} {strategy} mask={tmask} fused={fused}"
        assert rel(d1, d0) < REL and rel(a1, a0) < REL, where
        assert rel(g1, g0) < REL, where
        random.seed(7)
        seen_mixed += 0 < obj.sampler(6, "cpu").num_full < 6
    assert seen_mixed > 0  # batches mixing full and split samples were among them


# -- no mask reaches SDPA in any training configuration -----------------------------------------
@pytest.mark.parametrize("config", [
    None,  # SRA
    dict(attention_separation=False),  # DTS
    dict(),  # DTS + AS, teacher sra with the teacher mask
    dict(full_sample_prob=0.5, teacher_t="same"),
    dict(full_sample_prob=1.0, teacher_t="self_flow"),
    dict(full_sample_prob=0.5, teacher_t="self_flow", self_flow_clean_compat=True),
])
def test_no_attn_mask_reaches_sdpa(monkeypatch, config):
    calls = []
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        calls.append(args or kwargs.get("attn_mask") is not None)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    model, teacher = tiny().train(), tiny(seed=1)
    align = AlignConfig(student_block=1, teacher_block=2, t_max=0.3, weight=0.5)
    process = FlowMatching(FlowConfig())
    obj = (SRAObjective(process, align, 0.1, 5) if config is None else DualTimeObjective(
        process, GroupConfig(mask_ratios=(0.25,), **config), align, 0.1, 5, grid=4, patch=2))
    random.seed(0)
    for _ in range(2):
        obj(model, teacher, torch.randn(6, 2, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])).total.backward()
    assert calls and not any(calls)  # SDPA ran, and never with a mask

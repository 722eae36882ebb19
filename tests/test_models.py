"""The one transformer: release key compatibility, exact block math, features, early stop."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sra.errors import SraError
from sra.models import MODEL_NAMES, ModelConfig, build_model, model_config
from sra.models.layers import sincos_pos_embed_2d, timestep_frequencies

# Names and shapes of the release's state dicts (a copy of shared/spec/official_state_dict_keys.json).
SPEC_KEYS = Path(__file__).resolve().parent / "data" / "official_state_dict_keys.json"


def tiny(**kw) -> ModelConfig:
    base = dict(family="SiT", depth=4, hidden_size=32, num_heads=4, patch_size=2, input_size=8,
                in_channels=3, num_classes=5)
    base.update(kw)
    return ModelConfig(**base)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Replace the zero-init (adaLN-Zero) weights so every path of the block matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("name", ["SiT-XL/2", "SiT-B/2", "SiT-L/2", "DiT-XL/2", "DiT-B/2"])
def test_release_state_dict_loads_strict(name):
    spec = json.loads(SPEC_KEYS.read_text())[name]
    with torch.device("meta"):
        model = build_model(model_config(name))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == spec
    # A state dict with exactly those names and shapes loads strict (assign keeps it cheap).
    fake = {k: torch.empty(v, device="meta") for k, v in spec.items()}
    model.load_state_dict(fake, strict=True, assign=True)


def test_registry_names_and_errors():
    assert "SiT-XL/2" in MODEL_NAMES and "DiT-B/4" in MODEL_NAMES and len(MODEL_NAMES) == 24
    cfg = model_config("SiT-S/2")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (12, 384, 6)
    with pytest.raises(SraError, match="allowed: SiT-S/2"):
        model_config("SiT-XXL/2")
    with pytest.raises(SraError, match="divisible"):
        model_config("SiT-B/8", input_size=12)


@pytest.mark.parametrize("name", ["SiT-S/2", "SiT-S/8", "DiT-S/4"])
def test_every_size_runs_including_small(name):
    # The release's S configs crash (final layer width 768); every size must work here.
    cfg = model_config(name, input_size=16, num_classes=3)
    model = build_model(cfg)
    x = torch.randn(2, 4, 16, 16)
    t = torch.rand(2) if cfg.family == "SiT" else torch.randint(0, 1000, (2,))
    out = model(x, t, torch.tensor([0, 3])).output
    assert out.shape == (2, cfg.out_channels, 16, 16)


def test_head_does_not_change_the_backbone_init():
    # Vanilla and SRA runs of one seed must start from the same backbone (paired comparisons).
    torch.manual_seed(3)
    plain = build_model(tiny(use_head=False)).state_dict()
    torch.manual_seed(3)
    headed = build_model(tiny(use_head=True)).state_dict()
    assert set(headed) - set(plain) == {f"ap_head.linear{i}.{w}" for i in (1, 2)
                                        for w in ("weight", "bias")}
    assert all(torch.equal(plain[k], headed[k]) for k in plain)
    assert headed["ap_head.linear1.weight"].abs().sum() > 0  # the head itself is initialised


def test_any_channels_and_size_and_dit_learn_sigma():
    model = build_model(tiny(family="DiT", in_channels=1, input_size=12, patch_size=4))
    out = model(torch.randn(3, 1, 12, 12), torch.randint(0, 1000, (3,)), torch.zeros(3, dtype=torch.long)).output
    assert out.shape == (3, 2, 12, 12)


def test_time_embedding_and_pos_embed_conventions():
    t = torch.tensor([0.0, 0.5, 999.0])
    emb = timestep_frequencies(t, 256)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    assert torch.allclose(emb[:, :128], torch.cos(t[:, None] * freqs))  # cos first
    assert torch.allclose(emb[:, 128:], torch.sin(t[:, None] * freqs))
    pe = sincos_pos_embed_2d(8, 3)  # (9, 8): token k = (row k//3, col k%3)
    k = 5
    row, col = divmod(k, 3)
    # first half encodes the column: [sin(col·ω), cos(col·ω)] with ω_i = 1/10000^(i/2)
    omega = 1 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    assert torch.allclose(torch.tensor(pe[k, :4]), torch.cat([torch.sin(col * omega), torch.cos(col * omega)]))
    assert torch.allclose(torch.tensor(pe[k, 4:]), torch.cat([torch.sin(row * omega), torch.cos(row * omega)]))


def test_block_equals_hand_computation():
    model = build_model(tiny(depth=1))
    randomize(model)
    block = model.blocks[0]
    x = torch.randn(2, 16, 32)
    c = torch.randn(2, 32)
    # by hand: adaLN-Zero block, docs/method.md §2.3
    mod = F.linear(F.silu(c), block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias)
    sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
    ln = lambda z: F.layer_norm(z, (32,), eps=1e-6)
    h = ln(x) * (1 + sc1[:, None]) + sh1[:, None]
    qkv = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias).reshape(2, 16, 3, 4, 8)
    q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    att = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v  # (N, H, T, d)
    att = F.linear(att.transpose(1, 2).reshape(2, 16, 32), block.attn.proj.weight, block.attn.proj.bias)
    x1 = x + g1[:, None] * att
    h2 = ln(x1) * (1 + sc2[:, None]) + sh2[:, None]
    m = F.linear(F.gelu(F.linear(h2, block.mlp.fc1.weight, block.mlp.fc1.bias), approximate="tanh"),
                 block.mlp.fc2.weight, block.mlp.fc2.bias)
    expected = x1 + g2[:, None] * m
    assert torch.allclose(block(x, c), expected, atol=1e-5)
    block.attn.fused = False  # the explicit path computes the same function
    assert torch.allclose(block(x, c), expected, atol=1e-5)


def test_unpatchify_inverts_patch_layout():
    model = build_model(tiny(in_channels=3, patch_size=2, input_size=8))
    img = torch.randn(2, 3, 8, 8)
    # patchify by hand: token (row-major) holds (p_row, p_col, C)
    tokens = img.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 12)
    assert torch.equal(model.unpatchify(tokens), img)


def test_features_early_stop_and_mode_independence():
    model = build_model(tiny(qk_norm=True))
    randomize(model)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 5])
    full = model(x, t, y, return_blocks=(1, 3))
    assert full.output.shape == (2, 3, 8, 8) and set(full.features) == {1, 3}
    calls = []
    hooks = [b.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    early = model(x, t, y, return_blocks=(3,), stop_after=3)
    assert early.output is None and calls == [0, 1, 2]  # block 4 and the final layer never ran
    assert torch.allclose(early.features[3], full.features[3])
    for h in hooks:
        h.remove()
    model.train()
    a = model(x, t, y)
    assert a.features == {}  # one return type: nothing asked, no features
    model.eval()
    assert torch.equal(a.output, model(x, t, y).output)  # no train/eval dependence (label dropout is elsewhere)
    both = model(x, t, y, return_blocks=(1, 3), head_blocks=(1,))
    assert torch.equal(both.features[3], full.features[3])  # raw beside the head's tokens
    assert torch.allclose(both.projected[1], model.ap_head(full.features[1]))
    legacy = model(x, t, y, return_blocks=(1,), project=True)  # the older spelling
    assert torch.allclose(legacy.features[1], both.projected[1])


def test_bad_inputs_name_the_allowed_values():
    model = build_model(tiny())
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with pytest.raises(SraError, match=r"outside 1\.\.4"):
        model(x, t, y, return_blocks=(5,))
    with pytest.raises(SraError, match=r"outside 1\.\.4"):
        model(x, t, y, return_blocks=(0,))
    with pytest.raises(SraError, match=r"expected \(N, 3, 8, 8\)"):
        model(torch.randn(2, 4, 8, 8), t, y)
    with pytest.raises(SraError, match="shape"):
        model(x, torch.rand(3), y)
    with pytest.raises(SraError, match="divisible by num_heads"):
        tiny(hidden_size=30, num_heads=4)
    with pytest.raises(SraError, match="allowed: SiT, DiT"):
        tiny(family="UNet")

"""SiT solvers with the exact velocity of Gaussian data; guidance interval; presets; no host–device
sync in any sampler step."""

import pytest
import torch

from sra.diffusion.paths import get_path
from sra.errors import SraError
from sra.models import ModelConfig, TransformerOutput, build_model
from sra.sampling import SamplerConfig, cfg_combine, generate, guided, preset
from sra.sampling.flow import ode_sample, sde_sample
from sra.sampling.schedules import ddpm_schedule, ode_times, sampler_grid, sde_times
from host_reads import HostReads

M, S = 1.5, 0.5  # data ~ N(M, S²) per dimension


def exact_velocity(path_name: str):
    """E[v | x_t] for Gaussian data: α'·E[x|x_t] + σ'·E[ε|x_t]."""
    path = get_path(path_name)

    def v(x, t, y, t_host):
        assert float(t[0]) == t_host  # the solver hands the same time to the host
        t = t.to(x.dtype)
        a, s, da, ds = (f(t)[:, None] for f in (path.alpha, path.sigma, path.d_alpha, path.d_sigma))
        var = a**2 * S**2 + s**2
        ex = M + a * S**2 / var * (x - a * M)
        ee = s / var * (x - a * M)
        return da * ex + ds * ee

    return v


@pytest.mark.parametrize("path_name", ["linear", "cosine"])
@pytest.mark.parametrize("mode,steps,tol", [("euler", 200, 0.03), ("heun", 40, 0.01)])
def test_ode_transports_noise_to_the_data_gaussian(path_name, mode, steps, tol):
    torch.manual_seed(0)
    noise = torch.randn(20000, 2, dtype=torch.float64)
    x = ode_sample(exact_velocity(path_name), noise, torch.zeros(20000, dtype=torch.long), ode_times(steps),
                   heun=mode == "heun", state_dtype=torch.float64)
    assert abs(x.mean() - M) < tol + 0.01 and abs(x.std() - S) < tol + 0.01
    # deterministic transport of a Gaussian is affine: the map is x = M + S·noise exactly
    assert torch.allclose(x, M + S * noise, atol=tol * 3)


@pytest.mark.parametrize("path_name", ["linear", "cosine"])
def test_sde_matches_moments(path_name):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    x = sde_sample(exact_velocity(path_name), noise, torch.zeros(20000, dtype=torch.long),
                   sde_times(250, 0.04), path_type=path_name, state_dtype=torch.float64, generator=g)
    assert abs(x.mean() - M) < 0.03 and abs(x.std() - S) < 0.03


def test_cfg_interval_calls_model_once_outside():
    calls = []

    def model(x, t, y):
        calls.append((x.shape[0], float(t[0])))
        return TransformerOutput(torch.where((y == 9)[:, None], torch.zeros_like(x), torch.ones_like(x)), {})

    cfg = SamplerConfig(mode="euler", steps=10, cfg_scale=4.0, guidance_low=0.0, guidance_high=0.7)
    fn = guided(model, cfg, null_label=9)
    ode_sample(fn, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), sampler_grid(cfg))
    inside = [n for n, t in calls if t <= 0.7]
    outside = [n for n, t in calls if t > 0.7]
    assert len(calls) == 10 and set(outside) == {3} and set(inside) == {6} and len(outside) == 3
    # combination u + w(c − u) with c = 1, u = 0 → w
    out = fn(torch.zeros(3, 2), torch.full((3,), 0.5), torch.zeros(3, dtype=torch.long), 0.5)
    assert torch.allclose(out, torch.full((3, 2), 4.0))


def test_cfg_combine_dit_channels():
    cond = torch.ones(2, 8, 4, 4)
    uncond = torch.zeros(2, 8, 4, 4)
    all_ch = cfg_combine(cond, uncond, 3.0, learn_sigma=True)
    assert torch.all(all_ch[:, :4] == 3.0) and torch.all(all_ch[:, 4:] == 1.0)  # variance: cond
    three = cfg_combine(cond, uncond, 3.0, learn_sigma=True, channels=3)
    assert torch.all(three[:, :3] == 3.0) and torch.all(three[:, 3:] == 1.0)


def test_generate_with_tiny_models_and_errors():
    torch.manual_seed(0)
    sit = build_model(ModelConfig(depth=2, hidden_size=32, num_heads=4, patch_size=2, input_size=8,
                                  in_channels=3, num_classes=4))
    noise = torch.randn(2, 3, 8, 8)
    y = torch.tensor([0, 3])
    for mode in ("euler", "heun", "sde"):
        out = generate(sit, noise, y, SamplerConfig(mode=mode, steps=4, cfg_scale=1.5))
        assert out.shape == noise.shape and torch.isfinite(out).all()
    with pytest.raises(SraError, match="allowed: euler, heun, sde"):
        generate(sit, noise, y, SamplerConfig(mode="ddpm", steps=4))
    with pytest.raises(SraError, match=r"labels must be in 0\.\.4"):
        generate(sit, noise, torch.tensor([0, 7]), SamplerConfig(mode="euler", steps=2))
    dit = build_model(ModelConfig(family="DiT", depth=2, hidden_size=32, num_heads=4, patch_size=2,
                                  input_size=8, in_channels=3, num_classes=4))
    for mode in ("ddpm", "ddim"):
        out = generate(dit, noise, y, SamplerConfig(mode=mode, steps=5, cfg_scale=2.0))
        assert out.shape == noise.shape and torch.isfinite(out).all()


def test_presets_and_bad_config():
    p = preset("paper-256")
    assert (p.mode, p.steps, p.cfg_scale, p.guidance_high) == ("sde", 250, 1.8, 0.7)
    with pytest.raises(SraError, match="allowed: paper-256"):
        preset("nope")
    with pytest.raises(SraError, match="allowed: euler, heun, sde, ddpm, ddim"):
        SamplerConfig(mode="dpm")
    with pytest.raises(SraError, match="guidance interval"):
        SamplerConfig(guidance_low=0.8, guidance_high=0.2)


def _tiny(family: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(family=family, depth=2, hidden_size=32, num_heads=4, patch_size=2,
                                    input_size=8, in_channels=3, num_classes=4))
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero: outputs would not depend on the input
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("mode", ["euler", "heun", "sde", "ddpm", "ddim"])
def test_callback_once_per_step_with_the_step_time(mode):
    model = _tiny("DiT" if mode in ("ddpm", "ddim") else "SiT")
    noise, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    cfg = SamplerConfig(mode=mode, steps=5, cfg_scale=1.5, guidance_high=0.7)
    seen = []
    out = generate(model, noise, y, cfg, generator=torch.Generator().manual_seed(1), callback=seen.append)
    grid = sampler_grid(cfg)
    if mode in ("ddpm", "ddim"):
        want = [int(s) for s in grid.timestep_map[::-1]]  # original steps, last → 0
        assert [s["t_next"] for s in seen] == want[1:] + [-1]
        assert all(s["denoised"].shape == noise.shape for s in seen)
    else:
        want = grid[:-1]
        assert [s["t_next"] for s in seen] == grid[1:]
        assert all(s["velocity"].shape == noise.shape for s in seen)
    assert [s["i"] for s in seen] == list(range(5)) and {s["steps"] for s in seen} == {5}
    assert [s["t"] for s in seen] == want
    assert torch.equal(seen[-1]["x"][:, :3].to(out.dtype), out)  # the last state is the result
    # the callback only watches: the samples are those of a run without it, progress bar or not
    again = generate(model, noise, y, cfg, generator=torch.Generator().manual_seed(1), progress=True)
    assert torch.equal(out, again)


def test_solvers_take_any_grid():
    """A new grid needs no solver edit: a non-uniform ODE grid and a DDIM respacing."""
    from sra.sampling.ddpm import ddim_sample
    from sra.sampling.guidance import guided

    sit = _tiny("SiT")
    noise, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    fn = guided(sit, SamplerConfig(mode="euler"), null_label=4)
    times = [1.0, 0.9, 0.5, 0.0]
    seen = []
    x = ode_sample(fn, noise, y, torch.tensor(times, dtype=torch.float64), callback=seen.append)
    assert [s["t"] for s in seen] == times[:-1] and torch.isfinite(x).all()
    # one Euler step by hand
    v = fn(noise, torch.ones(2), y, 1.0)
    assert torch.allclose(ode_sample(fn, noise, y, [1.0, 0.0]), noise - v)
    with pytest.raises(SraError, match="at least 2 times"):
        ode_sample(fn, noise, y, [1.0])
    dit = _tiny("DiT")
    fn = guided(dit, SamplerConfig(mode="ddim"), null_label=4, learn_sigma=True, time_scale=1000.0)
    seen = []
    ddim_sample(fn, ddpm_schedule("ddim4"), noise, y, callback=seen.append)
    assert [s["t"] for s in seen] == [750, 500, 250, 0]


# -- host–device syncs ---------------------------------------------------------------------------------
def _counter(monkeypatch) -> HostReads:
    counter = HostReads(monkeypatch)
    counter.armed = False  # armed where the solver starts (_arm_at_solver_entry) or by hand
    return counter


def _arm_at_solver_entry(monkeypatch, counter) -> None:
    """Arm the counter when the solver starts: what follows is the step loop (generate's one-time
    set-up before it — grid, the host label check — is not counted)."""
    import sra.sampling.solvers as S

    def armed(solve):
        def run(*a, **k):
            counter.armed = True
            return solve(*a, **k)
        return run

    monkeypatch.setattr(S, "SOLVERS", {name: armed(solve) for name, solve in S.SOLVERS.items()})


def test_sync_counter_sees_host_reads(monkeypatch):
    """The counter below is not blind: each kind of host read it looks for is counted."""
    counter = _counter(monkeypatch)
    counter.armed = True
    with counter:
        t = torch.ones(3)
        float(t[0]), bool(t.min() < 0), torch.equal(t, t), t.tolist(), t.numpy()
    assert len(counter.events) == 5, counter.events


@pytest.mark.parametrize("mode", ["euler", "heun", "sde", "ddpm", "ddim"])
def test_no_host_sync_in_any_sampler_step(monkeypatch, mode):
    """Every step of every sampler loop, with CFG on an interval (both branches taken), reads no
    tensor value on the host: zero syncs per step."""
    model = _tiny("DiT" if mode in ("ddpm", "ddim") else "SiT")
    cfg = SamplerConfig(mode=mode, steps=4, cfg_scale=1.5, guidance_high=0.7,
                        ddim_eta=0.5 if mode == "ddim" else 0.0)
    counter = _counter(monkeypatch)
    _arm_at_solver_entry(monkeypatch, counter)
    steps = []
    with counter:
        generate(model, torch.randn(2, 3, 8, 8), torch.tensor([0, 3]), cfg,
                 generator=torch.Generator().manual_seed(0), callback=lambda info: steps.append(info["t"]))
    assert counter.armed and len(steps) == 4
    assert counter.events == [], counter.events

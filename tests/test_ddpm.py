"""Tests for the DDPM process (sra.diffusion: schedule, ddpm, losses, respace) and its samplers
(sra.sampling.ddpm)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sra.diffusion.ddpm import GaussianDiffusion
from sra.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from sra.diffusion.respace import space_timesteps
from sra.diffusion.schedule import DDPMConfig
from sra.errors import SraError
from sra.sampling.ddpm import ddim_sample, ddpm_sample
from sra.sampling.guidance import cfg_combine


@pytest.fixture(autouse=True)
def _deterministic_single_thread():
    """Seed every test; one intra-op thread (tiny tensors: threads only add contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def diff() -> GaussianDiffusion:
    return GaussianDiffusion(DDPMConfig())


def _independent_alphas_cumprod(n: int = 1000) -> list[float]:
    """ᾱ_t with plain Python floats (no numpy cumprod), for cross-checking."""
    betas = [1e-4 + (0.02 - 1e-4) * i / (n - 1) for i in range(n)]
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return out


# ---------------------------------------------------------------------------- schedule


def test_linear_schedule_endpoints_and_monotone(diff):
    assert diff.betas.dtype == np.float64 and diff.betas.shape == (1000,)
    assert diff.betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert diff.betas[-1] == pytest.approx(0.02, abs=1e-15)
    assert np.all(np.diff(diff.alphas_cumprod) < 0)
    assert diff.alphas_cumprod[-1] == pytest.approx(4.04e-5, rel=0.02)  # known DDPM value
    np.testing.assert_allclose(diff.alphas_cumprod, _independent_alphas_cumprod(), rtol=1e-12)
    assert diff.alphas_cumprod_prev[0] == 1.0
    # β̃_0 = 0, its clipped log replaced by log β̃_1
    assert diff.posterior_variance[0] == 0.0
    assert diff.posterior_log_variance_clipped[0] == diff.posterior_log_variance_clipped[1]
    assert diff.posterior_log_variance_clipped[1] == pytest.approx(math.log(diff.posterior_variance[1]))


def test_linear_schedule_scaled_for_fewer_steps():
    d = GaussianDiffusion(DDPMConfig(num_steps=100))
    assert d.betas[0] == pytest.approx(1e-3) and d.betas[-1] == pytest.approx(0.2)
    with pytest.raises(SraError, match="num_steps"):
        DDPMConfig(num_steps=10)  # β_end scaled to 2.0


def test_cosine_schedule():
    d = GaussianDiffusion(DDPMConfig(beta_schedule="cosine"))
    assert np.all(np.diff(d.alphas_cumprod) < 0)
    assert d.betas.max() <= 0.999
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert d.alphas_cumprod[499] == pytest.approx(f(0.5) / f(0.0), rel=1e-9)
    with pytest.raises(SraError, match="allowed: linear, cosine"):
        DDPMConfig(beta_schedule="sigmoid")


# ---------------------------------------------------------------------------- forward / posterior


def test_q_sample_marginal_moments(diff):
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    for step in (0, 300, 999):
        t = torch.full((n,), step, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        xt = diff.q_sample(x0, t, noise)
        ab = diff.alphas_cumprod[step]
        se = math.sqrt((1 - ab) / n)
        assert abs(xt.mean().item() - math.sqrt(ab) * 0.7) < 5 * se
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.04)


def test_posterior_matches_bayes(diff):
    ac = _independent_alphas_cumprod()
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    steps = [1, 2, 10, 250, 500, 998, 999]
    x0 = torch.tensor([0.3, -1.2, 0.8, 0.0, 2.0, -0.5, 1.1], dtype=torch.float64).view(-1, 1, 1, 1)
    xt = torch.tensor([-0.4, 0.9, 1.5, -2.0, 0.1, 0.7, -1.0], dtype=torch.float64).view(-1, 1, 1, 1)
    t = torch.tensor(steps)
    mean, var, logvar = diff.q_posterior_mean_variance(x0, xt, t)
    for k, s in enumerate(steps):
        # q(x_{t-1}|x0) = N(√ᾱ_{t-1} x0, 1−ᾱ_{t-1});  q(x_t|x_{t-1}) = N(√α_t x_{t-1}, β_t)
        a_prev, a_t, b = ac[s - 1], 1 - betas[s], betas[s]
        prec = 1 / (1 - a_prev) + a_t / b
        v = 1 / prec
        m = v * (math.sqrt(a_prev) * x0[k].item() / (1 - a_prev) + math.sqrt(a_t) * xt[k].item() / b)
        assert mean[k].item() == pytest.approx(m, rel=1e-10, abs=1e-12)
        assert var[k].item() == pytest.approx(v, rel=1e-10)
        assert logvar[k].item() == pytest.approx(math.log(v), rel=1e-10)
    # t = 0: posterior collapses onto x0
    m0, v0, _ = diff.q_posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    assert m0.item() == pytest.approx(x0[0].item(), abs=1e-12) and v0.item() == 0.0


def test_p_mean_variance_learned_range(diff):
    n, C = 3, 2
    x_t = torch.randn(n, C, 2, 2, dtype=torch.float64)
    eps = torch.randn_like(x_t)
    t = torch.tensor([0, 17, 999])
    for v_val, expect in (
        (1.0, np.log(diff.betas)),
        (-1.0, diff.posterior_log_variance_clipped),
        (0.0, 0.5 * (np.log(diff.betas) + diff.posterior_log_variance_clipped)),
    ):
        out = diff.p_mean_variance(torch.cat([eps, torch.full_like(eps, v_val)], 1), x_t, t)
        for k, s in enumerate(t.tolist()):
            assert torch.allclose(out.log_variance[k], torch.tensor(expect[s], dtype=torch.float64))
        assert torch.allclose(out.variance, out.log_variance.exp())
    ab = torch.tensor(diff.alphas_cumprod[t.numpy()]).view(-1, 1, 1, 1)
    x0_ref = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
    assert torch.allclose(out.pred_x0, x0_ref, atol=1e-10)
    m_ref, _, _ = diff.q_posterior_mean_variance(x0_ref, x_t, t)
    assert torch.allclose(out.mean, m_ref, atol=1e-10)
    clipped = diff.p_mean_variance(torch.cat([eps, eps * 0], 1), x_t, t, clip_denoised=True)
    assert clipped.pred_x0.abs().max() <= 1.0


# ---------------------------------------------------------------------------- helpers


def test_normal_kl_closed_form_and_monte_carlo():
    m1, lv1, m2, lv2 = (torch.tensor(v, dtype=torch.float64) for v in (0.3, -0.7, -0.4, 0.5))
    kl = normal_kl(m1, lv1, m2, lv2)
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    assert kl.item() == pytest.approx(torch.distributions.kl_divergence(p, q).item(), rel=1e-12)
    x = m1 + (0.5 * lv1).exp() * torch.randn(
        400_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    mc = (p.log_prob(x) - q.log_prob(x)).mean().item()
    assert mc == pytest.approx(kl.item(), abs=5e-3)
    assert normal_kl(m1, lv1, m1, lv1).item() == pytest.approx(0.0, abs=1e-15)


def test_discretized_log_likelihood_sums_to_one():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)  # centres, spacing 2/255
    for mean, log_scale in ((0.1, -1.0), (-0.9, -3.0), (0.95, 0.5), (0.0, -6.0)):
        means = torch.full_like(bins, mean)
        ls = torch.full_like(bins, log_scale)
        p = discretized_gaussian_log_likelihood(bins, means=means, log_scales=ls).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    # a middle bin close to the exact Gaussian mass
    x = torch.tensor([0.2], dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(x, means=torch.zeros(1, dtype=torch.float64), log_scales=torch.tensor([-2.0], dtype=torch.float64))
    nd = torch.distributions.Normal(0.0, math.exp(-2.0))
    exact = (nd.cdf(torch.tensor(0.2 + 1 / 255)) - nd.cdf(torch.tensor(0.2 - 1 / 255))).item()
    assert lp.exp().item() == pytest.approx(exact, rel=2e-3)


def test_mean_flat():
    x = torch.arange(24.0).view(2, 3, 4)
    assert torch.equal(mean_flat(x), torch.tensor([5.5, 17.5]))


# ---------------------------------------------------------------------------- losses


def _batch(diff, n=6, C=3, seed=0, steps=(0, 1, 5, 200, 700, 999)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, C, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor(steps)[:n]
    return x0, noise, t, diff.q_sample(x0, t, noise)


def test_training_losses_vb_trains_only_variance(diff):
    x0, noise, t, x_t = _batch(diff)
    out = torch.randn(6, 6, 4, 4, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    losses = diff.training_losses(out, x0, x_t, t, noise)
    assert set(losses) == {"mse", "vb", "loss"} and all(v.shape == (6,) for v in losses.values())
    assert torch.allclose(losses["loss"], losses["mse"] + losses["vb"])
    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert torch.all(g_vb[:, :3] == 0)  # ε half gets no gradient from the VB term
    assert g_vb[:, 3:].abs().sum() > 0  # the variance half does
    (g_all,) = torch.autograd.grad(losses["loss"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert torch.allclose(g_all[:, :3], g_mse[:, :3])
    assert torch.allclose(g_mse[:, :3], -2 * (noise - out[:, :3].detach()) / (3 * 16))


def test_training_losses_values(diff):
    x0, noise, t, x_t = _batch(diff)
    x0, noise, x_t = x0.double(), noise.double(), x_t.double()
    # exact ε and v = -1 (posterior variance): KL is zero for t > 0
    out = torch.cat([noise, -torch.ones_like(noise)], 1)
    losses = diff.training_losses(out, x0, x_t, t, noise)
    assert torch.allclose(losses["mse"], torch.zeros(6, dtype=torch.float64))
    assert torch.allclose(losses["vb"][1:], torch.zeros(5, dtype=torch.float64), atol=1e-10)
    # t = 0: decoder NLL in bits/dim
    pm = diff.p_mean_variance(out, x_t, t)
    nll = -discretized_gaussian_log_likelihood(x0, means=pm.mean, log_scales=0.5 * pm.log_variance)
    assert losses["vb"][0].item() == pytest.approx(mean_flat(nll)[0].item() / math.log(2), rel=1e-10)
    # a wrong variance costs KL > 0
    out2 = torch.cat([noise, torch.ones_like(noise)], 1)
    assert torch.all(diff.training_losses(out2, x0, x_t, t, noise)["vb"][1:] > 0)


def test_vb_rescaled_by_steps():
    cfg = DDPMConfig(num_steps=250)
    a, b = GaussianDiffusion(cfg), GaussianDiffusion(DDPMConfig(num_steps=250, rescale_vb=False))
    x0, noise, t, x_t = _batch(a, steps=(0, 1, 5, 100, 200, 249))
    out = torch.randn(6, 6, 4, 4)
    va = a.training_losses(out, x0, x_t, t, noise)["vb"]
    vb = b.training_losses(out, x0, x_t, t, noise)["vb"]
    assert torch.allclose(va, vb * 0.25)


def test_fixed_variance_mode():
    d = GaussianDiffusion(DDPMConfig(learn_sigma=False))
    x0, noise, t, x_t = _batch(d)
    losses = d.training_losses(noise * 0.5, x0, x_t, t, noise)
    assert torch.all(losses["vb"] == 0) and torch.allclose(losses["loss"], losses["mse"])
    pm = d.p_mean_variance(noise, x_t, t)
    assert pm.log_variance[3, 0, 0, 0].item() == pytest.approx(math.log(d.betas[200]), rel=1e-6)


def test_bad_inputs_raise_sra_error(diff):
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(SraError, match="allowed: 0..999"):
        diff.q_sample(x, torch.tensor([0, 1000]), x)
    with pytest.raises(SraError, match="allowed: 0..999"):
        diff.q_sample(x, torch.tensor([-1, 3]), x)
    with pytest.raises(SraError, match="integer tensor"):
        diff.q_sample(x, torch.tensor([0.5, 3.0]), x)
    with pytest.raises(SraError, match="model output must have shape"):
        diff.p_mean_variance(torch.zeros(2, 3, 4, 4), x, torch.tensor([1, 2]))
    for bad in ("abc", "ddim", "ddim999", "2000", "0", "10,x", [1000], []):
        with pytest.raises(SraError) as e:
            diff.respaced(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(SraError, match="1..4"):
        cfg_combine(torch.zeros(1, 8, 2, 2), torch.zeros(1, 8, 2, 2), 2.0, learn_sigma=True, channels=5)


# ---------------------------------------------------------------------------- respacing


def test_space_timesteps_sections():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    steps = space_timesteps(300, "10,15,20")
    assert len(steps) == 45
    assert steps[0] == 0 and steps[9] == 99 and steps[10] == 100 and steps[24] == 199 and steps[-1] == 299
    s250 = space_timesteps(1000, 250)
    assert len(s250) == 250 and s250[0] == 0 and s250[-1] == 999
    assert space_timesteps(1000, "250") == s250
    assert space_timesteps(10, "") == list(range(10))
    assert space_timesteps(10, [7, 3, 3]) == [3, 7]


def test_respaced_keeps_alphas_cumprod(diff):
    for spec in (250, "ddim50", "10,15,20", [0, 499, 999], [5, 6]):
        r = diff.respaced(spec)
        np.testing.assert_allclose(r.alphas_cumprod, diff.alphas_cumprod[r.timestep_map], rtol=1e-12)
        assert r.num_timesteps == len(r.timestep_map)
    r2 = diff.respaced(250).respaced(50)  # maps compose back to original steps
    np.testing.assert_allclose(r2.alphas_cumprod, diff.alphas_cumprod[r2.timestep_map], rtol=1e-12)
    assert r2.timestep_map.max() <= 999 and len(r2.timestep_map) == 50


# ---------------------------------------------------------------------------- sampling


M = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64).view(1, 4, 1, 1)
S = torch.tensor([0.3, 1.0, 0.7, 1.3], dtype=torch.float64).view(1, 4, 1, 1)


def _oracle(base: GaussianDiffusion, spaced: GaussianDiffusion, seen: list | None = None):
    """Exact ε (and exact reverse variance) for data x0 ~ N(M, S²) per dimension."""
    index_of = {int(s): i for i, s in enumerate(spaced.timestep_map)}

    def model_fn(x, t, y, t_host):
        assert int(t[0]) == t_host  # the sampler hands the same original step to the host
        if seen is not None:
            seen.append(int(t[0]))
        ab = torch.from_numpy(base.alphas_cumprod)[t].view(-1, 1, 1, 1)
        denom = ab * S**2 + 1 - ab
        eps = (x - ab.sqrt() * M) * (1 - ab).sqrt() / denom
        # Var[x_{t-1}|x_t] = β̃ + coef1²·Var[x0|x_t], written as v in the learned range
        i = np.full(t.shape[0], index_of[int(t[0])])  # samplers use one step per batch
        var = spaced.posterior_variance[i].reshape(-1, 1, 1, 1) + spaced.posterior_mean_coef1[i].reshape(
            -1, 1, 1, 1
        ) ** 2 * (S**2 * (1 - ab) / denom).numpy()
        lo = spaced.posterior_log_variance_clipped[i].reshape(-1, 1, 1, 1)
        hi = np.log(spaced.betas[i]).reshape(-1, 1, 1, 1)
        v = np.clip(2 * (np.log(var) - lo) / (hi - lo) - 1, -1, 1)
        return torch.cat([eps, torch.as_tensor(v, dtype=torch.float64).expand_as(eps)], 1)

    return model_fn


# Ancestral sampling with the exact mean and variance is exact for Gaussian data at any step
# count; deterministic DDIM is a first-order ODE discretisation (std 8% low for S=0.3 at 50
# steps, 1.4% at 250), so it gets a finer grid.
@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddim", 250)])
def test_oracle_sampling_reproduces_gaussian(diff, sampler, steps):
    spaced = diff.respaced(steps)
    n = 4000
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 4, 1, 1, generator=g, dtype=torch.float64)
    seen: list[int] = []
    fn = _oracle(diff, spaced, seen)
    if sampler == "ddpm":
        x = ddpm_sample(fn, spaced, noise, None, generator=g)
    else:
        x = ddim_sample(fn, spaced, noise, None, eta=0.0)
    assert seen == spaced.timestep_map[::-1].tolist()  # the model sees ORIGINAL steps
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True)
    assert torch.all((mean - M).abs() < 4 * S / math.sqrt(n)), (mean.flatten(), M.flatten())
    assert torch.allclose(std, S, rtol=0.05), (std.flatten(), S.flatten())


def test_ddpm_sampling_reproducible_and_last_step_is_mean(diff):
    spaced = diff.respaced(10)
    fn = _oracle(diff, spaced)
    noise = torch.randn(8, 4, 1, 1, dtype=torch.float64)
    a = ddpm_sample(fn, spaced, noise, None, generator=torch.Generator().manual_seed(5), progress=True)
    b = ddpm_sample(fn, spaced, noise, None, generator=torch.Generator().manual_seed(5))
    c = ddpm_sample(fn, spaced, noise, None, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a single-step schedule: output is exactly the mean (no noise at t = 0)
    one = diff.respaced([0])
    out = ddpm_sample(_oracle(diff, one), one, noise, None, generator=torch.Generator().manual_seed(1))
    pm = one.p_mean_variance(_oracle(diff, one)(noise, torch.zeros(8, dtype=torch.long), None, 0), noise,
                             torch.zeros(8, dtype=torch.long))
    assert torch.equal(out, pm.mean)
    d1 = ddim_sample(fn, spaced, noise, None, eta=1.0, generator=torch.Generator().manual_seed(5))
    d2 = ddim_sample(fn, spaced, noise, None, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(d1, d2)


def test_cfg_combine_learned_sigma():
    C = 4
    cond = torch.randn(2, 2 * C, 3, 3)
    unc = torch.randn(2, 2 * C, 3, 3)
    out = cfg_combine(cond, unc, 1.5, learn_sigma=True)
    assert torch.allclose(out[:, :C], unc[:, :C] + 1.5 * (cond[:, :C] - unc[:, :C]))
    assert torch.equal(out[:, C:], cond[:, C:])
    out3 = cfg_combine(cond, unc, 4.0, learn_sigma=True, channels=3)
    assert torch.allclose(out3[:, :3], unc[:, :3] + 4.0 * (cond[:, :3] - unc[:, :3]))
    assert torch.equal(out3[:, 3:], cond[:, 3:])  # 4th ε channel and variance: conditional
    assert torch.allclose(cfg_combine(cond, unc, 1.0, learn_sigma=True), cond, atol=1e-6)
    eps_only = cfg_combine(cond[:, :C], unc[:, :C], 2.0, learn_sigma=False)
    assert torch.allclose(eps_only, 2 * cond[:, :C] - unc[:, :C], atol=1e-6)

"""Interpolants: derivatives against autograd, score identity, time samplers."""


import pytest
import torch

from sra.diffusion.paths import PATHS, get_path, sample_time
from sra.errors import SraError


@pytest.mark.parametrize("name", list(PATHS))
def test_derivatives_match_autograd(name):
    path = get_path(name)
    t = torch.linspace(0.01, 0.99, 37, dtype=torch.float64, requires_grad=True)
    for f, df in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
        (g,) = torch.autograd.grad(f(t).sum(), t)
        assert torch.allclose(g, df(t), atol=1e-10)


@pytest.mark.parametrize("name", list(PATHS))
def test_boundaries_and_velocity(name):
    path = get_path(name)
    x, eps = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    assert torch.allclose(path.interpolate(x, eps, torch.zeros(4, dtype=torch.float64)), x)
    assert torch.allclose(path.interpolate(x, eps, torch.ones(4, dtype=torch.float64)), eps, atol=1e-12)
    t = torch.full((4,), 0.3, dtype=torch.float64, requires_grad=True)
    (dxdt,) = torch.autograd.grad(path.interpolate(x, eps, t).sum(), t)
    assert torch.allclose(dxdt, path.velocity(x, eps, t).sum(dim=(1, 2, 3)))


@pytest.mark.parametrize("name", list(PATHS))
def test_score_from_true_velocity_is_minus_eps_over_sigma(name):
    path = get_path(name)
    x, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.999], dtype=torch.float64)
    xt, v = path.interpolate(x, eps, t), path.velocity(x, eps, t)
    sigma = path.sigma(t)[:, None]
    assert torch.allclose(path.score_from_velocity(v, xt, t), -eps / sigma, atol=1e-8)
    # the usual form of the same identity (divides by α', fine away from t = 0)
    a, s, da, ds = (f(t)[:, None] for f in (path.alpha, path.sigma, path.d_alpha, path.d_sigma))
    spec = (a / da * v - xt) / (s**2 - a / da * ds * s)
    assert torch.allclose(path.score_from_velocity(v, xt, t), spec, atol=1e-8)


def test_lognormal_time_inverts_snr_ratio():
    torch.manual_seed(0)
    for name in PATHS:
        path = get_path(name)
        t = sample_time("lognormal", 20000, path)
        assert 0 < t.min() and t.max() < 1
        r = path.sigma(t) / path.alpha(t)  # should be exp(N(0, 1))
        logr = r.log()
        assert abs(logr.mean()) < 0.03 and abs(logr.std() - 1) < 0.03
    u = sample_time("uniform", 20000, get_path("linear"))
    assert abs(u.mean() - 0.5) < 0.01


def test_unknown_names():
    with pytest.raises(SraError, match="allowed: linear, cosine"):
        get_path("edm")
    with pytest.raises(SraError, match="allowed: uniform, lognormal"):
        sample_time("beta", 3, get_path("linear"))

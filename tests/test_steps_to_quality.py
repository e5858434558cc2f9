"""The steps-to-quality benchmark's exact model and reference (benchmarks/gaussian_mixture.py,
benchmarks/steps_to_quality.py): the closed-form eps is the score, the ODE reference lands on the mixture, and
--quick runs."""

import json
import math

import pytest
import torch

from benchmarks.gaussian_mixture import GaussianMixture, MixtureDenoiser, sd_alphas_cumprod
from benchmarks.steps_to_quality import main, ode_reference, order


@pytest.fixture(scope="module")
def denoiser():
    return MixtureDenoiser(GaussianMixture.seeded(dim=16, components=4, seed=0), sd_alphas_cumprod())


@pytest.mark.parametrize("t", [0, 0.5, 37.25, 500, 998.75, 999])
def test_eps_is_minus_scaled_score_of_the_vp_marginal(denoiser, t):
    """eps(x_t, t) = -sqrt(1 - abar_t) grad log p_t(x_t), with p_t(x_t) = p_sigma(x_t / sqrt(abar_t)) / abar^(D/2)."""
    sigma = denoiser.sigma(t)
    alpha = 1 / math.sqrt(1 + float(sigma) ** 2)
    x_t = torch.randn(8, 4, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    log_p = denoiser.mixture.log_prob(x_t.reshape(8, -1) / alpha, sigma) - 16 * math.log(alpha)
    (score,) = torch.autograd.grad(log_p.sum(), x_t)
    expected = -math.sqrt(1 - alpha**2) * score
    torch.testing.assert_close(denoiser(x_t.detach(), t), expected, rtol=1e-10, atol=1e-12)


def test_sigma_interpolates_linearly_between_integer_timesteps(denoiser):
    s = denoiser.train_sigmas
    assert float(denoiser.sigma(10)) == float(s[10])
    assert float(denoiser.sigma(10.25)) == pytest.approx(0.75 * float(s[10]) + 0.25 * float(s[11]), rel=1e-14)


def test_v_and_sample_predictions_agree_with_eps(denoiser):
    mixture = denoiser.mixture
    x_t = torch.randn(8, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = 321.5
    alpha = 1 / math.sqrt(1 + float(denoiser.sigma(t)) ** 2)
    eps = denoiser(x_t, t)
    x0 = MixtureDenoiser(mixture, sd_alphas_cumprod(), "sample")(x_t, t)
    v = MixtureDenoiser(mixture, sd_alphas_cumprod(), "v_prediction")(x_t, t)
    torch.testing.assert_close(x0, (x_t - math.sqrt(1 - alpha**2) * eps) / alpha, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, alpha * eps - math.sqrt(1 - alpha**2) * x0, rtol=1e-10, atol=1e-12)


def test_fine_ode_solve_is_converged_and_lands_on_the_mixture(denoiser):
    """Noise transported from sigma_max to 0 by the probability-flow ODE: two resolutions agree, and the samples
    are as likely under the mixture as exact samples are (mean log-likelihood per dimension)."""
    mixture, sigma_max = denoiser.mixture, float(denoiser.train_sigmas[-1])
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = z * math.sqrt(1 + sigma_max**2)
    coarse, fine = ode_reference(mixture, y, sigma_max, 0.0, 50), ode_reference(mixture, y, sigma_max, 0.0, 100)
    assert float((coarse - fine).pow(2).mean().sqrt()) < 1e-4 and float((coarse - fine).abs().max()) < 1e-2
    exact = mixture.sample(64, torch.Generator().manual_seed(4))
    nll, exact_nll = (-mixture.log_prob(s).mean() / 16 for s in (fine, exact))
    assert abs(float(nll - exact_nll)) < 0.1
    # every sample sits in a component: its best component's log-density per dimension is that of a typical point
    best = mixture.component_log_probs(fine, 0.0).max(-1).values / 16
    assert float(best.min()) > float((mixture.component_log_probs(exact, 0.0).max(-1).values / 16).min()) - 0.5


def test_order_is_minus_the_log_log_slope():
    assert order([4, 8, 16], [1.0, 0.25, 0.0625]) == pytest.approx(2.0)


@pytest.mark.slow
def test_quick_run_writes_the_table(tmp_path):
    report = main(["--quick", "--output", str(tmp_path / "stq")])
    table = (tmp_path / "stq.md").read_text()
    assert "| Euler |" in table and (tmp_path / "stq.png").stat().st_size > 0
    assert json.loads((tmp_path / "stq.json").read_text())["steps"] == [4, 8, 16, 32]
    assert report["reference"]["rms_n_vs_2n"] < 1e-5
    euler = report["mixture"]["Euler"]
    assert [run["calls"] for run in euler["runs"]] == [4, 8, 16, 32]
    assert euler["runs"][-1]["rms"] < euler["runs"][0]["rms"]  # a deterministic sampler converges to the ODE

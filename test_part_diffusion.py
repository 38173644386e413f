import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from diffusion import (
    Diffusion,
    DiffusionConfig,
    discretized_gaussian_log_likelihood,
    normal_kl,
)


def require(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(
            f"{module} is a test-only oracle: pip install -r requirements-test.txt"
        ) from err


def point_mass_oracle(diffusion: Diffusion, x_star: torch.Tensor):
    """The exact eps-prediction for data that is always x_star."""

    def model(x_t, t):
        alpha_bar = diffusion.alpha_bar[t].float().view(-1, 1, 1, 1)
        return (x_t - alpha_bar.sqrt() * x_star) / (1 - alpha_bar).sqrt()

    return model


# ---------------------------------------------------------------- schedule and forward process


def test_alpha_bar_is_running_product():
    diffusion = Diffusion()
    betas = np.linspace(1e-4, 0.02, 1000)
    expected = np.cumprod(1 - betas)
    assert np.allclose(diffusion.alpha_bar.cpu().numpy(), expected, rtol=1e-12)


def test_forward_marginal_matches_closed_form():
    diffusion = Diffusion()
    torch.manual_seed(0)
    x_0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    eps = torch.randn(100_000, 4, 1, 1, 1) * torch.ones(1, 1, 3, 8, 8)
    samples = torch.stack([diffusion.q_sample(x_0, t, e) for e in eps[:2000]])
    alpha_bar = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))[t].float()
    expected_mean = alpha_bar.sqrt().view(-1, 1, 1, 1) * x_0
    expected_std = (1 - alpha_bar).sqrt()
    assert torch.allclose(samples.mean(0), expected_mean, atol=0.08)
    assert torch.allclose(samples.std(0).mean(dim=(1, 2, 3)), expected_std, rtol=0.06)


def test_posterior_matches_bayes_rule():
    diffusion = Diffusion()
    x_0 = torch.tensor([0.3], dtype=torch.float64).view(1, 1, 1, 1)
    x_t = torch.tensor([-0.7], dtype=torch.float64).view(1, 1, 1, 1)
    for t in (1, 2, 100, 999):
        betas = np.linspace(1e-4, 0.02, 1000)
        alpha_bar = np.cumprod(1 - betas)
        # q(x_{t-1} | x_0) = N(sqrt(ab_prev) x_0, 1 - ab_prev); q(x_t | x_{t-1}) = N(sqrt(a) x, b).
        prior_var = 1 - alpha_bar[t - 1]
        precision = 1 / prior_var + (1 - betas[t]) / betas[t]
        var = 1 / precision
        mean = var * (
            math.sqrt(alpha_bar[t - 1]) * 0.3 / prior_var
            + math.sqrt(1 - betas[t]) * -0.7 / betas[t]
        )
        posterior_mean, posterior_var = diffusion.q_posterior(x_0, x_t, torch.tensor([t]))
        assert posterior_mean.item() == pytest.approx(mean, rel=1e-9)
        assert posterior_var.item() == pytest.approx(var, rel=1e-9)


# ---------------------------------------------------------------- bound terms


def test_normal_kl_matches_torch_distributions():
    mean1, var1 = torch.tensor([0.2, -1.0]), torch.tensor([0.5, 2.0])
    mean2, var2 = torch.tensor([0.0, 0.3]), torch.tensor([1.5, 0.1])
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean1, var1.sqrt()),
        torch.distributions.Normal(mean2, var2.sqrt()),
    )
    assert torch.allclose(normal_kl(mean1, var1, mean2, var2), expected, atol=1e-6)


def test_discretized_likelihood_matches_bin_integral():
    pixels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    mean = torch.full_like(pixels, 0.1)
    var = torch.full_like(pixels, 0.04)
    log_prob = discretized_gaussian_log_likelihood(pixels, mean, var)

    std = 0.2
    upper = norm.cdf((pixels.numpy() + 1 / 255 - 0.1) / std)
    lower = norm.cdf((pixels.numpy() - 1 / 255 - 0.1) / std)
    expected = upper - lower
    expected[0] = upper[0]
    expected[-1] = 1 - lower[-1]
    assert np.allclose(log_prob.exp().numpy(), expected, atol=1e-12)
    assert log_prob.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_bound_of_point_mass_closed_form(variance_type):
    """For data that is always x_star and the exact denoiser, every KL term is a pure variance
    mismatch, the decoder term is a Gaussian bin mass, and the prior term is closed form."""
    config = DiffusionConfig(variance_type=variance_type, clip_sample=False)
    diffusion = Diffusion(config)
    x_star = (torch.randint(0, 256, (1, 3, 4, 4)) / 127.5 - 1).float()
    result = diffusion.nll(point_mass_oracle(diffusion, x_star), x_star)

    betas = np.linspace(1e-4, 0.02, 1000)
    alpha_bar = np.cumprod(1 - betas)
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    posterior_var = (1 - alpha_bar_prev) / (1 - alpha_bar) * betas
    model_var = posterior_var.copy() if variance_type == "fixed_small" else betas.copy()
    model_var[0] = posterior_var[1]
    with np.errstate(divide="ignore"):
        kl = 0.5 * (np.log(model_var / posterior_var) + posterior_var / model_var - 1)
    expected_terms = kl / math.log(2)

    x = x_star.double().numpy().ravel()
    std = math.sqrt(model_var[0])
    upper = norm.cdf((1 / 255) / std) * np.ones_like(x)
    lower = norm.cdf((-1 / 255) / std) * np.ones_like(x)
    mass = np.where(x < -0.999, upper, np.where(x > 0.999, 1 - lower, upper - lower))
    expected_terms[0] = -np.log(mass).mean() / math.log(2)

    prior = 0.5 * (-np.log(1 - alpha_bar[-1]) + (1 - alpha_bar[-1]) + alpha_bar[-1] * x**2 - 1)
    expected_prior = prior.mean() / math.log(2)

    terms = result["terms_bpd"][0].numpy()
    # The oracle runs in float32, which leaves mean errors of order 1e-9 bits/dim per term.
    assert np.allclose(terms[1:], expected_terms[1:], rtol=1e-4, atol=1e-7)
    assert terms[0] == pytest.approx(expected_terms[0], rel=1e-5)
    assert result["prior_bpd"].item() == pytest.approx(expected_prior, rel=1e-9)
    assert result["bpd"].item() == pytest.approx(expected_terms.sum() + expected_prior, rel=1e-5)
    assert result["nats"].item() == pytest.approx(result["bpd"].item() * 48 * math.log(2))


def test_prior_term_is_tiny_for_linear_schedule():
    diffusion = Diffusion()
    x_0 = torch.rand(2, 3, 8, 8) * 2 - 1
    result = diffusion.nll(lambda x_t, t: torch.zeros_like(x_t), x_0)
    assert result["prior_bpd"].max().item() < 1e-4


# ---------------------------------------------------------------- samplers against diffusers


def use_float64_schedule(scheduler, diffusion: Diffusion):
    """Give a diffusers scheduler our float64 alpha_bar, after checking it matches its own.

    diffusers keeps alpha_bar in float32, where 1 - alpha_bar near t = 0 keeps only about four
    digits, so the step logic is compared on the same float64 schedule.
    """
    assert torch.allclose(scheduler.alphas_cumprod.double(), diffusion.alpha_bar, atol=1e-6)
    scheduler.alphas_cumprod = diffusion.alpha_bar.clone()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)


def test_timesteps_nest_across_stages():
    diffusion = Diffusion()
    full = set(diffusion.timesteps(1000).tolist())
    half = diffusion.timesteps(500).tolist()
    quarter = diffusion.timesteps(250).tolist()
    assert half[:3] == [999, 997, 995]
    assert half[-1] == 1
    assert quarter[:2] == [999, 995]
    assert set(half) <= full
    assert set(quarter) <= set(half)
    assert len(diffusion.timesteps(7)) == 7


def test_timesteps_reject_invalid_count():
    with pytest.raises(ValueError, match="steps=0"):
        Diffusion().timesteps(0)


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("steps", [1000, 500, 250])
def test_ancestral_step_matches_diffusers(variance_type, steps):
    schedulers = require("diffusers.schedulers")
    scheduler = schedulers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        variance_type=variance_type,
        clip_sample=True,
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(steps)
    diffusion = Diffusion(DiffusionConfig(variance_type=variance_type))
    ours = diffusion.timesteps(steps).tolist()
    assert ours == scheduler.timesteps.tolist()

    use_float64_schedule(scheduler, diffusion)
    torch.manual_seed(1)
    x_t = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    eps_pred = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for i in (0, len(ours) // 2, len(ours) - 2):
        t, t_prev = ours[i], ours[i + 1]
        expected = scheduler.step(
            eps_pred, t, x_t, generator=torch.Generator().manual_seed(7)
        ).prev_sample
        noise = torch.randn(
            x_t.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64
        )
        got = diffusion.ancestral_step(x_t, t, t_prev, eps_pred, noise)
        assert torch.allclose(got.double(), expected, atol=1e-6), (t, (got - expected).abs().max())


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("steps", [1000, 500, 250])
def test_ddim_step_matches_diffusers(eta, steps):
    schedulers = require("diffusers.schedulers")
    scheduler = schedulers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(steps)
    diffusion = Diffusion()
    ours = diffusion.timesteps(steps).tolist()
    assert ours == scheduler.timesteps.tolist()

    use_float64_schedule(scheduler, diffusion)
    torch.manual_seed(2)
    x_t = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    eps_pred = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for i in (0, len(ours) // 2, len(ours) - 1):
        t = ours[i]
        t_prev = ours[i + 1] if i + 1 < len(ours) else -1
        expected = scheduler.step(
            eps_pred, t, x_t, eta=eta, generator=torch.Generator().manual_seed(3)
        ).prev_sample
        noise = torch.randn(
            x_t.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
        )
        got = diffusion.ddim_step(x_t, t, t_prev, eps_pred, eta, noise)
        assert torch.allclose(got.double(), expected, atol=1e-6), (t, (got - expected).abs().max())


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_sampler_recovers_point_mass(sampler):
    diffusion = Diffusion()
    x_star = torch.rand(1, 3, 4, 4) * 1.6 - 0.8
    x_T = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x_0 = diffusion.sample(
        point_mass_oracle(diffusion, x_star),
        x_T,
        steps=50,
        sampler=sampler,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.allclose(x_0, x_star.expand_as(x_0), atol=1e-4)


def test_training_loss_zero_for_exact_denoiser():
    diffusion = Diffusion()
    x_star = torch.rand(1, 3, 4, 4) * 2 - 1
    loss = diffusion.training_loss(
        point_mass_oracle(diffusion, x_star), x_star.expand(8, -1, -1, -1)
    )
    assert loss.shape == (8,)
    assert loss.max().item() < 1e-8

"""Tests of ddpm-stability: math against closed forms, ports against their reference
implementations with identical random weights, and one tiny end-to-end run per script on real
images.

Real-image tests read the data folder from env var DDPM_DATA: unset, they are skipped with the
reason; set to a missing folder, they fail. Tests slower than about ten seconds are marked slow:
`python -m pytest test_all.py -m "not slow"` runs the quick subset.
"""

import argparse
import colorsys
import errno
import functools
import hashlib
import http.server
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import save_file
from scipy.stats import norm

import bench
import checkpoint
import corruptions
import data
import distill
import metrics
import report
import robust
import study
import train
import unet
import unlearn
from bench import random_inception_state, randomize_weights
from checkpoint import load_model, save_model
from data import BatchIterator, load_dataset
from diffusion import (
    Diffusion,
    DiffusionConfig,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from train import TrainConfig, ddpm_step, latest_checkpoint, train_loop
from unet import PRESETS, AttentionBlock, UNet, UNetConfig

REPO = Path(__file__).resolve().parent


# ---------------------------------------------------------------- shared helpers


def require(module: str):
    """Import a test-only oracle, or fail with the install command."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise ImportError(
            f"{module} is a test-only oracle: pip install -r requirements-test.txt"
        ) from error


def data_folder() -> Path:
    """Return $DDPM_DATA. Skip when it is unset, and fail when it names no folder."""
    value = os.environ.get("DDPM_DATA")
    if not value:
        pytest.skip("DDPM_DATA is not set; set it to the data folder to run real-image tests")
    root = Path(value)
    assert root.is_dir(), f"DDPM_DATA={value} is not a folder"
    return root


@pytest.fixture
def data_root() -> Path:
    return data_folder()


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Keep every cache of a test in its tmp folder, and never reach a real download URL."""
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DDPM_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    monkeypatch.setattr(metrics, "INCEPTION_URL", "http://127.0.0.1:9/unreachable.pth")


def point_mass_oracle(diffusion: Diffusion, x_star: torch.Tensor):
    """The exact eps-prediction for data that is always x_star."""

    def model(x_t, t):
        alpha_bar = diffusion.alpha_bar[t].float().view(-1, 1, 1, 1)
        return (x_t - alpha_bar.sqrt() * x_star) / (1 - alpha_bar).sqrt()

    return model


# --- diffusion.py: schedule, bound terms and sampler steps against diffusers


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
            eps_pred,
            t,
            x_t,
            eta=eta,
            use_clipped_model_output=True,
            generator=torch.Generator().manual_seed(3),
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


# --- unet.py: equivalence with diffusers' UNet2DModel, conversion, export, fetching


# Maximum absolute difference in fp32 between our UNet and UNet2DModel on the same weights.
EQUIVALENCE_TOLERANCE = 1e-4
TINY_MAX_PARAMETERS = 2_000_000


def import_diffusers():
    """Import diffusers, the test-only oracle, or fail with the install command."""
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(
            "diffusers is a test-only oracle: pip install -r requirements-test.txt"
        ) from err
    diffusers.utils.logging.set_verbosity_error()
    return diffusers


def diffusers_unet(config: UNetConfig, seed: int):
    """Build a UNet2DModel for `config` with every parameter drawn at random."""
    diffusers = import_diffusers()
    kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
    model = diffusers.UNet2DModel(**kwargs).eval()
    randomize_weights(model, seed)
    return model


def save_diffusers_dir(model, folder: Path, variance_type: str = "fixed_large") -> Path:
    """Save `model` with save_pretrained and a DDPMScheduler config beside it."""
    diffusers = import_diffusers()
    model.save_pretrained(folder)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type=variance_type,
        clip_sample=True,
    )
    scheduler.save_config(folder)
    return folder


def max_output_difference(reference, ours: UNet, size: int, batch: int = 2) -> float:
    """Return max |reference - ours| on random inputs, t taken from 0, 999, 500, 17 in order."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    t = torch.tensor([0, 999, 500, 17][:batch])
    with torch.no_grad():
        expected = reference(x, t).sample
        actual = ours.eval()(x, t)
    assert expected.abs().mean() > 0.01, "random weights gave a near-zero output"
    return (expected - actual).abs().max().item()


@pytest.fixture(scope="module")
def cifar10_reference(tmp_path_factory):
    """Random-weight CIFAR-10 UNet2DModel, saved as a diffusers directory."""
    model = diffusers_unet(PRESETS["cifar10"], seed=10)
    folder = save_diffusers_dir(model, tmp_path_factory.mktemp("cifar10_diffusers"))
    return model, folder


@pytest.fixture(scope="module")
def celebahq_reference(tmp_path_factory):
    """Random-weight CelebA-HQ UNet2DModel (113.7M parameters), saved in the unet/ layout."""
    model = diffusers_unet(PRESETS["celebahq"], seed=11)
    root = tmp_path_factory.mktemp("celebahq_pipeline")
    save_diffusers_dir(model, root / "unet", variance_type="fixed_small")
    (root / "unet" / "scheduler_config.json").rename(root / "scheduler_config.json")
    return model, root


# --------------------------------------------------------------------------- config


def test_config_json_roundtrip():
    for name, config in PRESETS.items():
        restored = UNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert restored == config, name


def test_config_from_dict_names_unknown_key():
    values = {**PRESETS["tiny"].to_dict(), "attention_resolutions": [16]}
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNetConfig.from_dict(values)


def test_config_diffusers_roundtrip():
    for name, config in PRESETS.items():
        assert UNetConfig.from_diffusers(config.to_diffusers()) == config, name


def test_config_rejects_unsupported_block():
    with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
        replace(
            PRESETS["tiny"], down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
        )


def test_from_diffusers_rejects_fourier_embedding():
    config_json = {**PRESETS["cifar10"].to_diffusers(), "time_embedding_type": "fourier"}
    with pytest.raises(ValueError, match="time_embedding_type"):
        UNetConfig.from_diffusers(config_json)


def test_from_diffusers_rejects_multihead_attention():
    config_json = {**PRESETS["cifar10"].to_diffusers(), "attention_head_dim": 64}
    with pytest.raises(ValueError, match="attention_head_dim=64"):
        UNetConfig.from_diffusers(config_json)


def test_from_diffusers_missing_head_dim_rejected():
    # UNet2DModel's default attention_head_dim is 8, which means multi-head attention.
    config_json = PRESETS["cifar10"].to_diffusers()
    del config_json["attention_head_dim"]
    with pytest.raises(ValueError, match="attention_head_dim=8"):
        UNetConfig.from_diffusers(config_json)


def test_from_diffusers_accepts_head_dim_equal_channels():
    config = replace(PRESETS["tiny"], block_out_channels=(32, 64, 64))
    config_json = {**config.to_diffusers(), "attention_head_dim": 64}
    assert UNetConfig.from_diffusers(config_json) == config


def test_from_diffusers_missing_dropout_is_zero():
    # config.json files without a dropout key, such as google's, get UNet2DModel's default 0.0.
    config_json = PRESETS["cifar10"].to_diffusers()
    del config_json["dropout"]
    assert UNetConfig.from_diffusers(config_json).dropout == 0.0


def test_tiny_preset_within_parameter_bound():
    count = sum(p.numel() for p in UNet(PRESETS["tiny"]).parameters())
    assert count <= TINY_MAX_PARAMETERS


def test_scheduler_rejects_cosine_schedule():
    with pytest.raises(ValueError, match="beta_schedule"):
        unet.diffusion_config_from_scheduler({"beta_schedule": "squaredcos_cap_v2"})


def test_scheduler_maps_ddpm_settings():
    config = unet.diffusion_config_from_scheduler(
        {"num_train_timesteps": 1000, "variance_type": "fixed_large", "clip_sample": True}
    )
    assert config == DiffusionConfig(T=1000, variance_type="fixed_large", clip_sample=True)


# --------------------------------------------------------------------------- equivalence


def test_forward_scalar_timestep_broadcasts():
    model = UNet(PRESETS["tiny"]).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x, torch.full((3,), 250))
        actual = model(x, torch.tensor(250))
    assert torch.equal(actual, expected)


def test_forward_rejects_indivisible_size():
    model = UNet(PRESETS["tiny"])
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 30, 30), torch.tensor([1]))


@pytest.mark.slow
def test_cifar10_conversion_matches_diffusers(cifar10_reference, tmp_path):
    reference, folder = cifar10_reference
    unet.convert(folder, tmp_path / "cifar10.safetensors")
    ours, diffusion_config = load_model(tmp_path / "cifar10.safetensors")

    assert ours.config == PRESETS["cifar10"]
    assert diffusion_config.variance_type == "fixed_large"
    assert max_output_difference(reference, ours, size=32) < EQUIVALENCE_TOLERANCE


@pytest.mark.slow
def test_celebahq_conversion_matches_diffusers(celebahq_reference, tmp_path):
    reference, root = celebahq_reference
    unet.convert(root, tmp_path / "celebahq.safetensors")
    ours, diffusion_config = load_model(tmp_path / "celebahq.safetensors")

    assert ours.config == PRESETS["celebahq"]
    assert diffusion_config.variance_type == "fixed_small"
    assert max_output_difference(reference, ours, size=64, batch=1) < EQUIVALENCE_TOLERANCE


@pytest.mark.slow
def test_bin_with_legacy_names_converts(cifar10_reference, tmp_path):
    reference, folder = cifar10_reference
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in reference.state_dict().items():
        for new, old in legacy.items():
            key = key.replace(f".{new}.", f".{old}.")
        state[key] = value
    assert "mid_block.attentions.0.proj_attn.weight" in state
    torch.save(state, tmp_path / "weights.bin")

    dst = tmp_path / "converted.safetensors"
    unet.main(
        [
            "convert",
            str(tmp_path / "weights.bin"),
            str(dst),
            "--config",
            str(folder / "config.json"),
            "--scheduler-config",
            str(folder / "scheduler_config.json"),
        ]
    )
    ours, _ = load_model(dst)
    assert max_output_difference(reference, ours, size=32) < EQUIVALENCE_TOLERANCE


@pytest.mark.slow
def test_export_loads_in_diffusers(cifar10_reference, tmp_path):
    diffusers = import_diffusers()
    reference, folder = cifar10_reference
    unet.convert(folder, tmp_path / "model.safetensors")
    unet.main(["export", str(tmp_path / "model.safetensors"), str(tmp_path / "exported")])
    ours, _ = load_model(tmp_path / "model.safetensors")

    reloaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "exported").eval()
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "exported")
    assert max_output_difference(reloaded, ours, size=32) < EQUIVALENCE_TOLERANCE
    assert scheduler.config.variance_type == "fixed_large"
    assert scheduler.config.beta_schedule == "linear"


def test_export_picks_requested_weights(tmp_path):
    diffusers = import_diffusers()
    model, ema = UNet(PRESETS["tiny"]), UNet(PRESETS["tiny"])
    randomize_weights(model, seed=1)
    randomize_weights(ema, seed=2)
    save_model(tmp_path / "trained.safetensors", model, DiffusionConfig(), ema=ema)

    for weights, expected in (("ema", ema), ("model", model)):
        out_dir = tmp_path / weights
        unet.export(tmp_path / "trained.safetensors", out_dir, weights=weights)
        reloaded = diffusers.UNet2DModel.from_pretrained(out_dir).eval()
        assert max_output_difference(reloaded, expected, size=32) < EQUIVALENCE_TOLERANCE, weights


def test_export_refuses_to_overwrite(tmp_path):
    model = UNet(PRESETS["tiny"])
    save_model(tmp_path / "model.safetensors", model, DiffusionConfig())
    unet.export(tmp_path / "model.safetensors", tmp_path / "out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        unet.export(tmp_path / "model.safetensors", tmp_path / "out")


# --------------------------------------------------------------------------- conversion errors


def test_conversion_mismatch_names_keys(tmp_path):
    reference = diffusers_unet(PRESETS["tiny"], seed=3)
    folder = save_diffusers_dir(reference, tmp_path / "tiny")
    state = dict(reference.state_dict())
    del state["conv_in.bias"]
    state["mid_block.extra.weight"] = torch.zeros(3)
    state["conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))

    with pytest.raises(ValueError) as error:
        unet.convert(folder, tmp_path / "out.safetensors")
    message = str(error.value)
    assert "missing keys (1): conv_in.bias" in message
    assert "unexpected keys (1): mid_block.extra.weight" in message
    assert "misshapen keys (1): conv_out.weight (3, 32, 1, 1) (expected (3, 32, 3, 3))" in message
    assert not (tmp_path / "out.safetensors").exists()


def test_conversion_requires_scheduler_config(tmp_path):
    reference = diffusers_unet(PRESETS["tiny"], seed=4)
    reference.save_pretrained(tmp_path / "tiny")
    with pytest.raises(FileNotFoundError, match="--scheduler-config"):
        unet.convert(tmp_path / "tiny", tmp_path / "out.safetensors")


def test_conversion_refuses_to_overwrite(tmp_path):
    (tmp_path / "out.safetensors").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        unet.convert(tmp_path / "missing", tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep me"


def test_safetensors_check_rejects_truncation(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(100)}, str(path))
    unet.check_safetensors_file(path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="download again"):
        unet.check_safetensors_file(path)


# --------------------------------------------------------------------------- fetching


@pytest.fixture
def without_proxy(monkeypatch):
    """Unset proxy variables so that urllib connects to 127.0.0.1 directly."""
    for name in (
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def hub_server(tmp_path, monkeypatch, without_proxy):
    """Serve tmp_path/hub on 127.0.0.1 as the hub endpoint and yield that directory."""
    root = tmp_path / "hub"
    root.mkdir()

    class HubHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            pass

        def send_header(self, keyword, value):
            # "<file>.content-length" overrides the header, to simulate a dropped connection.
            override = Path(self.translate_path(self.path) + ".content-length")
            if keyword == "Content-Length" and override.is_file():
                value = override.read_text()
            super().send_header(keyword, value)

    handler = functools.partial(HubHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_fetch_over_loopback_converts_once(hub_server, tmp_path):
    reference = diffusers_unet(PRESETS["tiny"], seed=5)
    save_diffusers_dir(reference, hub_server / "google/ddpm-cifar10-32/resolve/main")

    path = unet.pretrained_path("cifar10", cache_dir=tmp_path / "cache")
    ours, diffusion_config = load_model(path)
    assert path == tmp_path / "cache" / "google--ddpm-cifar10-32.safetensors"
    assert diffusion_config.variance_type == "fixed_large"
    assert max_output_difference(reference, ours, size=32) < EQUIVALENCE_TOLERANCE

    # The cached file is returned without contacting the server.
    mtime = path.stat().st_mtime_ns
    (hub_server / "google").rename(hub_server / "gone")
    assert unet.pretrained_path("cifar10", cache_dir=tmp_path / "cache") == path
    assert path.stat().st_mtime_ns == mtime


def test_fetch_falls_back_to_subfolders(hub_server, tmp_path):
    reference = diffusers_unet(replace(PRESETS["tiny"], sample_size=64), seed=6)
    served = hub_server / "google/ddpm-celebahq-256/resolve/main"
    save_diffusers_dir(reference, served / "unet", variance_type="fixed_small")
    (served / "scheduler").mkdir()
    (served / "unet/scheduler_config.json").rename(served / "scheduler/scheduler_config.json")

    path = unet.pretrained_path("celebahq", cache_dir=tmp_path / "cache")
    ours, diffusion_config = load_model(path)
    assert diffusion_config.variance_type == "fixed_small"
    assert max_output_difference(reference, ours, size=32) < EQUIVALENCE_TOLERANCE


def test_fetch_uses_env_cache_dir(hub_server, tmp_path, monkeypatch):
    save_diffusers_dir(
        diffusers_unet(PRESETS["tiny"], seed=7), hub_server / "google/ddpm-cifar10-32/resolve/main"
    )
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "env_cache"))
    path = unet.pretrained_path("cifar10")
    assert path == tmp_path / "env_cache" / "google--ddpm-cifar10-32.safetensors"


def test_fetch_rejects_corrupt_weights(hub_server, tmp_path):
    served = hub_server / "google/ddpm-cifar10-32/resolve/main"
    save_diffusers_dir(diffusers_unet(PRESETS["tiny"], seed=8), served)
    weights = served / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    folder = tmp_path / "cache" / "downloads" / "google--ddpm-cifar10-32"

    with pytest.raises(ValueError, match="not a complete safetensors file"):
        unet.pretrained_path("cifar10", cache_dir=tmp_path / "cache")
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    assert not (tmp_path / "cache" / "google--ddpm-cifar10-32.safetensors").exists()


def test_fetch_rejects_short_download(hub_server, tmp_path):
    served = hub_server / "google/ddpm-cifar10-32/resolve/main"
    save_diffusers_dir(diffusers_unet(PRESETS["tiny"], seed=9), served)
    weights = served / "diffusion_pytorch_model.safetensors"
    Path(f"{weights}.content-length").write_text(str(weights.stat().st_size + 100))
    folder = tmp_path / "cache" / "downloads" / "google--ddpm-cifar10-32"

    with pytest.raises(OSError, match="stopped at"):
        unet.pretrained_path("cifar10", cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]


def test_cli_error_exits_with_message(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        unet.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out.safetensors")])
    assert "error:" in str(exit_info.value.code)
    assert "not found" in str(exit_info.value.code)


def test_fetch_offline_names_files_and_flags(tmp_path, monkeypatch, without_proxy):
    # A port that was just free refuses connections, like a machine without network.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")

    with pytest.raises(ConnectionError) as error:
        unet.pretrained_path("cifar10", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "config.json" in message
    assert "diffusion_pytorch_model.safetensors" in message
    assert "scheduler_config.json" in message
    assert str(tmp_path / "cache" / "downloads" / "google--ddpm-cifar10-32") in message
    assert "python unet.py convert SRC DST" in message
    assert "--teacher PATH" in message
    assert "--base PATH" in message


def test_offline_switch_blocks_fetch(hub_server, tmp_path, monkeypatch):
    served = hub_server / "google/ddpm-cifar10-32/resolve/main"
    save_diffusers_dir(diffusers_unet(PRESETS["tiny"], seed=9), served)
    monkeypatch.setenv("DDPM_OFFLINE", "1")

    with pytest.raises(ConnectionError, match="DDPM_OFFLINE=1"):
        unet.pretrained_path("cifar10", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "google--ddpm-cifar10-32.safetensors").exists()


def test_fetch_rejects_unknown_dataset():
    with pytest.raises(ValueError, match="mnist"):
        unet.pretrained_path("mnist")


# --- data.py: safe pickle loading, real-data counts, splits and batches


# ---------------------------------------------------------------------------- fixtures


class RunsShellCommand:
    """Pickles to a call of os.system, which runs when the pickle is loaded."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_batch(path: Path, content, protocol: int = 2) -> Path:
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=protocol)
    return path


def valid_batch(count: int = 4) -> dict:
    rng = np.random.default_rng(0)
    return {
        b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
        b"labels": [i % 10 for i in range(count)],
    }


def link_celebahq(source: Path, target: Path, attribute_file: str) -> Path:
    """Build a CelebA-HQ folder that shares the real images but has only one attribute file."""
    target.mkdir()
    (target / "images").symlink_to(source / "images")
    (target / attribute_file).symlink_to(source / attribute_file)
    return target


# ---------------------------------------------------------------------------- safe pickles


def test_unpickler_rejects_code_running_pickle(tmp_path):
    marker = tmp_path / "marker"
    path = write_batch(tmp_path / "data_batch_1", RunsShellCommand(f"touch {marker}"))
    with pytest.raises(ValueError) as error:
        data.load_pickle(path)
    assert str(path) in str(error.value)
    assert "rejected" in str(error.value)
    assert "system" in str(error.value)
    assert not marker.exists()


def test_code_running_pickle_is_live(tmp_path):
    # The payload of the rejection test does run under the standard unpickler.
    marker = tmp_path / "marker"
    payload = pickle.dumps(RunsShellCommand(f"touch {marker}"), protocol=2)
    pickle.loads(payload)
    assert marker.exists()


def test_cifar_loader_rejects_code_pickle(tmp_path):
    marker = tmp_path / "marker"
    write_batch(tmp_path / "test_batch", {b"data": RunsShellCommand(f"touch {marker}")})
    with pytest.raises(ValueError, match="test_batch"):
        data.load_cifar10(tmp_path, "test")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_unpickler_reads_numpy_batches(tmp_path, protocol):
    batch = valid_batch()
    path = write_batch(tmp_path / "test_batch", batch, protocol)
    content = data.load_pickle(path)
    assert np.array_equal(content["data"], batch[b"data"])
    assert content["labels"] == batch[b"labels"]


def test_truncated_pickle_names_file(tmp_path):
    path = write_batch(tmp_path / "test_batch", valid_batch())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="invalid pickle") as error:
        data.load_pickle(path)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------------------- CIFAR-10 checks


@pytest.mark.parametrize(
    "content, message",
    [
        ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, "uint8"),
        ({b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4}, r"\(N, 3072\)"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "4 integers"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, "outside 0 to 9"),
        ({b"labels": [0] * 4}, "'data' and 'labels'"),
        ([1, 2, 3], "'data' and 'labels'"),
    ],
)
def test_cifar_batch_validation_errors(tmp_path, content, message):
    path = write_batch(tmp_path / "test_batch", content)
    with pytest.raises(ValueError, match=message) as error:
        data.read_cifar10_batch(path)
    assert str(path) in str(error.value)
    assert "official python version" in str(error.value)


def test_cifar_pixel_layout_is_planar(tmp_path):
    batch = valid_batch(2)
    write_batch(tmp_path / "test_batch", batch)
    images, labels, _ = data.load_cifar10(tmp_path, "test")
    pixels = batch[b"data"][1]
    assert images.shape == (2, 3, 32, 32)
    assert images[1, 0, 0, 1] == pixels[1]
    assert images[1, 1, 0, 0] == pixels[1024]
    assert images[1, 2, 1, 0] == pixels[2048 + 32]
    assert labels.tolist() == [0, 1]


def test_cifar_missing_batches_error(tmp_path):
    write_batch(tmp_path / "test_batch", valid_batch())
    with pytest.raises(FileNotFoundError, match="data_batch_1 to data_batch_5"):
        data.load_cifar10(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 python batches"):
        data.load_cifar10(tmp_path / "elsewhere", "test")


def test_cifar_offline_error_names_data(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data, "CIFAR10", offline)
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        data.load_cifar10(None, "train")
    assert "--data" in str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in str(error.value)


# ---------------------------------------------------------------------------- real data


def test_cifar_real_train_and_test(data_root):
    train, train_labels, class_names = data.load_cifar10(data_root, "train")
    test, test_labels, _ = data.load_cifar10(data_root, "test")
    assert class_names == list(data.CIFAR10_CLASSES)
    assert train.shape == (10_000, 3, 32, 32)
    assert train.dtype == torch.uint8
    assert test.shape == (1_000, 3, 32, 32)
    assert len(train_labels) == 10_000
    assert len(test_labels) == 1_000


def test_cifar_real_airplane_counts(data_root):
    _, train_masks = data.load_dataset("cifar10", data_root, "train")
    _, test_masks = data.load_dataset("cifar10", data_root, "test")
    assert int(data.forget_mask(train_masks, "airplane").sum()) == 1_000
    assert int(data.forget_mask(test_masks, "airplane").sum()) == 103


def test_cifar_real_split_sizes(data_root):
    images, masks = data.load_dataset("cifar10", data_root, "test")
    keep, forget = data.split_keep_forget(images, masks, data.DEFAULT_FORGET["cifar10"])
    assert len(forget) == 103
    assert len(keep) == 897


def test_cifar_unknown_class_lists_names(data_root):
    _, masks = data.load_dataset("cifar10", data_root, "test")
    with pytest.raises(ValueError, match="unknown class or attribute 'plane'") as error:
        data.forget_mask(masks, "plane")
    for name in data.CIFAR10_CLASSES:
        assert name in str(error.value)


def test_celebahq_csv_smiling_count(data_root, tmp_path):
    folder = link_celebahq(data_root / "celebahq256", tmp_path / "csv", data.CELEBAHQ_CSV_FILE)
    paths = data.list_celebahq_images(folder)
    _, names, table = data.read_celebahq_attributes(folder)
    test, attributes = data.load_celebahq(folder, size=16, split="test")
    assert names == ["Smiling"]
    assert len(paths) == 2_000
    assert sum(table[path.name][0] for path in paths) == 1_000
    assert test.shape == (200, 3, 16, 16)
    assert list(attributes) == ["Smiling"]
    assert attributes["Smiling"].tolist() == [table[p.name][0] for p in paths[1_800:]]


def test_celebahq_anno_matches_csv(data_root, tmp_path):
    source = data_root / "celebahq256"
    csv_folder = link_celebahq(source, tmp_path / "csv", data.CELEBAHQ_CSV_FILE)
    anno_folder = link_celebahq(source, tmp_path / "anno", data.CELEBAHQ_ANNO_FILE)
    images = data.list_celebahq_images(csv_folder)
    _, _, csv_table = data.read_celebahq_attributes(csv_folder)
    _, names, anno_table = data.read_celebahq_attributes(anno_folder)
    smiling = names.index("Smiling")
    csv_smiling = [csv_table[path.name][0] for path in images]
    anno_smiling = [anno_table[path.name][smiling] for path in images]
    assert len(names) == 40
    assert len(anno_table) == 30_000
    assert sum(anno_smiling) == 1_000
    assert anno_smiling == csv_smiling


def test_celebahq_real_test_split(data_root):
    folder = data_root / "celebahq256"
    paths = data.list_celebahq_images(folder)
    _, names, table = data.read_celebahq_attributes(folder)
    test, attributes = data.load_dataset("celebahq", data_root, "test", size=32)
    held_out = paths[1_800:]
    smiling = names.index("Smiling")
    assert len(paths) == 2_000
    assert data.split_celebahq_paths(paths, "train") == paths[:1_800]
    assert data.split_celebahq_paths(paths, "test") == held_out
    assert test.shape == (200, 3, 32, 32)
    assert len(attributes) == 40
    assert attributes["Smiling"].tolist() == [table[p.name][smiling] for p in held_out]


def test_celebahq_unknown_attribute_lists_names(data_root, tmp_path):
    masks = {"Smiling": torch.tensor([True, False])}
    with pytest.raises(ValueError, match="valid names: Smiling"):
        data.forget_mask(masks, "Happy")
    _, names, _ = data.read_celebahq_attributes(data_root / "celebahq256")
    anno_masks = {name: torch.tensor([True, False]) for name in names}
    with pytest.raises(ValueError) as error:
        data.forget_mask(anno_masks, "Happy")
    assert "Eyeglasses" in str(error.value)
    assert "Wearing_Hat" in str(error.value)


# ---------------------------------------------------------------------------- CelebA-HQ files


def write_image_folder(folder: Path, sizes: list[tuple[int, int]], mode: str = "RGB") -> Path:
    """Write images 0.png, 1.png, ... and an attributes.csv with alternating smiling values."""
    (folder / "images").mkdir(parents=True)
    rows = ["image,smiling"]
    for i, (width, height) in enumerate(sizes):
        Image.new(mode, (width, height), color=200 if mode == "L" else None).save(
            folder / "images" / f"{i}.png"
        )
        rows.append(f"{i}.png,{i % 2}")
    (folder / "attributes.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_celebahq_mixed_sizes_rejected(tmp_path):
    folder = write_image_folder(tmp_path, [(8, 8), (8, 8), (6, 6)])
    with pytest.raises(ValueError, match=r"2.png: image is 6x6, but 0.png is 8x8"):
        data.load_celebahq(folder)


def test_celebahq_resize_to_size(tmp_path):
    folder = write_image_folder(tmp_path, [(8, 8), (6, 6)])
    images, _ = data.load_celebahq(folder, size=4)
    assert images.shape == (2, 3, 4, 4)


def test_celebahq_non_square_rejected(tmp_path):
    folder = write_image_folder(tmp_path, [(8, 6)])
    with pytest.raises(ValueError, match="not square|square"):
        data.load_celebahq(folder, size=4)


def test_celebahq_grayscale_becomes_rgb(tmp_path):
    folder = write_image_folder(tmp_path, [(4, 4)], mode="L")
    images, _ = data.load_celebahq(folder)
    assert images.shape == (1, 3, 4, 4)
    assert bool((images == 200).all())


def test_celebahq_missing_row_names_image(tmp_path):
    folder = write_image_folder(tmp_path, [(4, 4), (4, 4)])
    (folder / "attributes.csv").write_text("image,smiling\n0.png,1\n")
    with pytest.raises(ValueError, match=r"1.png: no row in .*attributes.csv"):
        data.load_celebahq(folder)


def test_celebahq_bad_anno_row_named(tmp_path):
    path = tmp_path / data.CELEBAHQ_ANNO_FILE
    path.write_text("2\nSmiling Male\n0.jpg  1 -1\n1.jpg  1 0\n")
    with pytest.raises(ValueError, match="line 4"):
        data.read_anno_file(path)


def test_celebahq_without_root_rejected():
    with pytest.raises(ValueError, match="--data"):
        data.load_dataset("celebahq", None, "train")


# ---------------------------------------------------------------------------- keep and forget


def test_empty_forget_set_rejected():
    masks = {"airplane": torch.zeros(5, dtype=torch.bool), "cat": torch.ones(5, dtype=torch.bool)}
    with pytest.raises(ValueError, match="'airplane' is empty: 0 of 5"):
        data.forget_mask(masks, "airplane")
    with pytest.raises(ValueError, match="keep set is empty: all 5"):
        data.forget_mask(masks, "cat")


def test_forget_name_case_insensitive():
    masks = {"Smiling": torch.tensor([True, False, True])}
    assert data.forget_mask(masks, "smiling").tolist() == [True, False, True]


# ---------------------------------------------------------------------------- batches


def random_images(count: int, size: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def test_model_range_endpoints():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    x = data.to_model_range(images)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0
    assert x.max().item() == 1.0


def test_batches_in_model_range():
    iterator = data.BatchIterator(random_images(10), batch_size=4, seed=0)
    for _ in range(6):
        batch = next(iterator)
        assert batch.shape == (4, 3, 4, 4)
        assert batch.min().item() >= -1.0
        assert batch.max().item() <= 1.0


def test_flips_deterministic_with_seed():
    images = random_images(64)
    first = next(data.BatchIterator(images, batch_size=64, seed=3))
    second = next(data.BatchIterator(images, batch_size=64, seed=3))
    other = next(data.BatchIterator(images, batch_size=64, seed=4))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_flips_mirror_some_images():
    images = random_images(64)
    iterator = data.BatchIterator(images, batch_size=64, seed=3)
    batch = next(iterator)
    source = data.to_model_range(images[iterator.order])
    flipped = [torch.equal(b, s.flip(-1)) for b, s in zip(batch, source, strict=True)]
    unchanged = [torch.equal(b, s) for b, s in zip(batch, source, strict=True)]
    assert 16 < sum(flipped) < 48
    assert sum(flipped) + sum(unchanged) == 64


def test_no_flip_keeps_images():
    images = random_images(8)
    iterator = data.BatchIterator(images, batch_size=8, seed=3, flip=False)
    batch = next(iterator)
    assert torch.equal(batch, data.to_model_range(images[iterator.order]))


def test_epoch_visits_every_image_once():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    iterator = data.BatchIterator(images, batch_size=3, seed=0, flip=False)
    seen = [int(round((x[0, 0, 0].item() + 1) * 127.5)) for _ in range(3) for x in next(iterator)]
    assert len(set(seen)) == 9
    next(iterator)
    assert iterator.epoch == 1


def test_iterator_resume_matches_uninterrupted():
    images = random_images(10)
    uninterrupted = data.BatchIterator(images, batch_size=4, seed=7)
    expected = [next(uninterrupted) for _ in range(9)]

    interrupted = data.BatchIterator(images, batch_size=4, seed=7)
    for _ in range(4):
        next(interrupted)
    state = interrupted.state_dict()
    resumed = data.BatchIterator(images, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    for step in range(4, 9):
        assert torch.equal(next(resumed), expected[step]), f"batch {step} differs after resume"


def test_iterator_resume_rejects_other_data():
    state = data.BatchIterator(random_images(10), batch_size=4).state_dict()
    other = data.BatchIterator(random_images(12), batch_size=4)
    with pytest.raises(ValueError, match="num_images 10"):
        other.load_state_dict(state)


def test_batch_larger_than_images_rejected():
    with pytest.raises(ValueError, match="only 3 images for a batch size of 4"):
        data.BatchIterator(random_images(3), batch_size=4)


@pytest.mark.parametrize(
    "value, message", [(float("nan"), "non-finite"), (float("inf"), "non-finite"), (2.0, "outside")]
)
def test_float_images_checked(value, message):
    images = torch.zeros(4, 3, 2, 2)
    images[1, 2, 0, 1] = value
    with pytest.raises(ValueError, match=message):
        data.BatchIterator(images, batch_size=2)


def test_float_images_pass_through():
    images = torch.linspace(-1, 1, 4 * 3 * 2 * 2).view(4, 3, 2, 2)
    batch = next(data.BatchIterator(images, batch_size=4, flip=False))
    assert torch.equal(batch.sort(dim=0).values, images.sort(dim=0).values)


# --- train.py: exact resume, crash-safe checkpoints, divergence and two processes


def small_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    config = UNetConfig.from_dict({**PRESETS["tiny"].to_dict(), "sample_size": 16, "dropout": 0.0})
    return UNet(config)


def training_images(count: int = 24, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def run_training(out_dir, steps, resume=False, checkpoint_steps=(), batch_size=4):
    model = small_unet()
    diffusion = Diffusion(DiffusionConfig())
    batches = BatchIterator(training_images(), batch_size, seed=3)
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=1e-3,
        warmup=2,
        log_every=2,
        save_every=2,
        checkpoint_steps=checkpoint_steps,
        seed=5,
        ema_decay=0.99,
    )
    return train_loop(model, diffusion, batches, config, out_dir, {"script": "test"}, resume=resume)


@pytest.mark.slow
def test_resume_gives_identical_weights(tmp_path):
    straight, straight_ema = run_training(tmp_path / "straight", steps=6)
    run_training(tmp_path / "split", steps=4)
    resumed, resumed_ema = run_training(tmp_path / "split", steps=6, resume=True)
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    for (name, a), b in zip(
        straight_ema.state_dict().items(), resumed_ema.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_rolling_checkpoints_keep_requested_steps(tmp_path):
    run_training(tmp_path, steps=6, checkpoint_steps=(2,))
    names = sorted(p.name for p in tmp_path.glob("ckpt_*.safetensors"))
    assert "ckpt_0000002.safetensors" in names
    assert "ckpt_0000004.safetensors" not in names
    assert "ckpt_0000006.safetensors" in names
    assert latest_checkpoint(tmp_path).name == "ckpt_0000006.safetensors"


def test_resume_without_checkpoint_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_training(tmp_path, steps=2, resume=True)


@pytest.mark.slow
def test_divergence_stops_and_keeps_checkpoint(tmp_path):
    run_training(tmp_path, steps=2)
    before = (tmp_path / "ckpt_0000002.safetensors").read_bytes()

    def exploding_step(model, x_0, t, eps):
        return model(x_0, t).sum() * float("nan")

    model = small_unet()
    diffusion = Diffusion()
    config = TrainConfig(steps=4, batch_size=4, lr=1e-3, save_every=1)
    batches = BatchIterator(training_images(), 4)
    with pytest.raises(FloatingPointError, match="diverged at step 1: loss nan"):
        train_loop(model, diffusion, batches, config, tmp_path, {}, step_fn=exploding_step)
    assert (tmp_path / "ckpt_0000002.safetensors").read_bytes() == before


KILL_DURING_SAVE = textwrap.dedent(
    """
    import sys, time
    import safetensors.torch
    import checkpoint
    from diffusion import DiffusionConfig
    from unet import PRESETS, UNet

    real_save = safetensors.torch.save_file

    def slow_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        print("writing", flush=True)
        time.sleep(60)

    checkpoint.save_file = slow_save
    checkpoint.save_model(sys.argv[1], UNet(PRESETS["tiny"]), DiffusionConfig())
    """
)


def test_kill_during_save_keeps_previous(tmp_path):
    path = tmp_path / "ckpt_0000001.safetensors"
    model = small_unet(seed=1)
    save_model(path, model, DiffusionConfig())

    process = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SAVE, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    loaded, _ = load_model(path, weights="model")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_worker(rank, world, port, out_dir):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    run_training(out_dir, steps=4, batch_size=8)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    torch.set_num_threads(1)
    single, _ = run_training(tmp_path / "single", steps=4, batch_size=8)
    start = time.time()
    mp.spawn(distributed_worker, args=(2, free_port(), tmp_path / "ddp"), nprocs=2, join=True)
    assert time.time() - start < 300
    ddp, _ = load_model(tmp_path / "ddp" / "ckpt_0000004.safetensors", weights="model")
    for (name, a), b in zip(single.state_dict().items(), ddp.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), (name, (a - b).abs().max())


# --- corruptions.py: proxy formulas, the training protocol and CIFAR-10-C tables


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def textured_images(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Return smooth gradients plus noise in [0, 1], with a different mean in each channel."""
    coords = torch.linspace(0, 1, size)
    gradient = coords[None, :] * coords[:, None]
    noise = torch.rand(batch, 3, size, size, generator=generator(seed))
    channel_offset = torch.tensor([0.1, 0.4, 0.7]).view(1, 3, 1, 1)
    return (0.3 * gradient + 0.3 * noise + channel_offset).clamp(0, 1)


def extreme_images(size: int = 32) -> torch.Tensor:
    """Return black, white, random and half-black/half-white images in [0, 1]."""
    black = torch.zeros(1, 3, size, size)
    white = torch.ones(1, 3, size, size)
    random = torch.rand(1, 3, size, size, generator=generator(7))
    split = torch.zeros(1, 3, size, size)
    split[..., size // 2 :] = 1
    return torch.cat([black, white, random, split])


# ---------------------------------------------------------------- proxy operators


def test_proxy_noise_matches_eq_12():
    x = textured_images()
    out = corruptions.apply_corruption(x, "gaussian_noise", 3, generator(1), "proxy")
    eps = torch.randn(x.shape, generator=generator(1))
    expected = (x + 0.18 * eps).clamp(0, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_proxy_blur_matches_eq_13():
    x = textured_images(batch=2, size=24)
    out = corruptions.apply_corruption(x, "defocus_blur", 3, generator(), "proxy")

    # Direct 2D sum of eq. 13 over offsets up to ceil(3 * 3) = 9, normalized, with reflect borders.
    offsets = np.arange(-9, 10)
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 3.0**2))
    kernel /= kernel.sum()
    image = x[1, 2].double().numpy()
    padded = np.pad(image, 9, mode="reflect")
    for row, col in [(0, 0), (5, 17), (23, 23), (12, 0)]:
        window = padded[row : row + 19, col : col + 19]
        assert out[1, 2, row, col].item() == pytest.approx((window * kernel).sum(), abs=1e-6)


def test_proxy_blur_matches_scipy_mirror():
    x = textured_images(batch=2, size=24)
    out = corruptions.apply_corruption(x, "defocus_blur", 3, generator(), "proxy")
    expected = scipy.ndimage.gaussian_filter(
        x.double().numpy(), sigma=(0, 0, 3.0, 3.0), mode="mirror", truncate=3.0
    )
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_proxy_blur_kernel_radius_is_nine():
    x = torch.zeros(1, 3, 41, 41)
    x[:, :, 20, 20] = 1
    out = corruptions.apply_corruption(x, "defocus_blur", 3, generator(), "proxy")
    row = out[0, 0, 20]
    assert row[20 - 9].item() > 0
    assert row[20 + 9].item() > 0
    assert row[20 - 10].item() == 0
    assert row[20 + 10].item() == 0
    assert out.sum().item() == pytest.approx(3.0, abs=1e-5)


def test_proxy_blur_rejects_tiny_images():
    with pytest.raises(ValueError, match="too small"):
        corruptions.apply_corruption(
            torch.rand(1, 3, 8, 8), "defocus_blur", 3, generator(), "proxy"
        )


def test_proxy_fog_matches_eq_14():
    x = textured_images()
    out = corruptions.apply_corruption(x, "fog", 3, generator(), "proxy")
    torch.testing.assert_close(out, (x + 0.3).clamp(0, 1), rtol=0, atol=0)


def test_proxy_jpeg_matches_eq_15():
    x = textured_images()
    out = corruptions.apply_corruption(x, "jpeg_compression", 3, generator(), "proxy")

    # One mean per image over every pixel and channel.
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, (0.2 * (x - mu) + mu).clamp(0, 1), rtol=0, atol=1e-7)

    # The channels have different means here, so a per-channel mean would give other values.
    channel_mu = x.mean(dim=(2, 3), keepdim=True)
    per_channel = (0.2 * (x - channel_mu) + channel_mu).clamp(0, 1)
    assert (out - per_channel).abs().max().item() > 0.05


@pytest.mark.parametrize("name", ["gaussian_noise", "defocus_blur", "fog", "jpeg_compression"])
def test_proxy_outputs_stay_in_unit_range(name):
    out = corruptions.apply_corruption(extreme_images(), name, 3, generator(), "proxy")
    assert out.min().item() >= 0
    assert out.max().item() <= 1
    assert out.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("severity", [1, 2, 4, 5])
def test_proxy_rejects_other_severities(severity):
    with pytest.raises(ValueError, match=f"severity {severity} is invalid"):
        corruptions.apply_corruption(textured_images(), "fog", severity, generator(), "proxy")


# ---------------------------------------------------------------- training protocol


def test_protocol_frequencies_match_paper():
    draws = 10_000
    x = torch.rand(draws, 3, 12, 12, generator=generator(3))
    _, names = corruptions.corrupt_randomly(x, generator(4), family="proxy")
    assert len(names) == draws

    # Clean with probability 0.2, and each of the four corruptions with 0.8 / 4 = 0.2.
    tolerance = 4 * math.sqrt(draws * 0.2 * 0.8)
    for name in (corruptions.CLEAN, *corruptions.PROTOCOL_CORRUPTIONS):
        count = names.count(name)
        assert abs(count - 0.2 * draws) < tolerance, f"{name}: {count} of {draws}"


def test_protocol_choices_match_outputs():
    x = textured_images(batch=64, size=16)
    out, names = corruptions.corrupt_randomly(x, generator(5), family="proxy")
    assert set(names) == {corruptions.CLEAN, *corruptions.PROTOCOL_CORRUPTIONS}

    # Every deterministic proxy reproduces its image exactly, and noise leaves a random residual.
    for i, name in enumerate(names):
        image = x[i : i + 1]
        if name == corruptions.CLEAN:
            expected = image
        elif name == "gaussian_noise":
            assert (out[i] - x[i]).abs().max().item() > 0.1, f"image {i} has no noise"
            continue
        else:
            expected = corruptions.apply_corruption(image, name, 3, generator(), "proxy")
        torch.testing.assert_close(out[i : i + 1], expected, rtol=0, atol=1e-6)


def test_protocol_same_seed_reproduces():
    x = textured_images(batch=16)
    first, first_names = corruptions.corrupt_randomly(x, generator(11))
    second, second_names = corruptions.corrupt_randomly(x, generator(11))
    assert first_names == second_names
    assert torch.equal(first, second)


def test_protocol_other_seed_differs():
    x = textured_images(batch=16)
    first, first_names = corruptions.corrupt_randomly(x, generator(11))
    second, second_names = corruptions.corrupt_randomly(x, generator(12))
    assert first_names != second_names
    assert not torch.equal(first, second)


def test_model_range_wrapper_maps_eq_16_17():
    x_unit = textured_images(batch=32, size=16)
    x_model = 2 * x_unit - 1
    out, names = corruptions.corrupt_model_range(x_model, generator(6))
    reference, reference_names = corruptions.corrupt_randomly(x_unit, generator(6))
    assert names == reference_names
    torch.testing.assert_close(out, 2 * reference - 1, rtol=0, atol=1e-6)
    assert out.min().item() >= -1
    assert out.max().item() <= 1

    fog = names.index("fog")
    expected_fog = 2 * ((x_model[fog] + 1) / 2 + 0.3).clamp(0, 1) - 1
    torch.testing.assert_close(out[fog], expected_fog, rtol=0, atol=1e-6)


def test_model_range_wrapper_rejects_unit_overflow():
    with pytest.raises(ValueError, match="outside"):
        corruptions.corrupt_model_range(torch.full((1, 3, 16, 16), 1.5), generator())


def test_protocol_runs_cifar10c_family():
    x = textured_images(batch=32)
    out, names = corruptions.corrupt_randomly(x, generator(8), family="cifar10c")
    fog = names.index("fog")
    assert not torch.equal(out[fog], (x[fog] + 0.3).clamp(0, 1))
    assert out.min().item() >= 0
    assert out.max().item() <= 1


# ---------------------------------------------------------------- CIFAR-10-C operators


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_cifar10c_noise_std_per_severity(severity):
    grey = torch.full((8, 3, 64, 64), 0.5)
    out = corruptions.apply_corruption(grey, "gaussian_noise", severity, generator(severity))
    measured = (out - grey).std().item()
    expected = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    assert measured == pytest.approx(expected, rel=0.02)


def pillow_round_trip(x: torch.Tensor, quality: int) -> torch.Tensor:
    pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def test_cifar10c_jpeg_uses_quality_58():
    x = textured_images()
    out = corruptions.apply_corruption(x, "jpeg_compression", 3, generator())
    assert torch.equal(out, pillow_round_trip(x, 58))
    assert not torch.equal(out, pillow_round_trip(x, 65))
    assert not torch.equal(out, pillow_round_trip(x, 50))


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_cifar10c_blur_sigma_per_severity(severity):
    impulse = torch.zeros(1, 3, 21, 21)
    impulse[:, :, 10, 10] = 1
    out = corruptions.apply_corruption(impulse, "gaussian_blur", severity, generator())

    # For a sampled Gaussian, response(1) / response(0) = exp(-1 / (2 sigma^2)).
    ratio = (out[0, 0, 10, 11] / out[0, 0, 10, 10]).item()
    measured_sigma = math.sqrt(-1 / (2 * math.log(ratio)))
    expected = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1]
    assert measured_sigma == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_cifar10c_blur_matches_scipy_nearest(severity):
    # skimage.filters.gaussian, which make_cifar_c.py calls, is gaussian_filter with these options.
    x = textured_images(batch=2)
    out = corruptions.apply_corruption(x, "gaussian_blur", severity, generator())
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1]
    expected = scipy.ndimage.gaussian_filter(
        x.double().numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0
    )
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_defocus_kernel_severity_1_is_alias_gaussian():
    # Radius 0.3 keeps only the centre pixel, so the kernel is the 3x3 alias Gaussian (sigma 0.4).
    kernel = corruptions.defocus_kernel(0.3, 0.4)
    taps = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 0.4**2))
    taps /= taps.sum()
    np.testing.assert_allclose(kernel.numpy(), np.outer(taps, taps), atol=1e-12)


@pytest.mark.parametrize("radius,alias_sigma", corruptions.CIFAR10C_DEFOCUS)
def test_defocus_kernel_sums_to_one(radius, alias_sigma):
    kernel = corruptions.defocus_kernel(radius, alias_sigma)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert kernel.shape[0] == kernel.shape[1]
    assert kernel.shape[0] == 2 * math.floor(radius) + 3


def test_defocus_blur_flat_image_unchanged():
    flat = torch.full((2, 3, 32, 32), 0.37)
    out = corruptions.apply_corruption(flat, "defocus_blur", 5, generator())
    torch.testing.assert_close(out, flat, rtol=0, atol=1e-6)


def test_fog_works_at_256():
    x = textured_images(batch=2, size=256)
    out = corruptions.apply_corruption(x, "fog", 3, generator(2))
    assert out.shape == (2, 3, 256, 256)
    assert out.min().item() >= 0
    assert out.max().item() <= 1
    assert (out - x).abs().mean().item() > 0.01

    # Without the clip, out = (x + 0.75 * haze) * m / (m + 0.75), with m the image maximum.
    # The haze varies across the image, unlike a global brightness shift.
    scale = x.amax(dim=(1, 2, 3), keepdim=True) / (x.amax(dim=(1, 2, 3), keepdim=True) + 0.75)
    haze = (out - x * scale) / (0.75 * scale)
    assert haze.std(dim=(2, 3)).min().item() > 0.05


def test_fog_same_seed_reproduces():
    x = textured_images(batch=2)
    first = corruptions.apply_corruption(x, "fog", 4, generator(9))
    second = corruptions.apply_corruption(x, "fog", 4, generator(9))
    third = corruptions.apply_corruption(x, "fog", 4, generator(10))
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_plasma_fractal_spans_unit_range():
    height_map = corruptions.plasma_fractal(3, 64, 2.5, generator())
    assert height_map.shape == (3, 64, 64)
    assert height_map.amin(dim=(1, 2)).tolist() == [0.0, 0.0, 0.0]
    assert height_map.amax(dim=(1, 2)).tolist() == [1.0, 1.0, 1.0]


def test_plasma_fractal_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        corruptions.plasma_fractal(1, 48, 2.5, generator())


def test_fog_non_square_image():
    out = corruptions.apply_corruption(torch.rand(1, 3, 20, 40), "fog", 1, generator())
    assert out.shape == (1, 3, 20, 40)


def test_hsv_matches_colorsys():
    x = torch.rand(1, 3, 8, 8, generator=generator(13))
    x[0, :, 0, 0] = 0.5  # grey
    x[0, :, 0, 1] = 0.0  # black
    x[0, :, 0, 2] = torch.tensor([0.9, 0.9, 0.1])  # red and green tie for the maximum
    hsv = corruptions.rgb_to_hsv(x)
    for row in range(8):
        for col in range(8):
            expected = colorsys.rgb_to_hsv(*x[0, :, row, col].tolist())
            np.testing.assert_allclose(hsv[0, :, row, col].numpy(), expected, atol=1e-6)


def test_hsv_round_trip():
    x = torch.rand(2, 3, 16, 16, generator=generator(14))
    back = corruptions.hsv_to_rgb(corruptions.rgb_to_hsv(x))
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6)


def test_brightness_shifts_hsv_value():
    x = torch.tensor([0.6, 0.3, 0.2]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone()
    x[0, :, 0, 0] = 0.0  # black becomes grey at the shift
    x[0, :, 0, 1] = torch.tensor([0.95, 0.5, 0.1])  # the value clips at 1
    out = corruptions.apply_corruption(x, "brightness", 3, generator())

    expected = colorsys.hsv_to_rgb(*colorsys.rgb_to_hsv(0.6, 0.3, 0.2)[:2], 0.6 + 0.15)
    np.testing.assert_allclose(out[0, :, 2, 2].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), [0.15, 0.15, 0.15], atol=1e-6)
    assert out[0, :, 0, 1].max().item() == pytest.approx(1.0)


def test_contrast_uses_channel_means():
    x = textured_images()
    out = corruptions.apply_corruption(x, "contrast", 3, generator())
    means = x.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(out, ((x - means) * 0.4 + means).clamp(0, 1), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", list(corruptions.FAMILIES["cifar10c"].operators))
def test_cifar10c_outputs_stay_in_unit_range(name):
    for severity in corruptions.CIFAR10C_SEVERITIES:
        out = corruptions.apply_corruption(extreme_images(), name, severity, generator())
        assert out.min().item() >= 0, f"severity {severity}"
        assert out.max().item() <= 1, f"severity {severity}"


@pytest.mark.parametrize("name", list(corruptions.FAMILIES["cifar10c"].operators))
def test_cifar10c_same_seed_reproduces(name):
    x = textured_images(batch=2)
    first = corruptions.apply_corruption(x, name, 3, generator(21))
    second = corruptions.apply_corruption(x, name, 3, generator(21))
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["gaussian_noise", "fog"])
def test_cifar10c_other_seed_differs(name):
    x = textured_images(batch=2)
    first = corruptions.apply_corruption(x, name, 3, generator(21))
    second = corruptions.apply_corruption(x, name, 3, generator(22))
    assert not torch.equal(first, second)


def test_global_rng_is_untouched():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    corruptions.corrupt_randomly(textured_images(batch=16), generator(1), family="cifar10c")
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- input checks


def test_apply_rejects_unknown_names():
    x = textured_images()
    with pytest.raises(ValueError, match="'snow' is not in the cifar10c family"):
        corruptions.apply_corruption(x, "snow", 3, generator())
    with pytest.raises(ValueError, match="family 'imagenet' is unknown"):
        corruptions.apply_corruption(x, "fog", 3, generator(), "imagenet")
    with pytest.raises(ValueError, match="severity 6 is invalid"):
        corruptions.apply_corruption(x, "fog", 6, generator())


def test_apply_rejects_model_range_images():
    with pytest.raises(ValueError, match="corrupt_model_range"):
        corruptions.apply_corruption(2 * textured_images() - 1, "fog", 3, generator())


# ---------------------------------------------------------------- grid


def test_grid_has_row_per_severity(tmp_path):
    images = textured_images(batch=3)
    path = corruptions.save_corruption_grid(images, tmp_path / "grid.png", generator())
    with Image.open(path) as grid:
        width, height = grid.size
    rows = 1 + 7 * 5  # clean, then 7 corruptions x 5 severities
    assert height == rows * (96 + 2)
    assert width == 130 + 3 * (96 + 2)


def test_grid_proxy_family_one_severity(tmp_path):
    images = textured_images(batch=2, size=256)
    path = corruptions.save_corruption_grid(
        images, tmp_path / "proxy.png", generator(), family="proxy"
    )
    with Image.open(path) as grid:
        assert grid.size == (130 + 2 * 258, 5 * 258)


@pytest.mark.slow
def test_grid_cli_on_real_images(tmp_path):
    out = tmp_path / "grid.png"
    command = [sys.executable, "corruptions.py", "grid", "--data", str(data_folder())]
    command += ["--out", str(out), "--num-images", "4", "--seed", "3"]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=Path(__file__).parent, timeout=120
    )
    assert result.returncode == 0, result.stderr
    with Image.open(out) as grid:
        assert grid.size == (130 + 4 * 98, 36 * 98)


def test_cifar10c_jpeg_real_images():
    images, _ = load_dataset("cifar10", data_folder(), split="test")
    x = images[:8].float() / 255
    out = corruptions.apply_corruption(x, "jpeg_compression", 3, generator())
    assert torch.equal(out, pillow_round_trip(x, 58))
    assert not torch.equal(out, pillow_round_trip(x, 65))


# --- metrics.py: Inception against pytorch-fid, FID, IS, statistics files, sampling


def pytorch_fid_networks(state: dict[str, torch.Tensor]):
    """Build pytorch-fid's InceptionV3 (pool3) and its full FID Inception from `state`.

    pytorch-fid fetches its weights with load_state_dict_from_url and loads them strictly, so
    replacing that function loads `state` instead and checks its names against pytorch-fid's.
    """
    inception_module = require("pytorch_fid.inception")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *a, **k: state)
        pool3_network = inception_module.InceptionV3([3]).eval()
        full_network = inception_module.fid_inception_v3().eval()
    return pool3_network, full_network


@pytest.fixture(scope="module")
def networks():
    state = random_inception_state(seed=0)
    ours = metrics.FIDInceptionV3()
    ours.load_state_dict(state)
    pool3_network, full_network = pytorch_fid_networks(state)
    return ours.eval(), pool3_network, full_network, state


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Return the norm of the difference over the norm of `expected`, both taken in fp32."""
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def gaussian_features(count, mean, std, seed):
    rng = np.random.default_rng(seed)
    return mean + std * rng.standard_normal((count, len(mean)))


def random_covariance(dims: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    factor = rng.standard_normal((dims, 2 * dims))
    return factor @ factor.T / (2 * dims)


# ---------------------------------------------------------------- Inception network


def test_inception_names_equal_pytorch_fid(networks):
    ours, _, full_network, _ = networks
    their_names = set(full_network.state_dict())
    our_names = set(ours.state_dict())
    assert our_names == their_names
    assert ours.state_dict()["fc.weight"].shape == (1008, 2048)
    assert ours.state_dict()["fc.bias"].shape == (1008,)


@pytest.mark.parametrize("size", [32, 256])
def test_inception_matches_pytorch_fid(networks, size):
    ours, pool3_network, full_network, _ = networks
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        features, logits = ours(images)
        expected_features = pool3_network(images)[0].flatten(1)
        # torchvision's classifier head with its bias taken out again.
        expected_logits = full_network.fc(expected_features) - full_network.fc.bias
    assert features.shape == (2, 2048)
    assert logits.shape == (2, 1008)
    assert expected_features.abs().mean() > 0.01  # random weights keep features at order 1
    assert relative_error(features, expected_features) < 1e-4
    assert relative_error(logits, expected_logits) < 1e-4


def test_inception_state_errors_name_tensors(networks, tmp_path):
    *_, state = networks
    missing = {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.conv.weight"}
    with pytest.raises(ValueError, match="1 missing tensors.*Mixed_7c.branch_pool.conv.weight"):
        metrics.check_inception_state(missing, tmp_path / "w.pth")

    unexpected = {**state, "AuxLogits.fc.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="1 unexpected tensors.*AuxLogits.fc.weight"):
        metrics.check_inception_state(unexpected, tmp_path / "w.pth")

    misshapen = {**state, "fc.weight": torch.zeros(1000, 2048)}
    with pytest.raises(ValueError, match=r"wrong shape.*fc.weight \(1000, 2048\)"):
        metrics.check_inception_state(misshapen, tmp_path / "w.pth")


def test_pth_converts_to_cached_safetensors(networks, tmp_path, capsys):
    ours, *_, state = networks
    pth = tmp_path / "random_inception.pth"
    torch.save(state, pth)
    sha256 = hashlib.sha256(pth.read_bytes()).hexdigest()

    network, weights_sha256 = metrics.load_inception(pth)
    converted = metrics.converted_path(sha256)
    assert weights_sha256 == sha256
    assert converted.is_file()
    assert "not comparable with published numbers" in capsys.readouterr().err

    # The converted file loads by itself, records the .pth's hash and gives the same network.
    reloaded, reloaded_sha256 = metrics.load_inception(converted)
    assert reloaded_sha256 == sha256
    for name, tensor in ours.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(reloaded.state_dict()[name], tensor), name
            assert torch.equal(network.state_dict()[name], tensor), name


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def loopback_server(tmp_path):
    """Serve tmp_path/served over HTTP on 127.0.0.1 and return the base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_keeps_only_matching_hash(loopback_server, tmp_path):
    url, served = loopback_server
    payload = os.urandom(3 << 20)
    (served / "weights.pth").write_bytes(payload)
    sha256 = hashlib.sha256(payload).hexdigest()

    destination = tmp_path / "downloads" / "weights.pth"
    metrics.download_inception_weights(f"{url}/weights.pth", destination, sha256)
    assert destination.read_bytes() == payload

    rejected = tmp_path / "downloads" / "rejected.pth"
    with pytest.raises(ValueError, match="sha256"):
        metrics.download_inception_weights(f"{url}/weights.pth", rejected, "0" * 64)
    assert not rejected.exists()
    assert sorted(p.name for p in rejected.parent.iterdir()) == ["weights.pth"]


def test_official_weights_rejected_on_hash_mismatch(loopback_server):
    url, served = loopback_server
    (served / "pt_inception.pth").write_bytes(b"not the published weights")
    with pytest.raises(ValueError, match=metrics.INCEPTION_SHA256):
        metrics.resolve_inception_weights(url=f"{url}/pt_inception.pth")
    assert not any(metrics.inception_cache_dir().glob("*.pth"))


def test_offline_error_names_file_and_flag():
    with pytest.raises(metrics.InceptionWeightsNotFound) as error:
        metrics.resolve_inception_weights(url="http://127.0.0.1:9/pt_inception.pth")
    message = str(error.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message
    assert str(metrics.inception_cache_dir()) in message
    assert "--inception PATH" in message


def test_local_official_file_checked_by_hash():
    local = metrics.inception_cache_dir() / metrics.INCEPTION_FILENAMES[0]
    local.parent.mkdir(parents=True)
    local.write_bytes(b"truncated download")
    with pytest.raises(ValueError, match="damaged"):
        metrics.resolve_inception_weights()


# ---------------------------------------------------------------- FID


def test_fid_of_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    var1, var2 = rng.uniform(0.5, 2, 16), rng.uniform(0.5, 2, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    fid = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert fid == pytest.approx(expected, rel=1e-10)


def test_fid_of_shifted_gaussian_is_shift():
    cov = random_covariance(32, seed=1)
    mu = np.zeros(32)
    shift = np.full(32, 0.25)
    fid = metrics.frechet_distance(mu, cov, mu + shift, cov)
    assert fid == pytest.approx(32 * 0.25**2, rel=1e-8)


def test_fid_of_sampled_features_near_closed_form():
    mean1, mean2 = np.zeros(8), np.full(8, 0.5)
    std1, std2 = np.ones(8), np.full(8, 2.0)
    mu1, cov1 = metrics.fid_statistics(gaussian_features(100_000, mean1, std1, seed=0))
    mu2, cov2 = metrics.fid_statistics(gaussian_features(100_000, mean2, std2, seed=1))
    expected = 8 * 0.5**2 + 8 * (1.0 - 2.0) ** 2
    assert metrics.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=0.02)


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
def test_fid_equals_pytorch_fid_full_rank():
    fid_score = require("pytorch_fid.fid_score")
    mu1, cov1 = metrics.fid_statistics(gaussian_features(500, np.zeros(64), np.ones(64), 0))
    mu2, cov2 = metrics.fid_statistics(gaussian_features(500, np.full(64, 0.1), 1.3, 1))
    ours = metrics.frechet_distance(mu1, cov1, mu2, cov2)
    theirs = fid_score.calculate_frechet_distance(mu1, cov1, mu2, cov2)
    assert abs(ours - theirs) < 1e-6


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
def test_fid_equals_pytorch_fid_singular(capsys):
    fid_score = require("pytorch_fid.fid_score")
    mu1, cov1 = metrics.fid_statistics(gaussian_features(30, np.zeros(64), np.ones(64), 0))
    mu2, cov2 = metrics.fid_statistics(gaussian_features(30, np.full(64, 0.1), 1.3, 1))
    ours = metrics.frechet_distance(mu1, cov1, mu2, cov2)
    theirs = fid_score.calculate_frechet_distance(mu1, cov1, mu2, cov2)
    assert np.isfinite(ours)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_fid_few_samples_finite_with_warning(capsys):
    features1 = gaussian_features(16, np.zeros(64), np.ones(64), seed=0)
    features2 = gaussian_features(16, np.ones(64), np.ones(64), seed=1)
    mu1, cov1 = metrics.fid_statistics(features1)
    mu2, cov2 = metrics.fid_statistics(features2)
    fid = metrics.frechet_distance(mu1, cov1, mu2, cov2)
    assert np.isfinite(fid)
    assert fid > 0
    assert "fewer than the 64 feature dimensions" in capsys.readouterr().err


def test_fid_rejects_invalid_covariance():
    cov = random_covariance(8, seed=0)
    not_psd = cov - 2 * np.eye(8)
    with pytest.raises(ValueError, match="negative eigenvalue"):
        metrics.frechet_distance(np.zeros(8), not_psd, np.zeros(8), cov)
    with pytest.raises(ValueError, match="do not match"):
        metrics.frechet_distance(np.zeros(8), cov, np.zeros(7), cov[:7, :7])


# ---------------------------------------------------------------- Inception Score


def independent_inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """Inception Score written with torch and explicit loops, for comparison."""
    logits = torch.from_numpy(logits).double()
    count = len(logits)
    scores = []
    for i in range(splits):
        part = logits[i * count // splits : (i + 1) * count // splits]
        p_yx = torch.softmax(part, dim=1)
        p_y = p_yx.mean(dim=0)
        kl_terms = [torch.sum(row * (row.log() - p_y.log())) for row in p_yx]
        scores.append(torch.exp(torch.stack(kl_terms).mean()).item())
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_independent_computation():
    logits = np.random.default_rng(0).standard_normal((205, 1008)) * 3
    mean, std = metrics.inception_score(logits)
    expected_mean, expected_std = independent_inception_score(logits, splits=10)
    assert mean == pytest.approx(expected_mean, rel=1e-10)
    assert std == pytest.approx(expected_std, rel=1e-8)


def test_inception_score_of_confident_classes():
    # Each split contains 5 confident predictions, one per class: IS = 5 exactly in the limit.
    labels = np.tile(np.arange(5), 10)
    logits = np.full((50, 1008), -50.0)
    logits[np.arange(50), labels] = 50.0
    mean, std = metrics.inception_score(logits)
    assert mean == pytest.approx(5.0, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_rejects_too_few_images():
    with pytest.raises(ValueError, match="at least 10 images"):
        metrics.inception_score(np.zeros((9, 1008)))


# ---------------------------------------------------------------- statistics files


def test_stats_file_loads_in_pytorch_fid(tmp_path):
    fid_score = require("pytorch_fid.fid_score")
    mu, cov = np.arange(4.0), random_covariance(4, seed=0)
    path = tmp_path / "stats.npz"
    metrics.save_statistics(path, mu, cov, {"n_images": 123, "weights_sha256": "ab" * 32})
    their_mu, their_sigma = fid_score.compute_statistics_of_path(str(path), None, 1, 4, "cpu")
    assert np.array_equal(their_mu, mu)
    assert np.array_equal(their_sigma, cov)

    _, _, record = metrics.load_statistics(path)
    assert record == {"n_images": 123, "weights_sha256": "ab" * 32}


def test_pytorch_fid_stats_file_loads_here(tmp_path):
    mu, cov = np.arange(4.0), random_covariance(4, seed=0)
    path = tmp_path / "pytorch_fid_stats.npz"
    np.savez_compressed(path, mu=mu, sigma=cov)  # the format of pytorch-fid's --save-stats
    loaded_mu, loaded_cov, record = metrics.load_statistics(path)
    assert np.array_equal(loaded_mu, mu)
    assert np.array_equal(loaded_cov, cov)
    assert record == {}


def test_fid_command_on_two_stats_files(tmp_path, capsys):
    cov = random_covariance(8, seed=0)
    metrics.save_statistics(tmp_path / "a.npz", np.zeros(8), cov, {"n_images": 10})
    metrics.save_statistics(tmp_path / "b.npz", np.full(8, 0.5), cov, {"n_images": 20})
    metrics.main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
    output = capsys.readouterr().out
    assert float(re.search(r"FID (\S+)", output).group(1)) == pytest.approx(8 * 0.25, rel=1e-5)
    assert "images 10 and 20" in output


# ---------------------------------------------------------------- sample generation


class TinyEpsModel(torch.nn.Module):
    """A small random convolution standing in for the UNet: eps_pred = conv(x_t) * t / T."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, std=0.1, generator=torch.Generator().manual_seed(0))

    def forward(self, x_t, t):
        return self.conv(x_t) * (t.float().view(-1, 1, 1, 1) / 1000)


class CountingModel(torch.nn.Module):
    """Count the network calls of `inner` and raise KeyboardInterrupt after `fail_after` calls."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.fail_after = None

    def forward(self, x_t, t):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        return self.inner(x_t, t)


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(PRESETS["tiny"]).eval()


SAMPLE_SETTINGS = dict(n_samples=10, image_size=8, steps=4, sampler="ancestral", seed=3)


def read_shards(sample_dir: Path) -> torch.Tensor:
    return torch.cat(list(metrics.sample_shard_batches(sample_dir)))


@pytest.mark.slow
def test_killed_sampling_resumes_identically(tmp_path):
    diffusion = Diffusion(DiffusionConfig())
    model = CountingModel(tiny_unet())
    settings = {**SAMPLE_SETTINGS, "n_samples": 5, "image_size": 32, "steps": 2}
    metrics.generate_samples(model, diffusion, tmp_path / "full", batch_size=2, **settings)
    expected = read_shards(tmp_path / "full")

    # Kill in the middle of the second shard: 2 sampler steps per shard.
    model.calls, model.fail_after = 0, 3
    with pytest.raises(KeyboardInterrupt):
        metrics.generate_samples(model, diffusion, tmp_path / "killed", batch_size=2, **settings)
    saved = sorted(p.name for p in (tmp_path / "killed").glob("shard_*.npz"))
    assert saved == ["shard_000000.npz"]

    # The resumed run makes only the two missing shards.
    model.calls, model.fail_after = 0, None
    metrics.generate_samples(model, diffusion, tmp_path / "killed", batch_size=2, **settings)
    assert model.calls == 2 * 2
    resumed = read_shards(tmp_path / "killed")
    assert resumed.shape == (5, 3, 32, 32)
    assert torch.equal(resumed, expected)


def test_deleted_shard_is_made_again(tmp_path):
    diffusion = Diffusion(DiffusionConfig())
    model = CountingModel(TinyEpsModel())
    sample_dir = tmp_path / "samples"
    metrics.generate_samples(model, diffusion, sample_dir, batch_size=4, **SAMPLE_SETTINGS)
    expected = read_shards(sample_dir)

    metrics.shard_path(sample_dir, 2).unlink()
    with pytest.raises(FileNotFoundError, match="lacks 1 of 3 shards"):
        read_shards(sample_dir)
    model.calls = 0
    metrics.generate_samples(model, diffusion, sample_dir, batch_size=4, **SAMPLE_SETTINGS)
    assert model.calls == 4
    assert torch.equal(read_shards(sample_dir), expected)


def test_shards_independent_of_worker_split(tmp_path):
    diffusion = Diffusion(DiffusionConfig())
    model = TinyEpsModel()
    metrics.generate_samples(model, diffusion, tmp_path / "one", batch_size=4, **SAMPLE_SETTINGS)
    for worker in [(1, 2), (0, 2)]:
        metrics.generate_samples(
            model, diffusion, tmp_path / "two", batch_size=4, worker=worker, **SAMPLE_SETTINGS
        )
    assert torch.equal(read_shards(tmp_path / "two"), read_shards(tmp_path / "one"))


def test_sampling_settings_mismatch_rejected(tmp_path):
    diffusion = Diffusion(DiffusionConfig())
    model = TinyEpsModel()
    metrics.generate_samples(model, diffusion, tmp_path, batch_size=4, **SAMPLE_SETTINGS)
    with pytest.raises(ValueError, match="seed=3.*seed=4"):
        metrics.generate_samples(
            model, diffusion, tmp_path, batch_size=4, **{**SAMPLE_SETTINGS, "seed": 4}
        )
    other_model = TinyEpsModel()
    with torch.no_grad():
        other_model.conv.weight.add_(0.01)
    with pytest.raises(ValueError, match="model_sha256"):
        metrics.generate_samples(other_model, diffusion, tmp_path, batch_size=4, **SAMPLE_SETTINGS)


def test_nearby_seeds_share_no_shard_noise():
    seeds = {metrics.shard_seed(seed, shard) for seed in range(20) for shard in range(50)}
    assert len(seeds) == 20 * 50


# ---------------------------------------------------------------- evaluation protocol


def write_cifar_batch(folder: Path, images: np.ndarray) -> None:
    """Write uint8 images (N, 3, 32, 32) as a CIFAR-10 python training batch."""
    folder.mkdir(parents=True)
    content = {b"data": images.reshape(len(images), -1), b"labels": [0] * len(images)}
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump(content, f, protocol=2)


def test_evaluate_without_weights_reports_reason(tmp_path):
    diffusion = Diffusion(DiffusionConfig())
    result = metrics.evaluate(
        TinyEpsModel(),
        diffusion,
        dataset="cifar10",
        data_root=tmp_path / "unused",
        steps=2,
        sampler="ddim",
        n_samples=4,
        seed=0,
        out_dir=tmp_path / "eval",
        batch_size=4,
    )
    assert result["fid"] is None
    assert result["is_mean"] is None
    assert "--inception PATH" in result["not_computed"]
    assert result["sampler"] == "ddim"
    assert result["steps"] == 2
    assert len(read_shards(tmp_path / "eval" / "samples")) == 4
    assert metrics.format_protocol(result).startswith("FID and IS not computed")


@pytest.mark.slow
def test_evaluate_reports_scores_and_protocol(networks, tmp_path):
    *_, state = networks
    weights = tmp_path / "random_inception.pth"
    torch.save(state, weights)
    rng = np.random.default_rng(0)
    write_cifar_batch(tmp_path / "cifar", rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8))

    result = metrics.evaluate(
        TinyEpsModel(),
        Diffusion(DiffusionConfig()),
        dataset="cifar10",
        data_root=tmp_path / "cifar",
        steps=2,
        sampler="ddim",
        n_samples=10,
        seed=0,
        out_dir=tmp_path / "eval",
        inception=weights,
        batch_size=5,
    )
    assert np.isfinite(result["fid"])
    assert result["fid"] > 0
    assert result["is_mean"] >= 1.0
    assert result["reference"] == {"dataset": "cifar10", "split": "train", "n_images": 12}
    assert result["inception_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert result["n_samples"] == 10
    line = metrics.format_protocol(result)
    assert "10 samples, ddim 2 steps, seed 0" in line
    assert "vs 12 cifar10 train images" in line

    # The reference statistics are cached, and the stats command writes the cached values.
    cached = list(
        (metrics.cache_dir() / "fid_stats").glob("cifar10-32px-train-12-bilinear299-*.npz")
    )
    assert len(cached) == 1
    out = tmp_path / "reference.npz"
    command = ["stats", "--dataset", "cifar10", "--data", str(tmp_path / "cifar")]
    metrics.main(command + ["--out", str(out), "--inception", str(weights), "--device", "cpu"])
    mu, cov, record = metrics.load_statistics(out)
    cached_mu, cached_cov, _ = metrics.load_statistics(cached[0])
    assert np.array_equal(mu, cached_mu)
    assert np.array_equal(cov, cached_cov)
    assert record["n_images"] == 12
    assert record["weights_sha256"] == result["inception_sha256"]


# ---------------------------------------------------------------- real images


def write_pngs(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")


@pytest.mark.slow
def test_fid_command_matches_pytorch_fid_on_cifar(networks, tmp_path):
    """Compare `python metrics.py fid` with pytorch-fid's pipeline on real CIFAR-10 PNGs.

    pytorch-fid reads the folders and computes the statistics with its own network, loaded
    with the same random weights. Its statistics go through our frechet_distance, because its
    scipy.linalg.sqrtm takes minutes at 2048 dimensions on two cores. The FID tests above check
    frechet_distance against pytorch-fid's calculate_frechet_distance.
    """
    fid_score = require("pytorch_fid.fid_score")
    images, _ = load_dataset("cifar10", data_folder(), split="test")
    write_pngs(images[:12], tmp_path / "a")
    write_pngs(images[12:24], tmp_path / "b")
    *_, state = networks
    weights = tmp_path / "random_inception.pth"
    torch.save(state, weights)

    command = [sys.executable, str(REPO / "metrics.py"), "fid", str(tmp_path / "a")]
    command += [str(tmp_path / "b"), "--inception", str(weights), "--device", "cpu"]
    command += ["--batch-size", "6"]
    output = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=os.environ)
    assert output.returncode == 0, output.stderr
    ours = float(re.search(r"FID (\S+)", output.stdout).group(1))

    pool3_network, _ = pytorch_fid_networks(state)
    statistics = [
        fid_score.compute_statistics_of_path(str(tmp_path / name), pool3_network, 6, 2048, "cpu", 0)
        for name in ("a", "b")
    ]
    expected = metrics.frechet_distance(*statistics[0], *statistics[1])
    assert expected > 0
    assert ours == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------- command line


@pytest.fixture
def tiny_checkpoint(tmp_path) -> tuple[Path, DiffusionConfig]:
    """Save a random tiny UNet with a 20-step schedule, which keeps the NLL cheap."""
    config = DiffusionConfig(T=20, beta_start=1e-3, beta_end=0.2)
    path = tmp_path / "tiny.safetensors"
    save_model(path, tiny_unet(), config)
    return path, config


@pytest.mark.slow
def test_sample_then_is_commands(networks, tiny_checkpoint, tmp_path, capsys):
    checkpoint, _ = tiny_checkpoint
    *_, state = networks
    weights = tmp_path / "random_inception.pth"
    torch.save(state, weights)

    sample = ["sample", "--checkpoint", str(checkpoint), "--dataset", "cifar10"]
    sample += ["--out-dir", str(tmp_path / "run"), "--fid-samples", "10", "--steps", "2"]
    sample += ["--batch-size", "5", "--device", "cpu"]
    metrics.main(sample)
    sample_dir = tmp_path / "run" / "samples"
    assert len(read_shards(sample_dir)) == 10
    assert (tmp_path / "run" / "config.json").is_file()

    metrics.main(["is", str(sample_dir), "--inception", str(weights), "--device", "cpu"])
    output = capsys.readouterr().out
    assert re.search(r"IS \S+ ± \S+ \| 10 splits \| 10 samples in ", output)


def test_nll_command_reports_bits_and_nats(tiny_checkpoint, capsys):
    checkpoint, config = tiny_checkpoint
    root = data_folder()
    command = ["nll", "--checkpoint", str(checkpoint), "--dataset", "cifar10"]
    command += ["--data", str(root), "--n-images", "2", "--batch-size", "2", "--device", "cpu"]
    metrics.main(command)
    output = capsys.readouterr().out
    pattern = r"\| (\S+) ± (\S+) bits/dim \| (\S+) ± (\S+) nats/image \| 2 images"
    match = re.search(pattern, output)
    assert match, output

    # The same numbers from nll_statistics, and nats = bits/dim * 3072 * ln 2.
    images, _ = load_dataset("cifar10", root, split="test")
    model = tiny_unet()
    expected = metrics.nll_statistics(model, Diffusion(config), images[:2], batch_size=2, seed=0)
    assert float(match.group(1)) == pytest.approx(expected["bpd_mean"], abs=1e-4)
    assert float(match.group(3).replace(",", "")) == pytest.approx(expected["nats_mean"], abs=0.1)
    assert expected["nats_mean"] == pytest.approx(expected["bpd_mean"] * 3072 * math.log(2))


# --- distill.py: teacher-student alignment and a two-stage run on real images


@pytest.mark.parametrize("teacher_steps", [1000, 500])
def test_teacher_targets_align_with_student(teacher_steps):
    """With an exact denoiser DDIM is exact at any step count, so a student running the same
    network must land on every teacher target; an off-by-one pairing would not."""
    diffusion = Diffusion(DiffusionConfig(clip_sample=False))
    x_star = torch.rand(1, 3, 4, 4) * 1.6 - 0.8
    oracle = point_mass_oracle(diffusion, x_star)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    targets = list(distill.ddim_pair_targets(diffusion, oracle, x_T, teacher_steps, "off"))
    assert len(targets) == teacher_steps // 2

    timesteps = diffusion.timesteps(teacher_steps // 2).tolist()
    x = x_T
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x = diffusion.ddim_step(x, t, t_prev, oracle(x, torch.full((2,), t)))
        assert torch.allclose(x, targets[i], atol=1e-4), (t, (x - targets[i]).abs().max())


@pytest.mark.slow
def test_distill_two_stages_on_real_images(tmp_path):
    root = data_folder()
    torch.manual_seed(0)
    config = UNetConfig.from_dict({**PRESETS["tiny"].to_dict(), "sample_size": 16, "dropout": 0.0})
    teacher = tmp_path / "teacher.safetensors"
    save_model(teacher, UNet(config), DiffusionConfig())

    out = tmp_path / "out"
    results = distill.main(
        [
            "--dataset", "cifar10", "--stage", "2", "--teacher", str(teacher),
            "--data", str(root), "--out", str(out), "--image-size", "16",
            "--batch-size", "2", "--trajectories", "1", "--nll-images", "2",
            "--fid-samples", "0", "--grid-images", "2", "--l1-images", "2",
        ]
    )  # fmt: skip
    assert [r["steps"] for r in results] == [1000, 500, 250]
    assert (out / "stage1.safetensors").is_file()
    assert (out / "stage2.safetensors").is_file()
    assert (out / "samples_stage2_250steps.png").is_file()
    assert "| 2 | 250 |" in (out / "results.md").read_text()
    record = json.loads((out / "results.json").read_text())
    assert record["results"][2]["control_l1"] >= 0
    assert results[0]["l1_to_base_1000"] < 1e-6
    log = (out / "log.jsonl").read_text()
    assert '"event": "train_missing_stage"' in log


# --- robust.py: settings, evaluation helpers and a tiny run on real images


def save_tiny_base(path: Path, size: int = 16, T: int = 5) -> Path:
    """Save a randomly initialized tiny UNet with a T-step schedule as a base model file."""
    torch.manual_seed(0)
    config = UNetConfig.from_dict({**PRESETS["tiny"].to_dict(), "sample_size": size})
    save_model(path, UNet(config), DiffusionConfig(T=T))
    return path


# ---------------------------------------------------------------- settings


def test_paper_settings_cifar10():
    args = robust.parse_args(["--dataset", "cifar10"])
    assert args.checkpoint_steps == (500, 1000, 1500, 2000)
    assert args.lr == 2e-4
    assert args.batch_size == 128
    assert args.dropout == 0.1
    assert args.corruptions == "proxy"
    assert args.severity == 3
    assert args.clean_probability == 0.2


def test_paper_settings_celebahq():
    args = robust.parse_args(["--dataset", "celebahq"])
    assert args.checkpoint_steps == (50, 100, 150, 200)
    assert args.lr == 2e-5
    assert args.batch_size == 64
    assert args.dropout == 0.0


def test_steps_scale_scales_paper_steps():
    cifar = robust.parse_args(["--dataset", "cifar10", "--steps-scale", "0.01"])
    assert cifar.checkpoint_steps == (5, 10, 15, 20)
    celebahq = robust.parse_args(["--dataset", "celebahq", "--steps-scale", "0.1"])
    assert celebahq.checkpoint_steps == (5, 10, 15, 20)


def test_steps_scale_rejects_repeats():
    with pytest.raises(SystemExit):
        robust.parse_args(["--dataset", "cifar10", "--steps-scale", "0.0001"])


def test_checkpoint_steps_explicit():
    args = robust.parse_args(["--checkpoint-steps", "2,4,6,8"])
    assert args.checkpoint_steps == (2, 4, 6, 8)


@pytest.mark.parametrize("text", ["4,2", "0,1", "a,b", ""])
def test_checkpoint_steps_rejects_invalid(text):
    with pytest.raises(SystemExit):
        robust.parse_args(["--checkpoint-steps", text])


def test_proxy_family_rejects_severity_2():
    with pytest.raises(SystemExit):
        robust.parse_args(["--corruptions", "proxy", "--severity", "2"])


def test_cifar10c_family_accepts_severity_5():
    args = robust.parse_args(["--corruptions", "cifar10c", "--severity", "5"])
    assert args.severity == 5


# ---------------------------------------------------------------- evaluation helpers


def test_corrupted_sets_are_uint8_per_corruption():
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    sets = robust.corrupted_sets(images, "proxy", 3, seed=1)
    assert list(sets) == ["clean", "gaussian_noise", "defocus_blur", "fog", "jpeg_compression"]
    assert torch.equal(sets["clean"], images)
    for name, corrupted in sets.items():
        assert corrupted.dtype == torch.uint8, name
        assert corrupted.shape == images.shape, name
    assert not torch.equal(sets["fog"], images)


def test_corrupted_sets_same_seed_reproduces():
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    first = robust.corrupted_sets(images, "cifar10c", 3, seed=1)
    second = robust.corrupted_sets(images, "cifar10c", 3, seed=1)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.slow
def test_denoising_loss_fixed_draws():
    torch.manual_seed(0)
    config = UNetConfig.from_dict({**PRESETS["tiny"].to_dict(), "sample_size": 16})
    model = UNet(config).eval()
    diffusion = Diffusion(DiffusionConfig(T=10))
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)

    first = robust.denoising_loss(model, diffusion, images, batch_size=2, seed=4, draws=2)
    second = robust.denoising_loss(model, diffusion, images, batch_size=2, seed=4, draws=2)
    other = robust.denoising_loss(model, diffusion, images, batch_size=2, seed=5, draws=2)
    assert first == second
    assert first["loss_mean"] != other["loss_mean"]
    assert first["n_images"] == 4
    assert first["draws"] == 2

    # The mean equals L_simple recomputed with the same generator stream.
    generator = torch.Generator().manual_seed(4)
    expected = []
    for batch in images.split(2):
        x_0 = batch.float() / 127.5 - 1
        total = torch.zeros(len(batch), dtype=torch.float64)
        for _ in range(2):
            t = torch.randint(0, 10, (len(batch),), generator=generator)
            eps = torch.randn(x_0.shape, generator=generator)
            with torch.no_grad():
                total += (
                    ((eps - model(diffusion.q_sample(x_0, t, eps), t)) ** 2)
                    .mean(dim=(1, 2, 3))
                    .double()
                )
        expected.append(total / 2)
    assert first["loss_mean"] == pytest.approx(torch.cat(expected).mean().item(), rel=1e-5)


def test_existing_checkpoints_need_resume(tmp_path):
    (tmp_path / "ckpt_0000001.safetensors").write_bytes(b"")
    argv = ["--out", str(tmp_path), "--base", str(tmp_path / "missing.safetensors")]
    with pytest.raises(SystemExit, match="--resume"):
        robust.main(argv)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tiny_run_writes_checkpoints_and_tables(tmp_path, monkeypatch):
    data = data_folder()
    base = save_tiny_base(tmp_path / "base.safetensors")

    # load_inception raises as it would offline, so no download is attempted. FID and IS must
    # then be reported as not computed, after the real sampling path has run.
    def no_inception(*args, **kwargs):
        raise metrics.InceptionWeightsNotFound("no Inception weights in this test")

    monkeypatch.setattr(metrics, "load_inception", no_inception)
    out = tmp_path / "run"
    argv = ["--dataset", "cifar10", "--data", str(data), "--base", str(base)]
    argv += ["--out", str(out), "--checkpoint-steps", "1,2,3,4", "--batch-size", "4"]
    argv += ["--nll-images", "2", "--robust-images", "2", "--loss-draws", "2"]
    argv += ["--fid-samples", "2", "--sample-steps", "5", "--eval-batch-size", "2"]
    argv += ["--grid-images", "2", "--log-every", "2", "--device", "cpu"]
    results = robust.main(argv)

    # Four checkpoints that load, each with its sidecar.
    for step in (1, 2, 3, 4):
        path = out / f"ckpt_{step:07d}.safetensors"
        assert path.is_file(), path
        assert path.with_suffix(".json").is_file(), path
        model, diffusion_config = load_model(path)
        assert diffusion_config.T == 5
    assert model.config.dropout == 0.1

    # Base plus four checkpoints, each with clean and per-corruption numbers.
    assert [r["step"] for r in results] == [0, 1, 2, 3, 4]
    for r in results:
        assert r["nll"]["n_images"] == 2
        assert r["quality"]["fid"] is None
        assert "no Inception weights" in r["quality"]["not_computed"]
        assert list(r["robustness"]) == [
            "clean",
            "gaussian_noise",
            "defocus_blur",
            "fog",
            "jpeg_compression",
        ]
        assert r["robustness"]["clean"]["nll"] == r["nll"]
        for entry in r["robustness"].values():
            assert entry["nll"]["bpd_mean"] > 0
            assert entry["loss"]["loss_mean"] > 0
    assert results[4]["robustness"]["fog"] != results[0]["robustness"]["fog"]

    # The samples for FID were drawn.
    assert (out / "fid_step0000004" / "samples" / "samples.json").is_file()

    # Both tables in markdown and the same numbers in JSON.
    text = (out / "results.md").read_text()
    assert "FID after robustness fine-tuning" in text
    assert "NLL of clean held-out images" in text
    assert "Inception Score" in text
    assert "NLL in bits/dim of corrupted held-out images" in text
    assert "L_simple of corrupted held-out images" in text
    assert "| Dataset | base | 1 | 2 | 3 | 4 |" in text
    assert (
        "| Fine-tuning steps | clean | gaussian_noise | defocus_blur | fog | jpeg_compression |"
        in text
    )
    stored = json.loads((out / "results.json").read_text())
    assert len(stored["results"]) == 5
    assert stored["results"][2]["nll"]["bpd_mean"] == results[2]["nll"]["bpd_mean"]

    # The corruption grid: a clean row and the four proxies at severity 3.
    with Image.open(out / "corruption_grid.png") as grid:
        assert grid.height == 5 * (96 + 2)


# --- unlearn.py: the SISS objective, gradient rescaling and tiny real runs


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def tiny_model() -> UNet:
    torch.manual_seed(0)
    return UNet(PRESETS["tiny"]).eval()


@pytest.fixture
def paired_batch():
    """Keep and forget images in [-1, 1] with shared timesteps and noise."""
    generator = torch.Generator().manual_seed(1)
    x_keep = torch.rand(3, 3, 32, 32, generator=generator) * 2 - 1
    x_forget = torch.rand(3, 3, 32, 32, generator=generator) * 2 - 1
    t = torch.randint(0, 1000, (3,), generator=generator)
    eps = torch.randn(3, 3, 32, 32, generator=generator)
    return x_keep, x_forget, t, eps


@pytest.fixture
def tiny_base(tmp_path) -> Path:
    """Save a random tiny UNet with a 20-step schedule, so that the NLL takes 20 forwards."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_model(path, UNet(PRESETS["tiny"]), DiffusionConfig(T=20))
    return path


def tiny_run_args(data_root: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(data_root),
        "--base",
        str(base),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--save-every",
        "1",
        "--log-every",
        "1",
        "--nll-images",
        "2",
        "--eval-batch-size",
        "2",
        "--grid-images",
        "4",
        "--sample-steps",
        "5",
        *extra,
    ]


# ---------------------------------------------------------------------------- objective


def test_siss_loss_equals_separate_terms(tiny_model, paired_batch):
    x_keep, x_forget, t, eps = paired_batch
    diffusion = Diffusion()
    loss = unlearn.siss_step(diffusion, 0.3)(tiny_model, x_keep, x_forget, t, eps)
    loss_keep = diffusion.training_loss(tiny_model, x_keep, t, eps).mean()
    loss_forget = diffusion.training_loss(tiny_model, x_forget, t, eps).mean()
    assert torch.allclose(loss, loss_keep - 0.3 * loss_forget, rtol=1e-5, atol=1e-7)


def test_siss_terms_share_t_and_eps(tiny_model, paired_batch):
    # With identical keep and forget batches, only shared t and eps give L_keep == L_forget.
    x_keep, _, t, eps = paired_batch
    diffusion = Diffusion()
    loss_keep, loss_forget = unlearn.paired_losses(diffusion, tiny_model, x_keep, x_keep, t, eps)
    assert torch.allclose(loss_keep, loss_forget, rtol=1e-6, atol=0)


def test_lambda_zero_is_ddpm_loss(tiny_model, paired_batch):
    x_keep, x_forget, t, eps = paired_batch
    diffusion = Diffusion()
    loss = unlearn.siss_step(diffusion, 0.0)(tiny_model, x_keep, x_forget, t, eps)
    plain = ddpm_step(diffusion)(tiny_model, x_keep, t, eps)
    assert torch.allclose(loss, plain, rtol=1e-5, atol=1e-7)


def test_forget_gradient_rescaled_to_norm(tiny_model, paired_batch):
    x_keep, x_forget, t, eps = paired_batch
    diffusion = Diffusion()
    parameters = list(tiny_model.parameters())

    # Gradient of the keep term alone, and of the forget term alone.
    diffusion.training_loss(tiny_model, x_keep, t, eps).mean().backward()
    grad_keep = [p.grad.clone() for p in parameters]
    tiny_model.zero_grad(set_to_none=True)
    diffusion.training_loss(tiny_model, x_forget, t, eps).mean().backward()
    grad_forget = [p.grad.clone() for p in parameters]
    tiny_model.zero_grad(set_to_none=True)

    # The rescaled step: g = g_keep - (S / ||g_forget||) g_forget.
    norm = 7.5
    losses = unlearn.split_losses_step(diffusion)(tiny_model, x_keep, x_forget, t, eps)
    logged = unlearn.forget_grad_norm_backward(norm)(tiny_model, losses)
    subtracted = torch.cat(
        [(k - p.grad).flatten() for k, p in zip(grad_keep, parameters, strict=True)]
    )
    forget = torch.cat([g.flatten() for g in grad_forget])
    scale = norm / forget.norm()
    cosine = torch.dot(subtracted, forget) / (subtracted.norm() * forget.norm())
    assert math.isclose(subtracted.norm().item(), norm, rel_tol=1e-4)
    assert cosine.item() > 0.9999
    assert torch.allclose(logged, (losses[0] - scale * losses[1]).detach(), rtol=1e-4)


def test_paired_batches_resume_exactly():
    keep = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    forget = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    uninterrupted = unlearn.PairedBatches(keep, forget, batch_size=2, seed=3)
    expected = [next(uninterrupted) for _ in range(8)]

    interrupted = unlearn.PairedBatches(keep, forget, batch_size=2, seed=3)
    for _ in range(3):
        next(interrupted)
    resumed = unlearn.PairedBatches(keep, forget, batch_size=2, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    for step in range(3, 8):
        keep_batch, forget_batch = next(resumed)
        assert torch.equal(keep_batch, expected[step][0]), f"keep batch {step} differs"
        assert torch.equal(forget_batch, expected[step][1]), f"forget batch {step} differs"


@pytest.mark.parametrize(
    "quality, fid, inception_score",
    [
        (None, "n/a", "n/a"),
        ({"fid": None, "is_mean": None, "is_std": None}, "n/a", "n/a"),
        ({"fid": 12.345, "is_mean": None, "is_std": None}, "12.35", "n/a"),
        ({"fid": 12.345, "is_mean": 3.21, "is_std": 0.05}, "12.35", "3.21 ± 0.05"),
    ],
)
def test_score_cells_handle_missing(quality, fid, inception_score):
    assert metrics.format_fid(quality) == fid
    assert metrics.format_is(quality) == inception_score


# ---------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lambda", "1", "--forget-grad-norm", "5"], "not both"),
        (["--lambdas", "0.1,-1"], "non-negative"),
        (["--forget-grad-norms", "0"], "positive"),
        (["--lambdas", "0.1,x"], "invalid list"),
    ],
)
def test_invalid_strengths_rejected(capsys, flags, message):
    with pytest.raises(SystemExit):
        unlearn.parse_args(flags)
    assert message in capsys.readouterr().err


def test_strength_defaults_per_dataset():
    args = unlearn.parse_args(["--dataset", "celebahq", "--forget-grad-norms", "100,500"])
    assert [s.label for s in args.strengths] == ["forget-grad-norm 100", "forget-grad-norm 500"]
    assert args.lr == 5e-6
    assert args.steps == 60
    assert args.forget == "Smiling"
    default = unlearn.parse_args([])
    assert [s.label for s in default.strengths] == ["lambda 1"]
    assert default.forget == "airplane"


# ---------------------------------------------------------------------------- tiny real runs


@pytest.mark.slow
def test_unlearn_tiny_cifar_run(data_root, tiny_base, tmp_path):
    out = tmp_path / "run"
    common = tiny_run_args(data_root, tiny_base, out, "--fid-samples", "0")
    unlearn.main(["--dataset", "cifar10", *common, "--lambdas", "0,1"])

    report = (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert "layout of Table 6" in report
    assert "layout of Table 7" in report
    assert "## Pareto" in report
    assert "| lambda 0 |" in report
    assert "| lambda 1 |" in report
    assert [run["strength"] for run in results["runs"]] == ["lambda 0", "lambda 1"]
    assert results["before"]["forget_nll"]["n_images"] == 2
    assert math.isfinite(results["runs"][1]["after"]["forget_nll"]["bpd_mean"])
    assert (out / "samples_before.png").is_file()
    assert (out / "lambda_1" / "samples_after.png").is_file()
    assert (out / "lambda_1" / "ckpt_0000002.safetensors").is_file()

    # Two AdamW steps move every parameter that gets a gradient.
    base, _ = load_model(tiny_base)
    after, _ = load_model(out / "lambda_1" / "ckpt_0000002.safetensors")
    unchanged = [
        name
        for (name, p), q in zip(base.named_parameters(), after.parameters(), strict=True)
        if torch.equal(p, q)
    ]
    assert unchanged == []

    # A second run reuses the finished one, unless a setting differs.
    unlearn.main(["--dataset", "cifar10", *common, "--lambda", "1"])
    log = (out / "lambda_1" / "log.jsonl").read_text()
    assert '"event": "reuse"' in log
    with pytest.raises(ValueError, match="lr=1e-05, but this run has lr=0.001"):
        unlearn.main(["--dataset", "cifar10", *common, "--lambdas", "0,1", "--lr", "1e-3"])


@pytest.mark.slow
def test_unlearn_tiny_celebahq_grad_norm(data_root, tiny_base, tmp_path, monkeypatch):
    # A stand-in for metrics.evaluate, so that the FID and IS columns are filled without
    # Inception weights; each call returns a larger FID.
    calls = []

    def fake_evaluate(model, diffusion, **kwargs):
        calls.append(kwargs)
        fid = 10.0 * len(calls)
        return {
            "fid": fid,
            "is_mean": 2.0,
            "is_std": 0.1,
            "not_computed": None,
            "n_samples": kwargs["n_samples"],
            "sampler": kwargs["sampler"],
            "steps": kwargs["steps"],
            "seed": kwargs["seed"],
            "reference": None,
        }

    monkeypatch.setattr(metrics, "evaluate", fake_evaluate)
    monkeypatch.setitem(metrics.DATASET_DEFAULTS["celebahq"], "image_size", 32)
    out = tmp_path / "run"
    argv = tiny_run_args(
        data_root, tiny_base, out, "--forget-grad-norm", "0.5", "--fid-samples", "8"
    )
    unlearn.main(["--dataset", "celebahq", *argv])

    report = (out / "results.md").read_text()
    assert len(calls) == 2
    assert calls[0]["dataset"] == "celebahq"
    assert calls[0]["n_samples"] == 8
    assert "| forget-grad-norm 0.5 | 10.00 | 20.00 | +10.00 |" in report
    assert (out / "forget_grad_norm_0.5" / "ckpt_0000002.safetensors").is_file()


def test_divergence_keeps_last_checkpoint(data_root, tiny_base, tmp_path, monkeypatch):
    # The loss turns NaN at the third step, after the checkpoint of step 2 was saved.
    real_step = unlearn.siss_step

    def diverging_step(diffusion, lam):
        step = real_step(diffusion, lam)
        count = {"calls": 0}

        def wrapped(*args):
            count["calls"] += 1
            loss = step(*args)
            return loss * float("nan") if count["calls"] == 3 else loss

        return wrapped

    monkeypatch.setattr(unlearn, "siss_step", diverging_step)
    out = tmp_path / "run"
    argv = tiny_run_args(data_root, tiny_base, out, "--fid-samples", "0")
    argv[argv.index("--steps") + 1] = "4"
    with pytest.raises(FloatingPointError, match="step 3") as error:
        unlearn.main(["--dataset", "cifar10", *argv])
    assert "nan" in str(error.value)
    assert (out / "lambda_1" / "ckpt_0000002.safetensors").is_file()
    assert not (out / "lambda_1" / "ckpt_0000003.safetensors").exists()


# --- faults: full disk, stale temporary files, hostile inputs, resume and processes


# ---------------------------------------------------------------- helpers


def temporaries(folder) -> list[str]:
    """Return the names of atomic_write's temporary files in `folder`."""
    return sorted(p.name for p in folder.glob(".*.tmp"))


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module, atol: float = 0.0):
    for (name, a), b in zip(
        expected.state_dict().items(), actual.state_dict().values(), strict=True
    ):
        if atol:
            assert torch.allclose(a, b, atol=atol), (name, (a - b).abs().max())
        else:
            assert torch.equal(a, b), name


# ---------------------------------------------------------------- crash-safe saves


def test_full_disk_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_0000001.safetensors"
    model = small_unet(seed=1)
    save_model(path, model, DiffusionConfig())

    # The writer fills part of the file, then the disk is full.
    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError) as error:
        save_model(path, small_unet(seed=2), DiffusionConfig())
    assert error.value.errno == errno.ENOSPC
    assert temporaries(tmp_path) == []

    monkeypatch.undo()
    loaded, _ = load_model(path, weights="model")
    assert_same_weights(model, loaded)


def test_killed_save_temporary_removed(tmp_path):
    path = tmp_path / "ckpt_0000001.safetensors"
    save_model(path, small_unet(seed=1), DiffusionConfig())
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SAVE, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert len(temporaries(tmp_path)) == 1

    # The next save of the same checkpoint deletes what the killed writer left.
    model = small_unet(seed=2)
    save_model(path, model, DiffusionConfig())
    assert temporaries(tmp_path) == []
    loaded, _ = load_model(path, weights="model")
    assert_same_weights(model, loaded)


def test_live_writer_temporary_kept(tmp_path):
    path = tmp_path / "ckpt_0000001.safetensors"
    live = tmp_path / f"{checkpoint.temporary_prefix(path)}abc123.tmp"
    live.write_bytes(b"partial")
    save_model(path, small_unet(), DiffusionConfig())
    assert live.is_file()


# ---------------------------------------------------------------- model files


def test_truncated_model_file_rejected(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(path, small_unet(), DiffusionConfig())
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated or not a safetensors file") as error:
        load_model(path)
    assert str(path) in str(error.value)
    assert "use an earlier checkpoint" in str(error.value)


def test_corrupted_header_rejected(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(path, small_unet(), DiffusionConfig())
    content = bytearray(path.read_bytes())
    content[8:24] = b"\xff" * 16  # inside the JSON header that follows its 8-byte length
    path.write_bytes(bytes(content))
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        load_model(path)


def test_foreign_safetensors_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(path))
    with pytest.raises(ValueError, match="format None") as error:
        load_model(path)
    assert "python unet.py convert" in str(error.value)


def test_tensors_of_other_architecture_rejected(tmp_path):
    # Tensors of a UNet with 2 layers per block under the config of one with 1.
    other = UNet(UNetConfig.from_dict({**small_unet().config.to_dict(), "layers_per_block": 2}))
    path = tmp_path / "model.safetensors"
    save_model(path, other, DiffusionConfig())
    tensors, metadata = checkpoint.read_model_file(path)
    metadata["unet_config"] = metadata["unet_config"].replace(
        '"layers_per_block": 2', '"layers_per_block": 1'
    )
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="does not match its own UNet config"):
        load_model(path)


def test_resume_other_architecture_rejected(tmp_path):
    run_training(tmp_path, steps=2)
    config = UNetConfig.from_dict({**small_unet().config.to_dict(), "layers_per_block": 2})
    model = UNet(config)
    batches = data.BatchIterator(training_images(), 4, seed=3)
    settings = TrainConfig(steps=4, batch_size=4, lr=1e-3, save_every=2)
    with pytest.raises(ValueError, match="layers_per_block=1 \\(this run: 2\\)") as error:
        train_loop(model, Diffusion(), batches, settings, tmp_path, {}, resume=True)
    assert "ckpt_0000002.safetensors" in str(error.value)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.safetensors")) == [
        "ckpt_0000002.safetensors",
        "ckpt_0000002.train.safetensors",
    ]


# ---------------------------------------------------------------- hostile inputs to train.py


def train_argv(data_dir, out, *extra) -> list[str]:
    return [
        "--dataset", "celebahq", "--data", str(data_dir), "--out", str(out),
        "--preset", "tiny", "--image-size", "16", "--steps", "1", "--batch-size", "2",
        "--device", "cpu", "--no-compile", *extra,
    ]  # fmt: skip


def cifar_folder_with(tmp_path, name: str, content):
    folder = tmp_path / "cifar"
    folder.mkdir()
    for i in range(1, 6):
        write_batch(folder / f"data_batch_{i}", valid_batch())
    write_batch(folder / name, content)
    return folder


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("missing folder", FileNotFoundError, "no CelebA-HQ attribute file"),
        ("cifar folder for celebahq", FileNotFoundError, "no CelebA-HQ attribute file"),
        ("non-square image", ValueError, "image is 16x12, but CelebA-HQ images are square"),
        ("fewer images than batch", ValueError, "only 2 images for a batch size of 4"),
    ],
)
def test_bad_data_leaves_no_output(tmp_path, case, error, message):
    folder = tmp_path / "data"
    extra = []
    if case == "cifar folder for celebahq":
        folder.mkdir()
        write_batch(folder / "data_batch_1", valid_batch())
    elif case == "non-square image":
        write_image_folder(folder, [(16, 16), (16, 12), (16, 16)])
    elif case == "fewer images than batch":
        write_image_folder(folder, [(16, 16)] * 3)
        extra = ["--batch-size", "4"]
    out = tmp_path / "out"
    with pytest.raises(error, match=message) as raised:
        train.main(train_argv(folder, out, *extra))
    if case != "fewer images than batch":
        assert str(folder) in str(raised.value)
    assert not out.exists()


def test_code_pickle_leaves_no_output(tmp_path):
    marker = tmp_path / "marker"
    folder = cifar_folder_with(tmp_path, "data_batch_3", RunsShellCommand(f"touch {marker}"))
    out = tmp_path / "out"
    argv = train_argv(folder, out)
    argv[argv.index("celebahq")] = "cifar10"
    with pytest.raises(ValueError, match="data_batch_3.*rejected"):
        train.main(argv)
    assert not marker.exists()
    assert not out.exists()


def test_rgba_and_grayscale_converted(tmp_path):
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    Image.new("RGBA", (4, 4), color=(10, 20, 30, 0)).save(folder / "images" / "0.png")
    Image.new("L", (4, 4), color=200).save(folder / "images" / "1.png")
    (folder / "attributes.csv").write_text("image,smiling\n0.png,1\n1.png,0\n")
    images, _ = data.load_celebahq(folder)
    assert images.shape == (2, 3, 4, 4)
    assert images[0, :, 0, 0].tolist() == [10, 20, 30]
    assert bool((images[1] == 200).all())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels_rejected(value):
    images = torch.zeros(4, 3, 2, 2)
    images[2, 0, 1, 1] = value
    with pytest.raises(ValueError, match="1 non-finite values") as error:
        data.BatchIterator(images, batch_size=2)
    assert "drop or repair" in str(error.value)


def test_empty_forget_set_leaves_no_output(tmp_path):
    folder = write_image_folder(tmp_path / "data", [(16, 16)] * 4)
    (folder / "attributes.csv").write_text(
        "image,smiling\n" + "".join(f"{i}.png,0\n" for i in range(4))
    )
    base = tmp_path / "base.safetensors"
    save_model(base, small_unet(), DiffusionConfig(T=10))
    out = tmp_path / "out"
    argv = [
        "--dataset", "celebahq", "--data", str(folder), "--base", str(base), "--out", str(out),
        "--device", "cpu", "--steps", "1", "--batch-size", "2",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="'Smiling' is empty: 0 of 3"):
        unlearn.main(argv)
    assert not out.exists()


# ---------------------------------------------------------------- distillation resume and DDP


def distill_args(out, *extra) -> argparse.Namespace:
    args = distill.parse_args(
        [
            "--dataset", "cifar10", "--teacher", "unused", "--out", str(out),
            "--batch-size", "4", "--trajectories", "3", "--save-every", "1",
            "--image-size", "16", "--device", "cpu", "--no-compile", *extra,
        ]
    )  # fmt: skip
    args.amp = "off"
    return args


def distill_stage_weights(out, *extra):
    """Run distillation stage 1 of a tiny teacher on an 8-step schedule; return (student, EMA).

    The caller sets distill.BASE_STEPS to 8, so that a trajectory takes 8 teacher steps.
    """
    teacher = small_unet(seed=4)
    diffusion = Diffusion(DiffusionConfig(T=8))
    args = distill_args(out, *extra)
    return distill.distill_stage(args, 1, teacher, diffusion, out, torch.device("cpu"))


def test_distill_resume_identical_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(distill, "BASE_STEPS", 8)
    torch.manual_seed(0)
    straight, straight_ema = distill_stage_weights(tmp_path / "straight")

    # Two trajectories, then a fresh process state resumed for the third.
    torch.manual_seed(0)
    distill_stage_weights(tmp_path / "split", "--trajectories", "2")
    assert train.latest_checkpoint(tmp_path / "split" / "stage1").name == "ckpt_0000002.safetensors"
    torch.manual_seed(123)
    resumed, resumed_ema = distill_stage_weights(tmp_path / "split", "--resume")
    assert_same_weights(straight, resumed)
    assert_same_weights(straight_ema, resumed_ema)


def test_distill_divergence_keeps_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(distill, "BASE_STEPS", 8)
    distill_stage_weights(tmp_path, "--trajectories", "2")
    last_good = tmp_path / "stage1" / "ckpt_0000002.safetensors"
    before = last_good.read_bytes()

    # A teacher with a NaN weight gives NaN targets in the resumed third trajectory.
    teacher = small_unet(seed=4)
    with torch.no_grad():
        teacher.conv_out.bias[0] = float("nan")
    args = distill_args(tmp_path, "--resume")
    diffusion = Diffusion(DiffusionConfig(T=8))
    with pytest.raises(FloatingPointError, match="trajectory 3, student step 0: L1 nan") as error:
        distill.distill_stage(args, 1, teacher, diffusion, tmp_path, torch.device("cpu"))
    assert str(last_good) in str(error.value)
    assert last_good.read_bytes() == before


def test_distill_rejects_unresumed_checkpoints(tmp_path):
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "ckpt_0000002.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="pass --resume"):
        distill.check_stage_folders(distill_args(tmp_path, "--stage", "1"), tmp_path)


def distill_worker(rank, world, port, out):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    torch.manual_seed(0)
    distill.BASE_STEPS = 8
    distill_stage_weights(out, "--trajectories", "2", "--save-every", "2")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distill_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.setattr(distill, "BASE_STEPS", 8)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    single, _ = distill_stage_weights(tmp_path / "single", "--trajectories", "2")
    mp.spawn(distill_worker, args=(2, free_port(), tmp_path / "ddp"), nprocs=2, join=True)
    ddp, _ = load_model(tmp_path / "ddp" / "stage1" / "ckpt_0000002.safetensors", weights="model")
    # Adam moves each weight by about lr (5e-5) per update in the sign of its gradient, so a
    # rounding difference in a near-zero gradient can flip a few weights by up to 2 * lr. Gradients
    # left unaveraged across processes would flip many, which the mean difference catches.
    assert_same_weights(single, ddp, atol=1e-4)
    differences = [
        (a - b).abs().flatten()
        for a, b in zip(single.state_dict().values(), ddp.state_dict().values(), strict=True)
    ]
    assert torch.cat(differences).mean() < 2e-6


# ---------------------------------------------------------------- unlearning under DDP


def unlearn_training(out, steps: int = 2):
    """Train a tiny UNet with the forget-gradient-norm objective of unlearn.py."""
    model = small_unet(seed=6)
    images = training_images(count=16)
    batches = unlearn.PairedBatches(images[:8], images[8:], batch_size=4, seed=2)
    config = TrainConfig(steps=steps, batch_size=4, lr=1e-3, save_every=steps, seed=7)
    diffusion = Diffusion(DiffusionConfig(T=10))
    return train_loop(
        model,
        diffusion,
        batches,
        config,
        out,
        {"script": "test"},
        step_fn=unlearn.split_losses_step(diffusion),
        backward_fn=unlearn.forget_grad_norm_backward(0.5),
    )


def unlearn_worker(rank, world, port, out):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    unlearn_training(out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_unlearn_two_processes_match_one(tmp_path):
    torch.set_num_threads(1)
    single, _ = unlearn_training(tmp_path / "single")
    mp.spawn(unlearn_worker, args=(2, free_port(), tmp_path / "ddp"), nprocs=2, join=True)
    ddp, _ = load_model(tmp_path / "ddp" / "ckpt_0000002.safetensors", weights="model")

    # Adam turns rounding in tiny gradients into steps of up to lr, so the tolerance is 1e-4.
    # Without averaging g_forget across processes the weights differ by about 4e-3.
    assert_same_weights(single, ddp, atol=1e-4)


# ---------------------------------------------------------------- robustness fine-tuning under DDP


def robust_argv(data_root, base, out) -> list[str]:
    return [
        "--dataset", "cifar10", "--data", str(data_root), "--base", str(base), "--out", str(out),
        "--checkpoint-steps", "1,2", "--batch-size", "4", "--dropout", "0", "--nll-images", "2",
        "--robust-images", "2", "--loss-draws", "1", "--fid-samples", "0", "--sample-steps", "2",
        "--eval-batch-size", "2", "--grid-images", "2", "--device", "cpu", "--no-compile",
    ]  # fmt: skip


def robust_worker(rank, world, port, argv):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    robust.main(argv)


@pytest.mark.slow
def test_robust_two_processes_match_one(tmp_path):
    data_root = data_folder()
    torch.set_num_threads(1)
    base = save_tiny_base(tmp_path / "base.safetensors")
    robust.main(robust_argv(data_root, base, tmp_path / "single"))
    ddp_argv = robust_argv(data_root, base, tmp_path / "ddp")
    mp.spawn(robust_worker, args=(2, free_port(), ddp_argv), nprocs=2, join=True)

    single, _ = load_model(tmp_path / "single" / "ckpt_0000002.safetensors", weights="model")
    ddp, _ = load_model(tmp_path / "ddp" / "ckpt_0000002.safetensors", weights="model")

    # Adam's first steps are about lr * sign(g), so rounding in tiny gradients can move a weight
    # by up to 2 * lr = 4e-4. Most weights agree far closer.
    assert_same_weights(single, ddp, atol=4e-4)
    pairs = zip(single.parameters(), ddp.parameters(), strict=True)
    mean_difference = torch.cat([(a - b).abs().flatten() for a, b in pairs]).mean()
    assert mean_difference < 1e-7, mean_difference
    assert (tmp_path / "ddp" / "results.md").is_file()


# --- sharded FID sampling under torchrun: two gloo processes draw the samples of one process

# 6 FID samples in shards of 2: shards 0 and 2 belong to rank 0, shard 1 to rank 1.
FID_SAMPLES, SHARD_SIZE = 6, 2

# distill.py samples its base model at BASE_STEPS, which the tests set to the base's T.
BASE_T = 8

# Per script: its main(argv), its flags, the files of a finished run that the two-process run
# reuses so that it evaluates the same weights, and the FID folders of the models it evaluates.
SHARD_SCRIPTS = {
    "robust": dict(
        main=robust.main,
        flags=[
            "--checkpoint-steps", "1", "--batch-size", "4", "--dropout", "0", "--nll-images", "2",
            "--robust-images", "2", "--loss-draws", "1", "--sample-steps", str(BASE_T),
            "--eval-batch-size", str(SHARD_SIZE), "--grid-images", "2", "--no-compile",
        ],
        resume_flags=["--resume"],
        reused=["ckpt_0000001.safetensors", "ckpt_0000001.json", "ckpt_0000001.train.safetensors"],
        folders=["fid_step0000000", "fid_step0000001"],
    ),
    "unlearn": dict(
        main=unlearn.main,
        flags=[
            "--steps", "2", "--batch-size", "2", "--nll-images", "2", "--sample-steps", str(BASE_T),
            "--eval-batch-size", str(SHARD_SIZE), "--grid-images", "2", "--save-every", "2",
            "--no-compile",
        ],
        resume_flags=[],
        reused=["lambda_1/ckpt_0000002.safetensors", "lambda_1/ckpt_0000002.json"],
        folders=["fid_before", "lambda_1/fid_after"],
    ),
    "distill": dict(
        main=distill.main,
        flags=[
            "--stage", "1", "--batch-size", str(SHARD_SIZE), "--trajectories", "1",
            "--nll-images", "2", "--grid-images", "2", "--l1-images", "2", "--no-compile",
        ],
        resume_flags=[],
        reused=["stage1.safetensors"],
        folders=["fid_stage0", "fid_stage1"],
    ),
}  # fmt: skip


def script_argv(script: str, data_root: Path, base: Path, out: Path) -> list[str]:
    base_flag = "--teacher" if script == "distill" else "--base"
    common = ["--dataset", "cifar10", "--data", str(data_root), base_flag, str(base)]
    common += ["--out", str(out), "--fid-samples", str(FID_SAMPLES), "--device", "cpu"]
    return common + SHARD_SCRIPTS[script]["flags"]


def shard_worker(rank, world, port, script, argv, out, record_dir):
    """Run one script on one rank and save the names of the sample shards that this rank wrote."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    distill.BASE_STEPS = BASE_T

    # The caches of the isolated_caches fixture, which a spawned process does not inherit.
    torch.hub.set_dir(str(record_dir / "torch_hub"))
    metrics.INCEPTION_URL = "http://127.0.0.1:9/unreachable.pth"

    written = []
    atomic_write = metrics.atomic_write

    def recording_write(path, write_fn):
        if path.name.startswith("shard_"):
            written.append(str(path.relative_to(out)))
        atomic_write(path, write_fn)

    metrics.atomic_write = recording_write
    SHARD_SCRIPTS[script]["main"](argv)
    (record_dir / f"rank{rank}.json").write_text(json.dumps(sorted(written)))


def shard_images(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as f:
        return f["images"]


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SHARD_SCRIPTS))
def test_sharded_fid_samples_match_one(script, tmp_path, monkeypatch):
    data_root = data_folder()
    settings = SHARD_SCRIPTS[script]
    torch.set_num_threads(1)
    monkeypatch.setattr(distill, "BASE_STEPS", BASE_T)

    # No Inception weights, here or in the spawned processes: FID is reported as not computed
    # after the samples are drawn.
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DDPM_OFFLINE", "1")
    base = save_tiny_base(tmp_path / "base.safetensors", T=BASE_T)

    # One process trains and evaluates the base model and the trained one.
    single = tmp_path / "single"
    settings["main"](script_argv(script, data_root, base, single))

    # Two processes reuse a copy of the trained model, so that they evaluate the same weights,
    # and share the FID sampling.
    ddp = tmp_path / "ddp"
    for name in settings["reused"]:
        (ddp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(single / name, ddp / name)
    argv = script_argv(script, data_root, base, ddp) + settings["resume_flags"]
    mp.spawn(shard_worker, args=(2, free_port(), script, argv, ddp, tmp_path), nprocs=2, join=True)

    # Each rank drew its own shards of every model, so rank 0 drew none of rank 1's.
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    folders = settings["folders"]
    assert rank0 == sorted(
        f"{folder}/samples/shard_00000{k}.npz" for folder in folders for k in (0, 2)
    )
    assert rank1 == sorted(f"{folder}/samples/shard_000001.npz" for folder in folders)

    # The sample shards equal those of one process byte for byte.
    for folder in folders:
        single_dir, ddp_dir = single / folder / "samples", ddp / folder / "samples"
        names = sorted(p.name for p in single_dir.glob("shard_*.npz"))
        assert len(names) == FID_SAMPLES // SHARD_SIZE, folder
        assert sorted(p.name for p in ddp_dir.glob("shard_*.npz")) == names, folder
        for name in names:
            expected, actual = shard_images(single_dir / name), shard_images(ddp_dir / name)
            assert actual.dtype == expected.dtype == np.uint8, (folder, name)
            assert actual.shape == expected.shape, (folder, name)
            assert actual.tobytes() == expected.tobytes(), (folder, name)
        single_manifest = json.loads((single_dir / metrics.SAMPLE_MANIFEST).read_text())
        ddp_manifest = json.loads((ddp_dir / metrics.SAMPLE_MANIFEST).read_text())
        assert ddp_manifest == single_manifest, folder

    # Rank 0 measured the same models and wrote the same report, with FID not computed.
    report = (single / "results.md").read_text()
    assert (ddp / "results.md").read_text() == report
    assert "DDPM_OFFLINE=1" in report


@pytest.mark.parametrize("script", [distill, robust, unlearn])
def test_wrong_data_fails_before_download(script, tmp_path, monkeypatch):
    """A wrong --data is reported before the base model's download, which would fail offline."""
    monkeypatch.setenv("DDPM_OFFLINE", "1")
    missing = tmp_path / "no-such-folder"
    argv = ["--dataset", "cifar10", "--data", str(missing), "--out", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 python batches"):
        script.main([*argv, "--device", "cpu"])
    assert not (tmp_path / "out").exists()


def test_celebahq_without_data_rejected():
    with pytest.raises(ValueError, match="CelebA-HQ cannot be downloaded automatically"):
        data.check_data_folder("celebahq", None)


# --- study.py: parts, resume, compositions and the report

# Settings small enough for a test: a 16-pixel tiny UNet trained for 2 steps, one image per
# measurement and no FID samples.
MICRO_PRESET = {
    "train": [
        "--preset", "tiny", "--image-size", "16", "--steps", "2", "--batch-size", "4",
        "--save-every", "1", "--log-every", "1", "--dropout", "0",
    ],
    "distill": [
        "--trajectories", "1", "--batch-size", "1", "--nll-images", "1", "--l1-images", "1",
        "--grid-images", "1", "--fid-samples", "0",
    ],
    "robust": [
        "--checkpoint-steps", "1", "--batch-size", "2", "--nll-images", "1",
        "--robust-images", "1", "--fid-samples", "0", "--eval-batch-size", "1",
        "--grid-images", "1", "--loss-draws", "1",
    ],
    "unlearn": [
        "--steps", "1", "--batch-size", "2", "--nll-images", "1", "--fid-samples", "0",
        "--grid-images", "1", "--eval-batch-size", "1", "--save-every", "1",
        "--sample-steps", "2",
    ],
    "lambdas": "1",
}  # fmt: skip


def record_script_calls(monkeypatch) -> list[tuple[str, list[str]]]:
    """Wrap every script study.py runs so that each call is recorded with its arguments."""
    calls = []
    for name, script in dict(study.SCRIPTS).items():

        def recorded(argv, name=name, script=script):
            calls.append((name, argv))
            return script(argv)

        monkeypatch.setitem(study.SCRIPTS, name, recorded)
    return calls


def modification_times(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}


@pytest.mark.slow
def test_study_reuses_resumes_and_composes(tmp_path, monkeypatch):
    root = data_folder()
    monkeypatch.setitem(study.PRESETS, "cpu-tiny", MICRO_PRESET)
    calls = record_script_calls(monkeypatch)
    out = tmp_path / "study"
    args = ["--preset", "cpu-tiny", "--data", str(root), "--out", str(out), "--device", "cpu"]

    # The first run trains the base model, then runs every intervention once.
    study.main(args)
    assert [name for name, _ in calls] == ["train", "distill", "robust", "unlearn"]
    report = (out / "report.md").read_text()
    for number in range(1, 8):
        assert f"## Table {number}." in report
    assert "Not run yet" not in report
    assert "## Extra: the undistilled base at the students' step counts" in report
    assert "## Extra: NLL of corrupted held-out images" in report
    assert "## Extra: keep-set NLL before vs. after unlearning" in report
    assert "| lambda 1 |" in report
    assert "FID and IS not computed (skipped: 0 samples requested)" in report
    assert ".png)" in report
    record = json.loads((out / "study.json").read_text())
    assert sorted(record["parts"]) == ["base", "distill", "robust", "unlearn"]

    # A rerun after completion runs no script and rewrites the same report.
    calls.clear()
    before = modification_times(out)
    study.main(args)
    assert calls == []
    assert modification_times(out) == before
    assert (out / "report.md").read_text() == report

    # A rerun after deleting one part redoes that part alone, in the same folder.
    shutil.rmtree(out / record["parts"]["unlearn"])
    study.main(args)
    assert [name for name, _ in calls] == ["unlearn"]
    assert (out / record["parts"]["unlearn"] / "results.json").is_file()
    unchanged = {p: t for p, t in before.items() if record["parts"]["unlearn"] not in str(p)}
    assert {p: t for p, t in modification_times(out).items() if p in unchanged} == unchanged

    # Unlearning on the distilled student is a composition, with its own table.
    calls.clear()
    student = out / record["parts"]["distill"] / "stage2.safetensors"
    study.main([*args, "--base", str(student), "--interventions", "unlearn"])
    assert [name for name, _ in calls] == ["unlearn"]
    assert calls[0][1][calls[0][1].index("--base") + 1] == str(student)
    report = (out / "report.md").read_text()
    assert "## Compositions of interventions" in report
    assert "| unlearn | the study's base |" in report
    assert "| unlearn | distill stage2 |" in report


def fake_intervention(calls: list, fail: bool = False, checkpoint: bool = True):
    """A stand-in for an intervention script: it records its call, may save a checkpoint file
    and fail after it, else finishes."""

    def script(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        if checkpoint:
            (out / "ckpt_0000001.safetensors").write_bytes(b"weights")
        if fail:
            raise KeyboardInterrupt("killed")
        (out / "done").write_text("finished")

    return script


def test_study_resumes_unfinished_part(tmp_path, monkeypatch):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"weights")
    calls = []
    monkeypatch.setitem(study.SCRIPTS, "robust", fake_intervention(calls, fail=True))
    out = tmp_path / "study"
    with pytest.raises(KeyboardInterrupt):
        study.run_part(out, "robust", "robust", ["--lr", "1"], [], base)
    folder = next(out.glob("robust-*"))
    assert json.loads((folder / study.PART_FILE).read_text())["finished"] is False
    assert "--resume" not in calls[0]

    # The rerun resumes the interrupted folder, then a third run reuses it.
    monkeypatch.setitem(study.SCRIPTS, "robust", fake_intervention(calls))
    assert study.run_part(out, "robust", "robust", ["--lr", "1"], [], base) == folder
    assert calls[1][-1] == "--resume"
    assert json.loads((folder / study.PART_FILE).read_text())["finished"] is True
    study.run_part(out, "robust", "robust", ["--lr", "1"], [], base)
    assert len(calls) == 2


def test_study_restarts_part_without_checkpoint(tmp_path, monkeypatch):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"weights")
    calls = []
    script = fake_intervention(calls, fail=True, checkpoint=False)
    monkeypatch.setitem(study.SCRIPTS, "robust", script)
    out = tmp_path / "study"
    with pytest.raises(KeyboardInterrupt):
        study.run_part(out, "robust", "robust", ["--lr", "1"], [], base)

    # Nothing to resume from, so the rerun starts the part afresh in the same folder.
    monkeypatch.setitem(study.SCRIPTS, "robust", fake_intervention(calls, checkpoint=False))
    folder = study.run_part(out, "robust", "robust", ["--lr", "1"], [], base)
    assert "--resume" not in calls[1]
    assert (folder / "done").is_file()


def test_report_rejects_folder_without_study(tmp_path):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path)])


def test_study_part_key_follows_settings_and_base(tmp_path):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"weights")
    key = study.part_key("robust", ["--lr", "1"], base)
    assert study.part_key("robust", ["--lr", "2"], base) != key
    assert study.part_key("unlearn", ["--lr", "1"], base) != key
    moved = tmp_path / "moved.safetensors"
    shutil.copy(base, moved)
    assert study.part_key("robust", ["--lr", "1"], moved) == key
    base.write_bytes(b"other weights")
    assert study.part_key("robust", ["--lr", "1"], base) != key


def test_study_changed_settings_keep_old_folder(tmp_path, monkeypatch):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"weights")
    calls = []
    monkeypatch.setitem(study.SCRIPTS, "robust", fake_intervention(calls))
    out = tmp_path / "study"
    first = study.run_part(out, "robust", "robust", ["--lr", "1"], [], base)
    second = study.run_part(out, "robust", "robust", ["--lr", "2"], [], base)
    assert first != second
    assert (first / "done").is_file()
    assert (second / "done").is_file()


def test_study_rejects_other_dataset_in_folder(tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    record = {"dataset": "cifar10", "preset": "cpu-tiny", "parts": {}, "compositions": {}}
    (out / study.STUDY_FILE).write_text(json.dumps(record))
    args = study.parse_args(["--dataset", "celebahq", "--preset", "cpu-tiny", "--out", str(out)])
    with pytest.raises(SystemExit, match="contains a study with --dataset cifar10, not celebahq"):
        study.run_study(args)


def test_study_rejects_unknown_intervention():
    with pytest.raises(SystemExit):
        study.parse_args(["--interventions", "distill,prune"])


def test_study_rejects_missing_base(tmp_path):
    args = study.parse_args(["--out", str(tmp_path / "s"), "--base", str(tmp_path / "none.pt")])
    with pytest.raises(SystemExit, match="is not a file"):
        study.run_study(args)
    assert not (tmp_path / "s").exists()


def test_study_rejects_wrong_data_first(tmp_path):
    out = tmp_path / "s"
    args = study.parse_args(["--out", str(out), "--data", str(tmp_path / "no-such-folder")])
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 python batches"):
        study.run_study(args)
    assert not out.exists()


def test_study_paper_preset_uses_script_defaults():
    for name in study.INTERVENTIONS:
        assert study.PRESETS["paper"][name] == []
    assert study.PRESETS["paper"]["train"] is None


# --- fast paths: compile, autocast, channels_last, the sampler loop and stacked NLL

# Maximum absolute difference between the compiled and the eager fp32 UNet.
COMPILE_TOLERANCE = 1e-4
# Maximum relative error (norm of the difference over the norm of the fp32 output) of bf16
# autocast. bf16 keeps 8 significant bits, a rounding error of up to 2^-9 = 2e-3 per operation,
# which the layers accumulate: 1.7e-2 for the tiny UNet and 4.5e-3 for Inception features on
# the random weights and inputs below.
BF16_UNET_TOLERANCE = 3e-2
BF16_INCEPTION_TOLERANCE = 1e-2
# Maximum absolute difference of sampler outputs in [-1, 1] with and without compile.
SAMPLER_COMPILE_TOLERANCE = 1e-3


def random_tiny_unet(seed: int = 0) -> UNet:
    model = UNet(PRESETS["tiny"]).eval()
    randomize_weights(model, seed)
    return model


def unet_inputs(batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, 32, 32, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    return x_t, t


@pytest.fixture(scope="module")
def compiled_tiny():
    """The tiny UNet and its compiled fp32 eps_model, compiled once for the module's tests."""
    torch.compiler.reset()
    model = random_tiny_unet()
    return model, train.eps_model(model, "off", compile=True)


# ---------------------------------------------------------------- UNet fast paths


@pytest.mark.slow
def test_compiled_unet_matches_eager(compiled_tiny):
    model, compiled = compiled_tiny
    x_t, t = unet_inputs()
    with torch.no_grad():
        expected = model(x_t, t)
        got = compiled(x_t, t)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < COMPILE_TOLERANCE


def test_bf16_unet_near_fp32():
    model = random_tiny_unet()
    x_t, t = unet_inputs()
    with torch.no_grad():
        expected = model(x_t, t)
        got = train.eps_model(model, "bf16", compile=False)(x_t, t)
    assert got.dtype == torch.bfloat16
    assert expected.abs().mean().item() > 0.1  # random weights keep the output at order one
    assert relative_error(got, expected) < BF16_UNET_TOLERANCE


def test_channels_last_output_equals_contiguous():
    model = random_tiny_unet()
    x_t, t = unet_inputs()
    converted = random_tiny_unet().to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x_t, t)
        got = converted(x_t.contiguous(memory_format=torch.channels_last), t)
    assert got.is_contiguous()
    assert expected.is_contiguous()
    assert (got - expected).abs().max().item() < 1e-5


def test_channels_last_matches_diffusers():
    diffusers = bench.require("diffusers")
    model = random_tiny_unet().to(memory_format=torch.channels_last)
    kwargs = {k: v for k, v in PRESETS["tiny"].to_diffusers().items() if not k.startswith("_")}
    reference = diffusers.UNet2DModel(**kwargs).eval()
    reference.load_state_dict(random_tiny_unet().state_dict(), strict=True)
    x_t, t = unet_inputs()
    with torch.no_grad():
        expected = reference(x_t, t).sample
        got = model(x_t, t)
    assert (got - expected).abs().max().item() < 1e-4


def hand_counted_flops(preset: str) -> float:
    """Count one image's forward FLOPs from layer shapes: 2 per multiply-add, biases excluded."""
    model = UNet(PRESETS[preset]).eval()
    total = 0

    def conv_flops(module, inputs, output):
        nonlocal total
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        total += 2 * per_output * output.numel()

    def linear_flops(module, inputs, output):
        nonlocal total
        total += 2 * module.in_features * output.numel()

    def attention_flops(module, inputs, output):
        nonlocal total
        _, channels, height, width = inputs[0].shape
        tokens = height * width
        total += 2 * 2 * tokens * tokens * channels  # q k^T, then the weights times v

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(conv_flops)
        elif isinstance(module, torch.nn.Linear):
            module.register_forward_hook(linear_flops)
        elif isinstance(module, AttentionBlock):
            module.register_forward_hook(attention_flops)
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    return float(total)


@pytest.mark.parametrize("preset", ["tiny", "cifar10"])
def test_unet_flop_count_matches_hand_count(preset):
    counted = bench.unet_flops_per_image(preset)
    assert counted == pytest.approx(hand_counted_flops(preset), rel=1e-9)


def test_cifar10_flops_include_attention():
    # Convolutions and linear layers alone give 12.108 GFLOP, the figure quoted for this UNet.
    assert bench.unet_flops_per_image("cifar10") / 1e9 == pytest.approx(12.444, abs=0.001)


# ---------------------------------------------------------------- runtime flags


def runtime_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train.add_runtime_args(parser)
    return parser.parse_args(argv)


def test_runtime_defaults_on_cpu():
    args = runtime_args(["--device", "cpu"])
    device = train.resolve_runtime(args)
    assert device.type == "cpu"
    assert args.amp == "off"
    assert args.compile is False


def test_fp16_rejected_for_training():
    with pytest.raises(ValueError, match="--amp fp16 is for sampling and evaluation only"):
        train.resolve_runtime(runtime_args(["--device", "cpu", "--amp", "fp16"]))


def test_fp16_allowed_for_evaluation():
    args = runtime_args(["--device", "cpu", "--amp", "fp16"])
    train.resolve_runtime(args, training=False)
    assert args.amp == "fp16"


def test_train_loop_rejects_fp16(tmp_path):
    config = train.TrainConfig(steps=1, batch_size=2, lr=1e-4, amp="fp16")
    with pytest.raises(ValueError, match="amp='fp16' is not supported for training"):
        train.train_loop(random_tiny_unet(), Diffusion(), iter([]), config, tmp_path, {})


def test_autocast_rejects_unknown_precision():
    with pytest.raises(ValueError, match="amp='fp8'"):
        train.autocast("fp8", torch.device("cpu"))


# ---------------------------------------------------------------- sampler loop


@pytest.mark.slow
def test_sampler_same_with_compile(compiled_tiny):
    model, compiled = compiled_tiny
    diffusion = Diffusion()
    x_T, _ = unet_inputs(seed=5)
    eager = diffusion.sample(model, x_T, steps=10, generator=torch.Generator().manual_seed(3))
    got = diffusion.sample(compiled, x_T, steps=10, generator=torch.Generator().manual_seed(3))
    assert (got - eager).abs().max().item() < SAMPLER_COMPILE_TOLERANCE


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
def test_sampler_equals_public_steps(variance_type):
    """The loop with precomputed coefficients gives exactly what the step functions give."""
    diffusion = Diffusion(DiffusionConfig(variance_type=variance_type))
    model = random_tiny_unet()
    x_T, _ = unet_inputs(seed=6)
    with torch.no_grad():
        got = diffusion.sample(model, x_T, steps=8, generator=torch.Generator().manual_seed(4))

        generator = torch.Generator().manual_seed(4)
        timesteps = diffusion.timesteps(8).tolist()
        x_t = x_T
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            eps_pred = model(x_t, torch.full((2,), t))
            noise = torch.randn(x_t.shape, generator=generator) if t_prev >= 0 else None
            x_t = diffusion.ancestral_step(x_t, t, t_prev, eps_pred, noise)
    assert torch.equal(got, x_t.clamp(-1, 1))


def test_ddim_with_noise_reaches_data():
    """DDIM with eta > 0 adds noise on every step but the last, and still finds a point mass."""
    diffusion = Diffusion()
    x_star = torch.rand(1, 3, 4, 4) * 1.6 - 0.8

    def oracle(x_t, t):
        alpha_bar = diffusion.alpha_bar[t].float().view(-1, 1, 1, 1)
        return (x_t - alpha_bar.sqrt() * x_star) / (1 - alpha_bar).sqrt()

    x_T = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x_0 = diffusion.sample(
        oracle, x_T, steps=50, sampler="ddim", eta=0.5, generator=torch.Generator().manual_seed(1)
    )
    assert torch.allclose(x_0, x_star.expand_as(x_0), atol=1e-4)


def test_sampler_passes_precomputed_timesteps():
    """Every step gets its timestep in a tensor made before the loop, not filled per step."""
    diffusion = Diffusion()
    seen = []

    def model(x_t, t):
        seen.append(t)
        return torch.zeros_like(x_t)

    diffusion.sample(model, torch.zeros(2, 3, 4, 4), steps=5, sampler="ddim")
    assert [t.tolist() for t in seen] == [[t, t] for t in diffusion.timesteps(5).tolist()]
    assert len({t.untyped_storage().data_ptr() for t in seen}) == 1  # rows of one table


# ---------------------------------------------------------------- batched NLL


def per_t_nll(diffusion: Diffusion, model, x_0: torch.Tensor, generator: torch.Generator):
    """The bound terms computed one timestep at a time, as diffusion.nll did before batching."""
    x_0 = x_0.float()
    batch = x_0.shape[0]
    terms_bpd = torch.zeros(batch, diffusion.T, dtype=torch.float64)
    x_0_64 = x_0.double()
    for t in range(diffusion.T):
        t_batch = torch.full((batch,), t)
        eps = torch.randn(x_0.shape, generator=generator)
        x_t = diffusion.q_sample(x_0, t_batch, eps).float()
        eps_pred = model(x_t, t_batch).double()
        mean, var = diffusion.p_mean_var(x_t.double(), t_batch, eps_pred)
        if t == 0:
            nats = -discretized_gaussian_log_likelihood(x_0_64, mean, var)
        else:
            true_mean, true_var = diffusion.q_posterior(x_0_64, x_t.double(), t_batch)
            nats = normal_kl(true_mean, true_var, mean, var)
        terms_bpd[:, t] = mean_flat(nats) / math.log(2.0)
    return terms_bpd


@pytest.mark.parametrize("batch_size", [None, 2 * 7, 2 * 40])
def test_batched_nll_equals_per_t(batch_size):
    diffusion = Diffusion(DiffusionConfig(T=40))
    model = random_tiny_unet()
    x_0 = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(2))
    x_0 = x_0 / 127.5 - 1
    with torch.no_grad():
        expected = per_t_nll(diffusion, model, x_0, torch.Generator().manual_seed(9))
        result = diffusion.nll(
            model, x_0, generator=torch.Generator().manual_seed(9), batch_size=batch_size
        )
    assert result["terms_bpd"].shape == (2, 40)
    assert torch.allclose(result["terms_bpd"], expected, rtol=1e-6, atol=1e-9)
    expected_bpd = expected.sum(dim=1) + result["prior_bpd"]
    assert torch.allclose(result["bpd"], expected_bpd, rtol=1e-7)


def test_nll_calls_model_once_per_batch():
    diffusion = Diffusion(DiffusionConfig(T=10))
    calls = []

    def model(x_t, t):
        calls.append(t.tolist())
        return torch.zeros_like(x_t)

    diffusion.nll(model, torch.zeros(2, 3, 4, 4), batch_size=8)
    assert calls[0] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert calls[-1] == [8, 8, 9, 9]
    assert len(calls) == 3


def test_nll_rejects_batch_below_images():
    with pytest.raises(ValueError, match="batch_size=1 is smaller than the 2 images"):
        Diffusion(DiffusionConfig(T=4)).nll(
            lambda x_t, t: x_t, torch.zeros(2, 3, 4, 4), batch_size=1
        )


# ---------------------------------------------------------------- Inception fast paths


@pytest.fixture(scope="module")
def inceptions(tmp_path_factory):
    """The plain Inception with random weights, and the same weights through load_inception."""
    state = random_inception_state(seed=0)
    plain = metrics.FIDInceptionV3()
    plain.load_state_dict(state)
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(state, path)
    loaded, _ = metrics.load_inception(path, cache=path.parent)
    return plain.eval(), loaded


def uint8_images(count: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)


def test_inception_loads_channels_last(inceptions):
    _, loaded = inceptions
    weight = loaded.Conv2d_1a_3x3.conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_inception_fast_path_matches_plain(inceptions):
    plain, loaded = inceptions
    images = uint8_images()
    with torch.no_grad():
        expected_features, expected_logits = plain(images.float() / 255)
    features, logits = metrics.inception_outputs(loaded, [images], len(images))
    assert expected_features.abs().mean() > 0.01  # random weights keep features at order one
    assert relative_error(torch.from_numpy(features), expected_features) < 1e-5
    assert relative_error(torch.from_numpy(logits), expected_logits) < 1e-5


def test_inception_bf16_near_fp32(inceptions):
    _, loaded = inceptions
    images = uint8_images(seed=1)
    fp32, _ = metrics.inception_outputs(loaded, [images], len(images))
    bf16, _ = metrics.inception_outputs(loaded, [images], len(images), amp="bf16")
    assert bf16.dtype == np.float32
    assert relative_error(torch.from_numpy(bf16), torch.from_numpy(fp32)) < BF16_INCEPTION_TOLERANCE


@pytest.mark.slow
def test_compiled_inception_matches_eager(inceptions):
    _, loaded = inceptions
    images = uint8_images(seed=2)
    expected, _ = metrics.inception_outputs(loaded, [images], len(images))
    got, _ = metrics.inception_outputs(loaded, [images], len(images), compile=True)
    assert relative_error(torch.from_numpy(got), torch.from_numpy(expected)) < 1e-5


def test_inference_precision_rejects_unknown():
    with pytest.raises(ValueError, match="amp='fp8'"):
        metrics.inference_precision(torch.device("cpu"), "fp8")

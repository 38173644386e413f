"""Gaussian diffusion: forward process, training loss, samplers and the variational bound.

Ho et al. 2020, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239, with the linear beta
schedule of its CIFAR-10 model, and Song et al. 2021, "Denoising Diffusion Implicit Models",
arXiv 2010.02502, for the DDIM sampler. The bound in bits/dim follows the term layout of
Nichol & Dhariwal 2021 (arXiv 2102.09672); Ho et al. report 3.70 bits/dim on the CIFAR-10 test set
(Table 2) for the model whose weights google/ddpm-cifar10-32 carries.

Indexing: `t` is 0-based, so `betas[t]` is the paper's beta_{t+1}, `alpha_bar[t]` is its
alpha_bar_{t+1}, and the decoder term p(x_0 | x_1) of the bound sits at `t == 0`.

Every function that runs the network takes `model(x_t, t) -> eps_pred`, with x_t a (B, C, H, W)
float tensor in the [-1, 1] image scale and t an int64 tensor of shape (B,).
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np
import torch

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

VARIANCE_TYPES = ("fixed_large", "fixed_small")
SAMPLERS = ("ancestral", "ddim")


class StepCoefficients(NamedTuple):
    """Float64 scalars of one reverse step from t to t_prev, for `Diffusion.step_coefficients`."""

    sqrt_alpha_bar: float  # sqrt(alpha_bar_t)
    sqrt_one_minus_alpha_bar: float  # sqrt(1 - alpha_bar_t)
    mean_x_0: float  # ancestral mean = mean_x_0 * x_0_pred + mean_x_t * x_t
    mean_x_t: float
    ancestral_std: float  # standard deviation of the ancestral step's noise
    sqrt_alpha_bar_prev: float  # DDIM: x_prev = sqrt_alpha_bar_prev * x_0_pred
    ddim_eps: float  # + ddim_eps * eps_pred
    ddim_sigma: float  # + ddim_sigma * noise


@dataclass
class DiffusionConfig:
    """Noise schedule and reverse-process settings; defaults are those of google/ddpm-cifar10-32."""

    T: int = 1000  # number of diffusion steps
    beta_start: float = 1e-4  # beta_1 of the linear schedule
    beta_end: float = 0.02  # beta_T of the linear schedule
    variance_type: str = "fixed_large"  # reverse variance: beta_t or the posterior variance
    clip_sample: bool = True  # clip the predicted x_0 to [-1, 1] inside each reverse step

    def __post_init__(self):
        if self.variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"variance_type {self.variance_type!r} is not supported; "
                f"use one of {VARIANCE_TYPES}"
            )
        if self.T < 1:
            raise ValueError(f"T={self.T} must be a positive number of diffusion steps")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(
                f"betas ({self.beta_start}, {self.beta_end}) must satisfy 0 < start <= end < 1"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DiffusionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown diffusion settings {unknown}; known ones are {sorted(known)}"
            )
        return cls(**values)


# ---------------------------------------------------------------- Gaussian helpers


def normal_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def discretized_gaussian_log_likelihood(x_0, mean, var):
    """Log-probability (nats) of 8-bit pixels x_0 in [-1, 1] under N(mean, var) integrated over
    each pixel's bin of width 2/255; the outermost bins take the open tails.

    Uses the exact normal CDF (improved-diffusion uses a tanh approximation of it).
    """
    inv_std = torch.rsqrt(var)
    upper = (x_0 - mean + 1.0 / 255) * inv_std
    lower = (x_0 - mean - 1.0 / 255) * inv_std

    # log P(X < upper) for the lowest bin, log P(X > lower) for the highest, the bin mass between.
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    bin_mass = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    log_bin = torch.log(bin_mass.clamp(min=1e-12))

    return torch.where(
        x_0 < -0.999,
        log_cdf_upper.clamp(min=math.log(1e-12)),
        torch.where(x_0 > 0.999, log_sf_lower.clamp(min=math.log(1e-12)), log_bin),
    )


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------- the diffusion process


class Diffusion:
    """The linear-beta DDPM of Ho et al. 2020; all schedule tensors are float64 on `device`."""

    def __init__(self, config: DiffusionConfig | None = None, device="cpu"):
        self.config = config or DiffusionConfig()
        self.T = self.config.T
        self.device = torch.device(device)
        self.betas = torch.linspace(
            self.config.beta_start, self.config.beta_end, self.T, dtype=torch.float64
        ).to(self.device)
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.alpha_bar_prev = torch.cat([self.alpha_bar.new_ones(1), self.alpha_bar[:-1]])
        # A host copy, from which samplers precompute their coefficients without a device read.
        self._alpha_bar_host = self.alpha_bar.cpu()

    # ------------------------------------------------------------ forward process q

    def q_sample(self, x_0, t, eps):
        """Sample x_t ~ q(x_t | x_0).

        Ho et al. 2020, eq. 4: x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps.
        """
        alpha_bar = self._at(self.alpha_bar, t, x_0)
        return alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * eps

    def q_posterior(self, x_0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0) for t >= 1 (0-based).

        Ho et al. 2020, eq. 7: mean = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t) * x_0
        + (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t) * x_t, and
        var = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t.
        """
        beta = self._at(self.betas, t, x_0)
        alpha = self._at(self.alphas, t, x_0)
        alpha_bar = self._at(self.alpha_bar, t, x_0)
        alpha_bar_prev = self._at(self.alpha_bar_prev, t, x_0)
        posterior_mean = (
            beta * alpha_bar_prev.sqrt() / (1 - alpha_bar) * x_0
            + (1 - alpha_bar_prev) * alpha.sqrt() / (1 - alpha_bar) * x_t
        )
        posterior_var = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta
        return posterior_mean, posterior_var

    # ------------------------------------------------------------ training objective

    def training_loss(self, model: EpsModel, x_0, t=None, eps=None, generator=None):
        """Per-example L_simple: mean over pixels of ||eps - eps_pred||^2 (Ho et al. 2020, eq. 14).

        `t` defaults to uniform draws from {0, ..., T-1} and `eps` to standard normal noise.
        """
        if t is None:
            t = torch.randint(0, self.T, (x_0.shape[0],), device=x_0.device, generator=generator)
        if eps is None:
            eps = torch.randn(x_0.shape, device=x_0.device, generator=generator)
        x_t = self.q_sample(x_0, t, eps)
        eps_pred = model(x_t, t).float()
        return mean_flat((eps - eps_pred) ** 2)

    # ------------------------------------------------------------ reverse process p

    def predict_x_0(self, x_t, t, eps_pred, clip: bool | None = None):
        """Predict x_0 = (x_t - sqrt(1 - alpha_bar_t) * eps_pred) / sqrt(alpha_bar_t), clipped to
        [-1, 1] when config.clip_sample is set, unless `clip` overrides it."""
        alpha_bar = self._at(self.alpha_bar, t, x_t)
        x_0_pred = (x_t - (1 - alpha_bar).sqrt() * eps_pred) / alpha_bar.sqrt()
        clip = self.config.clip_sample if clip is None else clip
        return x_0_pred.clamp(-1, 1) if clip else x_0_pred

    def p_mean_var(self, x_t, t, eps_pred, clip: bool | None = None):
        """Mean and variance of p(x_{t-1} | x_t) on the full T-step chain, as used by the bound.

        The mean is the posterior mean at x_0_pred. The variance is the posterior variance
        (fixed_small) or beta_t (fixed_large); at t = 0 both use the posterior variance of t = 1,
        because the posterior variance at t = 0 is zero (Nichol & Dhariwal 2021, Section 2).
        """
        x_0_pred = self.predict_x_0(x_t, t, eps_pred, clip)
        mean, _ = self.q_posterior(x_0_pred, x_t, t)
        posterior_var_1 = self.betas[1] * (1 - self.alpha_bar[0]) / (1 - self.alpha_bar[1])
        if self.config.variance_type == "fixed_small":
            variances = (1 - self.alpha_bar_prev) / (1 - self.alpha_bar) * self.betas
        else:
            variances = self.betas.clone()
        variances[0] = posterior_var_1
        return mean, self._at(variances, t, x_t)

    def timesteps(self, steps: int | None = None) -> torch.Tensor:
        """Decreasing timesteps of a `steps`-step sampler, spaced evenly and ending near 0.

        "Trailing" spacing: t_i = round(T - i * T / steps) - 1, so 1000 steps give 999..0,
        500 give 999, 997, ..., 1 and 250 give 999, 995, ..., 3. Each schedule with half the
        steps is a subset of the longer one, which is what lets a student's states line up with
        its teacher's in progressive distillation.
        """
        steps = self.T if steps is None else steps
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps={steps} must be between 1 and T={self.T}")
        grid = np.round(self.T - np.arange(steps) * self.T / steps).astype(np.int64) - 1
        return torch.from_numpy(grid).to(self.device)

    def step_coefficients(self, timesteps: torch.Tensor, eta: float = 0.0) -> list:
        """Precompute the StepCoefficients of every step of a sampler that visits `timesteps`.

        Step i goes from timesteps[i] to timesteps[i + 1], and the last step to -1 (the data).
        The arithmetic runs in float64 on the CPU, and the result is Python floats, so a sampling
        loop that uses them launches no kernel and reads no device memory for its coefficients.

        Ancestral steps follow Ho et al. 2020, Algorithm 2, on a respaced chain whose step
        variance is beta' = 1 - alpha_bar_t / alpha_bar_{t_prev}: the mean is the posterior mean
        at x_0_pred, and the variance is beta' (fixed_large) or
        (1 - alpha_bar_{t_prev}) / (1 - alpha_bar_t) * beta' (fixed_small).
        DDIM steps follow Song et al. 2021, eq. 12: x_prev = sqrt(alpha_bar_prev) * x_0_pred
        + sqrt(1 - alpha_bar_prev - sigma^2) * eps_pred + sigma * noise, with eq. 16:
        sigma = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)
                           * (1 - alpha_bar_t / alpha_bar_prev)).
        """
        t = timesteps.cpu()
        t_prev = torch.cat([t[1:], t.new_tensor([-1])])
        alpha_bar = self._alpha_bar_host[t]
        alpha_bar_prev = torch.where(
            t_prev >= 0, self._alpha_bar_host[t_prev.clamp(min=0)], torch.ones_like(alpha_bar)
        )

        beta = 1 - alpha_bar / alpha_bar_prev
        if self.config.variance_type == "fixed_small":
            ancestral_var = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta
        else:
            ancestral_var = beta
        sigma = (
            eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        )
        columns = (
            alpha_bar.sqrt(),
            (1 - alpha_bar).sqrt(),
            alpha_bar_prev.sqrt() * beta / (1 - alpha_bar),
            (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar),
            ancestral_var.sqrt(),
            alpha_bar_prev.sqrt(),
            (1 - alpha_bar_prev - sigma**2).sqrt(),
            sigma,
        )
        return [StepCoefficients(*row) for row in torch.stack(columns, dim=1).tolist()]

    def _x_0_pred(self, x_t, eps_pred, c: StepCoefficients):
        """Predict x_0 = (x_t - sqrt(1 - alpha_bar_t) * eps_pred) / sqrt(alpha_bar_t).

        The prediction is clipped to [-1, 1] when config.clip_sample is set.
        """
        x_0_pred = (x_t - c.sqrt_one_minus_alpha_bar * eps_pred) / c.sqrt_alpha_bar
        return x_0_pred.clamp(-1, 1) if self.config.clip_sample else x_0_pred

    def _ancestral_update(self, x_t, eps_pred, noise, c: StepCoefficients):
        """Apply one ancestral step; `noise` None adds none (the step that lands on the data)."""
        x_0_pred = self._x_0_pred(x_t, eps_pred, c)
        mean = c.mean_x_0 * x_0_pred + c.mean_x_t * x_t
        if noise is None:
            return mean.float()
        return (mean + c.ancestral_std * noise).float()

    def _ddim_update(self, x_t, eps_pred, noise, c: StepCoefficients):
        """Apply one DDIM step; `noise` None adds none (eta = 0, or the step onto the data)."""
        x_0_pred = self._x_0_pred(x_t, eps_pred, c)
        if self.config.clip_sample:
            eps_pred = (x_t - c.sqrt_alpha_bar * x_0_pred) / c.sqrt_one_minus_alpha_bar
        x_prev = c.sqrt_alpha_bar_prev * x_0_pred + c.ddim_eps * eps_pred
        if noise is not None:
            x_prev = x_prev + c.ddim_sigma * noise
        return x_prev.float()

    def _one_step(self, t: int, t_prev: int, eta: float = 0.0) -> StepCoefficients:
        """Return the coefficients of one step from t to t_prev (-1 = data)."""
        visited = [t] if t_prev < 0 else [t, t_prev]
        return self.step_coefficients(torch.tensor(visited), eta)[0]

    def ancestral_step(self, x_t, t: int, t_prev: int, eps_pred, noise):
        """Take one ancestral step from t to the earlier scheduled timestep t_prev (-1 = data).

        The coefficients are those of `step_coefficients`. No noise is added on the step that
        lands on the data (t_prev = -1).
        """
        c = self._one_step(t, t_prev)
        return self._ancestral_update(x_t, eps_pred, noise if t_prev >= 0 else None, c)

    def ddim_step(self, x_t, t: int, t_prev: int, eps_pred, eta: float = 0.0, noise=None):
        """Take one DDIM step from t to t_prev (-1 = data).

        The coefficients are those of `step_coefficients`. With clip_sample, x_0_pred is
        clipped and eps_pred is recomputed from it, as improved-diffusion's DDIM sampler does
        (diffusers' DDIMScheduler with use_clipped_model_output=True). Keeping the unclipped
        eps_pred makes the step inconsistent with x_t, and then the 500- and 1000-step
        trajectories of one model drift apart, which would break the trajectory matching of
        distill.py.
        """
        c = self._one_step(t, t_prev, eta)
        return self._ddim_update(x_t, eps_pred, noise if eta > 0 else None, c)

    @torch.no_grad()
    def sample(
        self,
        model: EpsModel,
        x_T: torch.Tensor,
        steps: int | None = None,
        sampler: str = "ancestral",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Run a `steps`-step sampler from the noise x_T and return x_0 in [-1, 1].

        `generator` draws the per-step noise of the ancestral sampler and of DDIM with eta > 0.
        Timesteps and coefficients are computed before the loop, so each step launches the
        forward, at most one noise draw and the elementwise update, and the loop itself reads
        nothing back from the device.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
        timesteps = self.timesteps(steps)
        coefficients = self.step_coefficients(timesteps, eta)
        # (steps, B): row i contains timestep i for every image, so no step fills a tensor.
        t_batches = timesteps.to(x_T.device)[:, None].expand(-1, x_T.shape[0]).contiguous()
        update = self._ancestral_update if sampler == "ancestral" else self._ddim_update
        stochastic = sampler == "ancestral" or eta > 0
        last = len(coefficients) - 1

        x_t = x_T.float()
        for i, c in enumerate(coefficients):
            eps_pred = model(x_t, t_batches[i]).float()
            noise = None
            if stochastic and i < last:
                noise = torch.randn(x_t.shape, device=x_t.device, generator=generator)
            x_t = update(x_t, eps_pred, noise, c)
        return x_t.clamp(-1, 1)

    # ------------------------------------------------------------ variational bound

    @torch.no_grad()
    def nll(
        self,
        model: EpsModel,
        x_0: torch.Tensor,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
    ):
        """Variational bound on -log p(x_0) for 8-bit images x_0 in [-1, 1].

        Returns per-image tensors: `bpd` (bits/dim), `nats` (nats/image), `terms_bpd` (B, T)
        with the decoder term -log p(x_0 | x_1) at t = 0 and
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) at t >= 1, and `prior_bpd`,
        KL(q(x_T | x_0) || N(0, I)). Each term is averaged over dimensions and divided by ln 2
        (Ho et al. 2020, eq. 5).

        The network runs once per image and t, T * B image-forwards in all. Consecutive
        timesteps are stacked into network batches of up to `batch_size` images (default B, one
        timestep per forward), and the bound terms of a batch are computed together. The noise
        of each t is drawn in order of t whatever the stacking, so `batch_size` changes the
        result only by float rounding in the network.
        """
        x_0 = x_0.float()
        B = x_0.shape[0]
        batch_size = B if batch_size is None else batch_size
        if batch_size < B:
            raise ValueError(
                f"batch_size={batch_size} is smaller than the {B} images; pass at least {B}"
            )
        timesteps_per_batch = batch_size // B
        dims = x_0[0].numel()
        x_0_64 = x_0.double()
        terms_bpd = torch.zeros(B, self.T, dtype=torch.float64, device=x_0.device)

        for start in range(0, self.T, timesteps_per_batch):
            stop = min(start + timesteps_per_batch, self.T)
            n = stop - start

            # Row j * B + b contains image b at timestep start + j.
            t = torch.arange(start, stop, device=x_0.device).repeat_interleave(B)  # (n * B,)
            eps = torch.empty((n, *x_0.shape), device=x_0.device)
            for eps_t in eps:
                eps_t.normal_(generator=generator)
            x_0_rows = x_0.repeat(n, 1, 1, 1)  # (n * B, C, H, W)
            x_t = self.q_sample(x_0_rows, t, eps.flatten(0, 1)).float()

            # The KL of each term at t >= 1, and the decoder term in its place at t = 0.
            eps_pred = model(x_t, t).double()
            x_t_64, x_0_rows_64 = x_t.double(), x_0_64.repeat(n, 1, 1, 1)
            mean, var = self.p_mean_var(x_t_64, t, eps_pred)
            true_mean, true_var = self.q_posterior(x_0_rows_64, x_t_64, t)
            kl_rows = slice(B if start == 0 else 0, None)
            nats = torch.empty_like(x_t_64)
            nats[kl_rows] = normal_kl(
                true_mean[kl_rows], true_var[kl_rows], mean[kl_rows], var[kl_rows]
            )
            if start == 0:
                nats[:B] = -discretized_gaussian_log_likelihood(x_0_64, mean[:B], var[:B])
            terms_bpd[:, start:stop] = (mean_flat(nats) / math.log(2.0)).view(n, B).T

        # Prior term: q(x_T | x_0) = N(sqrt(alpha_bar_T) x_0, (1 - alpha_bar_T) I) against N(0, I).
        alpha_bar_T = self.alpha_bar[-1]
        prior_nats = normal_kl(
            alpha_bar_T.sqrt() * x_0_64,
            1 - alpha_bar_T,
            torch.zeros_like(x_0_64),
            x_0_64.new_ones(()),
        )
        prior_bpd = mean_flat(prior_nats) / math.log(2.0)
        bpd = terms_bpd.sum(dim=1) + prior_bpd
        return {
            "bpd": bpd,
            "nats": bpd * dims * math.log(2.0),
            "terms_bpd": terms_bpd,
            "prior_bpd": prior_bpd,
        }

    # ------------------------------------------------------------ helpers

    def _at(self, values: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
        """values[t] shaped to broadcast against `like` (B, C, H, W), in like's dtype."""
        if not torch.is_tensor(t):
            t = torch.full((like.shape[0],), t, dtype=torch.long, device=values.device)
        out = values[t.to(values.device)].to(device=like.device, dtype=like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

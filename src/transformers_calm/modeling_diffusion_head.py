"""The diffusion head, an official ablation of CALM's energy head (Shao et al., 2025, arXiv 2510.27688, section 3.2;
official `models/modeling_diffusion.py` with the IDDPM/DiT/MAR diffusion code).

The MLP-AdaLN network of the flow head predicts, for a noisy latent x_t and the backbone state, the noise eps and a
value v that interpolates the log variance between the two IDDPM bounds ("learned range"). Training: cosine schedule
over 1000 steps, t uniform, loss = MSE(eps) + the variational bound in bits (the network's eps detached; at t = 0 the
discretised-Gaussian decoder NLL of the IDDPM image code, applied as the official code applies it to latents).
Sampling: ancestral DDPM on the schedule respaced to 100 steps, no clipping. The schedules are float64 tables gathered
at t and cast to float32, as in the official code.
"""

import math

import torch
from torch import nn

from .compat import generator_kwargs
from .modeling_flow_head import CalmMLPAdaLN, drop_condition, guide, loss_rows, sampling_inputs

NUM_TRAIN_STEPS = 1000
NUM_SAMPLE_STEPS = 100


def cosine_betas(num_steps: int = NUM_TRAIN_STEPS, max_beta: float = 0.999) -> torch.Tensor:
    """The IDDPM cosine schedule (float64): `beta_i = min(1 - abar((i + 1) / T) / abar(i / T), max_beta)`."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    # On the CPU explicitly: models are built under transformers' meta-device context when loaded.
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


def respaced_timesteps(num_steps: int, count: int) -> list[int]:
    """The `count` original steps IDDPM's `space_timesteps(num_steps, str(count))` keeps (its float accumulation)."""
    stride = (num_steps - 1) / (count - 1)
    taken, position = [], 0.0
    for _ in range(count):
        taken.append(round(position))
        position += stride
    return taken


class GaussianDiffusion:
    """The float64 tables of a (respaced) Gaussian diffusion and the IDDPM formulas the head needs.

    Args:
        base_betas: the schedule of all training steps.
        timesteps: the original steps kept (all of them for training, 100 for sampling); the network is given the
            original step, `timestep_map[i]`.
    """

    def __init__(self, base_betas: torch.Tensor, timesteps: list[int]):
        base_alphas_cumprod = torch.cumprod(1 - base_betas, 0)
        betas, last = [], 1.0
        for step in timesteps:
            betas.append(1 - base_alphas_cumprod[step].item() / last)
            last = base_alphas_cumprod[step].item()
        self.timestep_map = torch.tensor(timesteps, dtype=torch.long, device="cpu")
        self.betas = torch.tensor(betas, dtype=torch.float64, device="cpu")
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        previous = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()
        self.posterior_variance = self.betas * (1 - previous) / (1 - self.alphas_cumprod)
        # log of the posterior variance, its first entry (0) replaced by the second
        self.posterior_log_variance_clipped = torch.cat(
            [self.posterior_variance[1:2], self.posterior_variance[1:]]
        ).log()
        self.posterior_mean_coef1 = self.betas * previous.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - previous) * (1 - self.betas).sqrt() / (1 - self.alphas_cumprod)
        self.log_betas = self.betas.log()

    @staticmethod
    def gather(table: torch.Tensor, t: torch.LongTensor) -> torch.Tensor:
        """`table[t]` as float32 with a trailing unit dimension (float64 gathered, then cast, as IDDPM does)."""
        return table.to(t.device)[t].float()[..., None]

    def q_sample(self, x_start, t, noise):
        return (
            self.gather(self.sqrt_alphas_cumprod, t) * x_start
            + self.gather(self.sqrt_one_minus_alphas_cumprod, t) * noise
        )

    def q_posterior(self, x_start, x_t, t):
        mean = self.gather(self.posterior_mean_coef1, t) * x_start + self.gather(self.posterior_mean_coef2, t) * x_t
        return mean, self.gather(self.posterior_log_variance_clipped, t)

    def p_mean_variance(self, model_output, x_t, t):
        """Mean, log variance and predicted x_0 from the network output `[eps | v]` (learned range, no clipping)."""
        eps, v = model_output.chunk(2, dim=-1)
        frac = (v + 1) / 2
        log_variance = frac * self.gather(self.log_betas, t) + (1 - frac) * self.gather(
            self.posterior_log_variance_clipped, t
        )
        pred_xstart = (
            self.gather(self.sqrt_recip_alphas_cumprod, t) * x_t
            - self.gather(self.sqrt_recipm1_alphas_cumprod, t) * eps
        )
        mean, _ = self.q_posterior(pred_xstart, x_t, t)
        return mean, log_variance, pred_xstart


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """IDDPM's log-likelihood of 8-bit image values (bins of 2/255 on [-1, 1]), which the official code applies to
    latents at t = 0."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class CalmDiffusionHead(nn.Module):
    """Diffusion head: eps prediction with learned-range variance, 100 ancestral DDPM steps to sample.

    Its randomness per sample is x_T and the noise of each of the 100 steps: `(101, latent_size)` values."""

    def __init__(self, config):
        super().__init__()
        self.config = config  # guidance_scale and guidance_dropout are read at each call
        self.latent_size = config.latent_size
        self.net = CalmMLPAdaLN(config.latent_size, config.hidden_size, 2 * config.latent_size, config.num_mlp_layers)
        if config.guidance_dropout > 0:  # not the official head: the null condition of classifier-free guidance
            self.null_condition = nn.Parameter(torch.zeros(config.hidden_size))
        betas = cosine_betas()
        self.train_diffusion = GaussianDiffusion(betas, list(range(NUM_TRAIN_STEPS)))
        self.sample_diffusion = GaussianDiffusion(betas, respaced_timesteps(NUM_TRAIN_STEPS, NUM_SAMPLE_STEPS))

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (NUM_SAMPLE_STEPS + 1, self.latent_size)

    def draw_noise(self, shape, generator=None, device=None, dtype=None) -> torch.Tensor:
        # Drawn step-major, as the official sampler draws x_T and then one noise per step for all rows.
        noise = torch.randn(
            (NUM_SAMPLE_STEPS + 1, *shape, self.latent_size), device=device, dtype=dtype, **generator_kwargs(generator)
        )
        return noise.movedim(0, -2)

    def forward(self, hidden_states, noise=None, generator=None, num_samples=None, temperature: float = 1.0):
        """Latent samples for backbone states `(..., hidden_size)`: `(..., latent_size)`, or `(num_samples, ...,
        latent_size)`; `noise` `(..., 101, latent_size)` holds x_T and the noise of each step. `temperature` scales the
        per-step noise only (the official sampler's argument; CALM's temperature sampling does not use it)."""
        c, noise = sampling_inputs(self, hidden_states, noise, generator, num_samples)
        leading = c.shape[:-1]
        diffusion = self.sample_diffusion
        x = noise[..., 0, :].to(hidden_states.dtype)
        for k, i in enumerate(reversed(range(NUM_SAMPLE_STEPS))):
            t = torch.full(leading, i, dtype=torch.long, device=x.device)
            output = guide(self, self.net, x, diffusion.timestep_map.to(x.device)[t], c)
            if self.config.guidance_scale != 1.0:  # the guided variance value stays in its learnt range
                eps, v = output.chunk(2, dim=-1)
                output = torch.cat([eps, v.clamp(-1, 1)], dim=-1)
            mean, log_variance, _ = diffusion.p_mean_variance(output, x, t)
            step_noise = noise[..., k + 1, :].to(x.dtype)
            x = mean + (torch.exp(0.5 * log_variance) * step_noise * temperature if i > 0 else 0)
        return x

    def loss_terms(self, hidden_states, targets, generator=None, return_estimate=False) -> dict[str, torch.Tensor]:
        """Diffusion loss (MSE + VB in bits) of `targets` `(S, ..., latent_size)` given the states `(..., hidden_size)`:
        `{"loss": (...)}`, the mean over samples. With `return_estimate`, also `"estimate"` `(S, ..., latent_size)`:
        the x_0 the network predicts for each target at its step (what the decoder loss scores, `decoder_loss.py`)."""
        flat_targets, flat_c = loss_rows(hidden_states, targets)
        flat_c = drop_condition(self, flat_c)
        # Draw order as the official DiffLoss: t, then the noise (rows sample-major).
        t = torch.randint(0, NUM_TRAIN_STEPS, (flat_targets.shape[0],), device=targets.device, generator=generator)
        noise = torch.randn(flat_targets.shape, device=targets.device, dtype=flat_targets.dtype, generator=generator)
        if not return_estimate:
            mse, vb = self.sample_loss(flat_targets, flat_c, t, noise)
            return {"loss": (mse + vb).view(targets.shape[:-1]).mean(0)}
        mse, vb, estimate = self.sample_loss(flat_targets, flat_c, t, noise, return_estimate=True)
        return {"loss": (mse + vb).view(targets.shape[:-1]).mean(0), "estimate": estimate.view(targets.shape)}

    def sample_loss(self, target, c, t, noise, return_estimate=False):
        """Per-sample `(mse, vb)` `(rows,)` for given steps and noise (the official `training_losses`); with
        `return_estimate`, also the predicted x_0 `(rows, latent_size)` (from the predicted noise, with gradient)."""
        diffusion = self.train_diffusion
        x_t = diffusion.q_sample(target, t, noise)
        output = self.net(x_t, diffusion.timestep_map.to(t.device)[t], c)
        eps, v = output.chunk(2, dim=-1)
        mse = (noise - eps).pow(2).mean(-1)
        # The bound trains the variance only: the mean's eps is detached.
        mean, log_variance, _ = diffusion.p_mean_variance(torch.cat([eps.detach(), v], dim=-1), x_t, t)
        true_mean, true_log_variance = diffusion.q_posterior(target, x_t, t)
        kl = _normal_kl(true_mean, true_log_variance, mean, log_variance).mean(-1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(target, mean, 0.5 * log_variance).mean(-1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        if not return_estimate:
            return mse, vb
        estimate = (
            diffusion.gather(diffusion.sqrt_recip_alphas_cumprod, t) * x_t
            - diffusion.gather(diffusion.sqrt_recipm1_alphas_cumprod, t) * eps
        )
        return mse, vb, estimate.to(x_t.dtype)


__all__ = ["CalmDiffusionHead", "GaussianDiffusion", "cosine_betas", "respaced_timesteps"]

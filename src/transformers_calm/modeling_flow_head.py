"""The flow-matching head, an official ablation of CALM's energy head (Shao et al., 2025, arXiv 2510.27688, section
3.2; official `models/modeling_flow.py`), and the MLP-AdaLN network it shares with the diffusion head.

The network (the official `SimpleMLPAdaLN`, from DiT/MAR) maps a noisy latent x, a time t and the backbone state c to
a latent-sized output; t and c condition it only through adaLN (shift, scale and gate of every residual block).
Flow matching: x_t = (1 - t) x0 + t x1 with x0 ~ N(0, I) noise at t = 0 and x1 the data at t = 1; the network predicts
the velocity x1 - x0 (mean squared error). Sampling integrates it from t = 0 to 1 with 10 midpoint steps (20 network
evaluations), as the official code does.
"""

import math

import torch
from torch import nn

from .compat import generator_kwargs


class CalmAdaLNLinear(nn.Linear):
    """A linear layer of the MLP-AdaLN network; the official init: xavier-uniform weight, zero bias."""

    @torch.no_grad()
    def official_init(self):
        nn.init.xavier_uniform_(self.weight)
        nn.init.zeros_(self.bias)


class CalmTimeLinear(CalmAdaLNLinear):
    """A layer of the time MLP; the official init: N(0, 0.02) weight, zero bias."""

    @torch.no_grad()
    def official_init(self):
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)


class CalmZeroLinear(CalmAdaLNLinear):
    """An adaLN output or the final projection; the official init sets it to zero, so that every block starts as the
    identity and the network's output at 0."""

    @torch.no_grad()
    def official_init(self):
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding `[cos(t f) | sin(t f)]` (cos first), `f_i = max_period^(-i / (dim / 2))`, in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[..., None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CalmTimestepEmbedder(nn.Module):
    """Sinusoidal features of an integer time, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            CalmTimeLinear(frequency_size, hidden_size), nn.SiLU(), CalmTimeLinear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class CalmAdaLNBlock(nn.Module):
    """`x + gate * MLP(LN(x) * (1 + scale) + shift)` with `[shift | scale | gate]` from SiLU(condition)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(
            CalmAdaLNLinear(hidden_size, hidden_size), nn.SiLU(), CalmAdaLNLinear(hidden_size, hidden_size)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), CalmZeroLinear(hidden_size, 3 * hidden_size))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(condition).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class CalmAdaLNFinalLayer(nn.Module):
    """`Linear(LN(x) * (1 + scale) + shift)`, the LayerNorm without parameters."""

    def __init__(self, hidden_size: int, output_size: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = CalmZeroLinear(hidden_size, output_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), CalmZeroLinear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(condition).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class CalmMLPAdaLN(nn.Module):
    """The official `SimpleMLPAdaLN`: `net(x, t, c)` with x `(..., latent_size)`, integer times t `(...)` and backbone
    states c `(..., hidden_size)`; the condition is `time_embed(t) + cond_embed(c)`."""

    def __init__(self, latent_size: int, hidden_size: int, output_size: int, num_blocks: int):
        super().__init__()
        self.time_embed = CalmTimestepEmbedder(hidden_size)
        self.cond_embed = CalmAdaLNLinear(hidden_size, hidden_size)
        self.input_proj = CalmAdaLNLinear(latent_size, hidden_size)
        self.res_blocks = nn.ModuleList([CalmAdaLNBlock(hidden_size) for _ in range(num_blocks)])
        self.final_layer = CalmAdaLNFinalLayer(hidden_size, output_size)

    def forward(self, x: torch.Tensor, t: torch.LongTensor, c: torch.Tensor) -> torch.Tensor:
        condition = self.time_embed(t) + self.cond_embed(c)
        x = self.input_proj(x)
        for block in self.res_blocks:
            x = block(x, condition)
        return self.final_layer(x, condition)


def drop_condition(head, c: torch.Tensor) -> torch.Tensor:
    """Training rows `(rows, hidden_size)` with each condition replaced by the head's null condition with probability
    `config.guidance_dropout` (classifier-free guidance's training; not the official method). Unchanged otherwise."""
    p = head.config.guidance_dropout
    if p == 0 or not head.training:
        return c
    drop = torch.rand(c.shape[0], device=c.device) < p
    return torch.where(drop[:, None], head.null_condition.to(c.dtype), c)


def guide(head, predict, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`predict(x, t, c)` (a velocity or a network output), classifier-free guided with `config.guidance_scale` w:
    `p(x, t, null) + w (p(x, t, c) - p(x, t, null))`, the two in one batch; just `predict(x, t, c)` when w = 1."""
    scale = head.config.guidance_scale
    if scale == 1.0:
        return predict(x, t, c)
    if getattr(head, "null_condition", None) is None:
        raise ValueError(
            f"guidance_scale={scale} needs a head trained with guidance_dropout > 0 (it has no null condition); set "
            "config.guidance_scale = 1.0."
        )
    null = head.null_condition.to(c.dtype).expand_as(c)
    conditional, unconditional = predict(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, null])).chunk(2)
    return unconditional + scale * (conditional - unconditional)


def sampling_inputs(head, hidden_states, noise, generator, num_samples):
    """The conditions and the noise of a head's sampler (flow or diffusion): the states `(..., hidden_size)` expanded to
    the samples' leading shape (`(num_samples, ...)` with `num_samples`), and the head's noise for them, drawn when
    `None`, else checked against `head.noise_shape`."""
    leading = hidden_states.shape[:-1] if num_samples is None else (num_samples, *hidden_states.shape[:-1])
    if noise is None:
        noise = head.draw_noise(leading, generator, hidden_states.device, hidden_states.dtype)
    elif tuple(noise.shape) != (*leading, *head.noise_shape):
        raise ValueError(f"noise must have shape {(*leading, *head.noise_shape)}, got {tuple(noise.shape)}.")
    return hidden_states.expand(*leading, hidden_states.shape[-1]), noise


def loss_rows(hidden_states, targets):
    """Targets `(S, ..., latent_size)` and their states `(..., hidden_size)` as rows, sample-major (row s * M + m), the
    order in which the official heads flatten them and draw their times and noise."""
    c = hidden_states.expand(*targets.shape[:-1], hidden_states.shape[-1])
    return targets.reshape(-1, targets.shape[-1]), c.reshape(-1, c.shape[-1])


class CalmFlowHead(nn.Module):
    """Flow-matching head: velocity prediction with the MLP-AdaLN network, 10 midpoint steps to sample.

    Its randomness per sample is the starting point x0 ~ N(0, I) (`latent_size` values)."""

    num_steps = 20  # nominal steps of the official sampler, run as num_steps // 2 midpoint steps

    def __init__(self, config):
        super().__init__()
        self.config = config  # guidance_scale and guidance_dropout are read at each call
        self.latent_size = config.latent_size
        self.net = CalmMLPAdaLN(config.latent_size, config.hidden_size, config.latent_size, config.num_mlp_layers)
        if config.guidance_dropout > 0:  # not the official head: the null condition of classifier-free guidance
            self.null_condition = nn.Parameter(torch.zeros(config.hidden_size))

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.latent_size,)

    def draw_noise(self, shape, generator=None, device=None, dtype=None) -> torch.Tensor:
        return torch.randn((*shape, self.latent_size), device=device, dtype=dtype, **generator_kwargs(generator))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # The network embeds the integer floor(1000 t), computed in float32 as the official code does.
        return self.net(x, (t.float() * 1000).long(), c)

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The sampler's velocity: the conditional one, or with `config.guidance_scale` w != 1 the classifier-free
        guided `v(x, t, null) + w (v(x, t, c) - v(x, t, null))` (both in one batch)."""
        return guide(self, self.velocity, x, t, c)

    def forward(self, hidden_states, noise=None, generator=None, num_samples=None) -> torch.Tensor:
        """Latent samples for backbone states `(..., hidden_size)`: `(..., latent_size)`, or `(num_samples, ...,
        latent_size)`; `noise` is the starting point x0 of each sample."""
        c, noise = sampling_inputs(self, hidden_states, noise, generator, num_samples)
        leading = c.shape[:-1]
        x = noise.to(hidden_states.dtype)
        steps = self.num_steps // 2
        dt = 1.0 / steps
        for step in range(steps):
            t = torch.full(leading, step / steps, dtype=torch.float32, device=x.device)
            x_mid = x + 0.5 * dt * self.guided_velocity(x, t, c)
            x = x + dt * self.guided_velocity(x_mid, t + 0.5 * dt, c)
        return x

    def loss_terms(self, hidden_states, targets, generator=None, return_estimate=False) -> dict[str, torch.Tensor]:
        """Flow-matching loss of `targets` `(S, ..., latent_size)` (S posterior samples per state) given the states
        `(..., hidden_size)`: `{"loss": (...)}`, the mean over samples of the per-sample squared velocity error. With
        `return_estimate`, also `"estimate"` `(S, ..., latent_size)`: the clean latent the network implies for each
        target at its time, `x_t + (1 - t) v_hat` (what the decoder loss scores, `decoder_loss.py`)."""
        flat_targets, flat_c = loss_rows(hidden_states, targets)
        flat_c = drop_condition(self, flat_c)
        # Draw order as the official FlowLoss: t, then x0 (rows sample-major).
        t = torch.rand(flat_targets.shape[0], device=targets.device, generator=generator)
        x0 = torch.randn(flat_targets.shape, device=targets.device, dtype=flat_targets.dtype, generator=generator)
        if not return_estimate:
            return {"loss": self.sample_loss(flat_targets, flat_c, t, x0).view(targets.shape[:-1]).mean(0)}
        per_sample, estimate = self.sample_loss(flat_targets, flat_c, t, x0, return_estimate=True)
        return {"loss": per_sample.view(targets.shape[:-1]).mean(0), "estimate": estimate.view(targets.shape)}

    def sample_loss(self, target, c, t, x0, return_estimate=False):
        """Per-sample loss `(rows,)` for given times and starting points (the official `FlowLoss.forward`); with
        `return_estimate`, also the implied clean latents `(rows, latent_size)`."""
        xt = (1 - t[:, None]) * x0 + t[:, None] * target
        velocity = self.velocity(xt, t, c)
        loss = (velocity - (target - x0)).pow(2).mean(-1)
        if not return_estimate:
            return loss
        return loss, xt + (1 - t[:, None]).to(velocity.dtype) * velocity


__all__ = [
    "CalmAdaLNBlock",
    "CalmAdaLNFinalLayer",
    "CalmAdaLNLinear",
    "CalmFlowHead",
    "CalmMLPAdaLN",
    "CalmTimeLinear",
    "CalmTimestepEmbedder",
    "CalmZeroLinear",
    "drop_condition",
    "guide",
]

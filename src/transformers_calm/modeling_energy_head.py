"""The energy head and the energy score (Shao et al., 2025, arXiv 2510.27688, section 3.2-3.3).

The head (the official `MLPGenerator`) turns a backbone hidden state and uniform noise into one sample of the next
chunk's latent vector in a single forward pass. It has no likelihood; it is trained with the energy score, a strictly
proper scoring rule that needs only samples: N head samples against M samples of the autoencoder posterior.
"""

import torch
from torch import nn

from .compat import generator_kwargs
from .configuration_calm import CalmConfig


class CalmEnergyHeadBlock(nn.Module):
    """Residual gated block: `x + down(SiLU(g) * v)` with `[g, v] = MLP([LayerNorm(x), c])`. The condition c (the
    projected backbone state) enters only through the concatenation, as in the official code."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(hidden_size, eps=1e-6)
        self.linears = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, 2 * hidden_size),
        )
        self.down_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """`x` `(..., hidden)`; `condition` of the same shape, or without the leading sample dimensions of `x` (it
        broadcasts)."""
        first, act1, middle, act2, last = self.linears
        hidden = x.shape[-1]
        # linear([LN(x), c]) = LN(x) W_x^T + (c W_c^T + b): the condition's half runs once per hidden state, not once
        # per sample of it (with N = 8 samples, about a sixth of the head's multiply-adds).
        h = nn.functional.linear(self.in_ln(x), first.weight[:, :hidden]) + nn.functional.linear(
            condition, first.weight[:, hidden:], first.bias
        )
        gate, up = last(act2(middle(act1(h)))).chunk(2, dim=-1)
        return x + self.down_proj(nn.functional.silu(gate) * up)


class CalmEnergyHeadOutputLayer(nn.Linear):
    """The head's last projection, to the latent vector. `CalmPreTrainedModel._init_weights` initialises it to zero,
    so that the head starts by predicting the zero vector, as the official code does."""


class CalmEnergyHeadFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, latent_size: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(hidden_size, eps=1e-6)
        self.linears = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.SiLU(), CalmEnergyHeadOutputLayer(hidden_size, latent_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linears(self.in_ln(x))


class CalmEnergyHead(nn.Module):
    """The energy generative head (the official `MLPGenerator`): turns a backbone hidden state and uniform noise into
    one sample of the next chunk's latent vector, in a single forward pass."""

    def __init__(self, config: CalmConfig):
        super().__init__()
        self.noise_size = config.noise_size
        self.noise_embd = nn.Linear(config.noise_size, config.hidden_size)
        self.hidden_embd = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm_hidden = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm_noise = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.mlp_blocks = nn.ModuleList([CalmEnergyHeadBlock(config.hidden_size) for _ in range(config.num_mlp_layers)])
        self.final_layer = CalmEnergyHeadFinalLayer(config.hidden_size, config.latent_size)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """The randomness of one sample: a uniform vector of `noise_size`."""
        return (self.noise_size,)

    def draw_noise(self, shape, generator=None, device=None, dtype=None) -> torch.Tensor:
        """Noise for `shape` samples: `(*shape, noise_size)` uniform in [-0.5, 0.5)."""
        return torch.rand((*shape, self.noise_size), device=device, dtype=dtype, **generator_kwargs(generator)) - 0.5

    def sample_noise(self, hidden_states: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform noise in [-0.5, 0.5), one vector of `noise_size` per hidden state."""
        return self.draw_noise(hidden_states.shape[:-1], generator, hidden_states.device, hidden_states.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_samples: int | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(..., hidden_size)`):
                Backbone states; any leading shape.
            noise (`torch.FloatTensor` of shape `(..., noise_size)`, *optional*):
                The noise to transform, with the leading shape of `hidden_states` (with `num_samples`:
                `(num_samples, ...)`); drawn uniformly from [-0.5, 0.5) when `None`.
            generator (`torch.Generator`, *optional*):
                Random generator for the noise when it is drawn.
            num_samples (`int`, *optional*):
                Draw this many samples per state, along a new leading dimension. The same as repeating
                `hidden_states` along it (the same noise draws too), but the part that does not depend on the noise
                runs once per state.

        Returns:
            `torch.FloatTensor` of shape `(..., latent_size)` (with `num_samples`: `(num_samples, ..., latent_size)`):
            one latent sample per hidden state and noise vector.
        """
        sample_shape = hidden_states.shape[:-1] if num_samples is None else (num_samples, *hidden_states.shape[:-1])
        if noise is None:
            # An expanded view: sample_noise sees one state per sample, as when callers repeat the states.
            noise = self.sample_noise(hidden_states.expand(*sample_shape, -1), generator)
        elif noise.shape[:-1] != sample_shape or noise.shape[-1] != self.noise_size:
            raise ValueError(
                f"noise must have shape {(*sample_shape, self.noise_size)} (the leading shape of hidden_states, "
                f"after num_samples if given, then noise_size), got {tuple(noise.shape)}."
            )
        # Once per state (not per sample), shared by every block.
        condition = self.norm_hidden(self.hidden_embd(hidden_states))
        x = self.norm_noise(self.noise_embd(noise.to(hidden_states.dtype)))
        for block in self.mlp_blocks:
            x = block(x, condition)
        return self.final_layer(x)


def _distance_power(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """`||a_i - b_j||^alpha` for all pairs, batched: a `(P, I, l)`, b `(P, J, l)` -> `(P, I, J)`.

    Uses `|a|^2 + |b|^2 - 2 a.b` so that memory is `P * I * J` rather than `P * I * J * l` (the official code
    materialises all differences: gigabytes for M = 100 targets). Squared distances are floored at a tiny value, so
    the gradient is finite and zero where two points coincide (the plain norm's gradient is NaN at 0).
    """
    squared = a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(-2) - 2 * a @ b.transpose(-1, -2)
    return squared.clamp(min=1e-20).pow(alpha / 2)


def energy_score_terms(
    samples: torch.Tensor, target_mean: torch.Tensor, target_log_std: torch.Tensor, num_targets: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the energy score, per position.

    Args:
        samples: `(N, ..., l)` head samples per position.
        target_mean, target_log_std: `(..., l)` autoencoder posterior of the true next chunk per position.
        num_targets: M, target samples drawn per position from the posterior.
        alpha: distance exponent.

    Returns:
        `(fidelity, diversity)`, each `(...)`: mean of `||x_n - y_m||^alpha` over the N x M pairs, and mean of
        `||x_i - x_j||^alpha` over the N(N-1) ordered pairs with i != j. The energy loss is `2 * fidelity -
        diversity`. Computed in float32 whatever the autocast state: the distance expansion cancels badly in bf16.
    """
    num_samples = samples.shape[0]
    batch_shape = samples.shape[1:-1]
    with torch.autocast(device_type=samples.device.type, enabled=False):
        samples = samples.float()
        std = target_log_std.float().exp()
        eps = torch.randn((num_targets, *target_mean.shape), device=target_mean.device, dtype=torch.float32)
        targets = target_mean.float() + eps * std  # (M, ..., l)
        x = samples.flatten(1, -2).transpose(0, 1)  # (P, N, l)
        y = targets.flatten(1, -2).transpose(0, 1)  # (P, M, l)
        fidelity = _distance_power(x, y, alpha).mean(dim=(-2, -1))
        off_diagonal = ~torch.eye(num_samples, dtype=torch.bool, device=x.device)
        diversity = (_distance_power(x, x, alpha) * off_diagonal).sum(dim=(-2, -1)) / (num_samples * (num_samples - 1))
    return fidelity.reshape(batch_shape), diversity.reshape(batch_shape)


__all__ = [
    "CalmEnergyHead",
    "CalmEnergyHeadBlock",
    "CalmEnergyHeadFinalLayer",
    "CalmEnergyHeadOutputLayer",
    "energy_score_terms",
]

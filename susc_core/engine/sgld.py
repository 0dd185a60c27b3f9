"""SGLD on a localized tempered posterior, exactly as SCIENCE.md §3, as pure functions over a chain axis.

    w <- w - eps/2 * [nbeta * grad mean_batch l(w) + gamma * (w - w*)] * mask + sqrt(eps) * N(0, I) * mask

A restricted run stores only the component's coordinates (``components.gather``), so the mask is
implicit: coordinates outside the component are never touched. ``init(...) -> SGLDState`` and the
pure ``step(generator, state, batch, ...) -> (SGLDState, SGLDInfo)`` follow BlackJAX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

DIVERGENCE_POLICIES = ("fail", "drop")
FORWARD_DTYPES = ("float32", "bfloat16")


@dataclass
class SamplerConfig:
    """Every SGLD and observable setting of a run (simple types only: it becomes a Hydra config;
    not frozen because Hydra cannot override fields of a frozen dataclass; treat it as a value).

    step_size, nbeta, gamma: epsilon, n*beta, gamma of SCIENCE.md §3 (no defaults on purpose;
    the paper uses 1e-3, 30, 300). Draws are taken after ``burn_in + (d + 1) * steps_between_draws``
    steps, d = 0 .. n_draws - 1.
    """

    step_size: float
    nbeta: float
    gamma: float
    n_chains: int = 4  # chains per component (paper: 4)
    n_draws: int = 100  # kept draws per chain (paper per-token: 100; dataset-level: 200)
    burn_in: int = 0  # SGLD steps before the first counted interval (unconfirmed in the paper)
    steps_between_draws: int = 1  # thinning (unconfirmed in the paper)
    batch_size: int = 16  # training sequences per minibatch (paper per-token: 16; dataset-level: 64)
    # False: chain k of every component reads minibatch stream k, so a component's chains are independent;
    # True: one stream for every chain (a speed option: one upstream cache for all chains of a unit)
    share_minibatches: bool = False
    divergence_policy: str = "fail"  # "fail": raise; "drop": warn and flag the chain (estimators skip it)
    blowup_nats: float = 10.0  # a minibatch or observable loss this far above L_n(w*) counts as divergence
    forward_dtype: str = "float32"  # dtype of the gradient forward pass; observables always run in float32
    chains_per_pass: int = 32  # most chains evaluated in one batched forward (bounds memory)

    def __post_init__(self):
        positive = {"step_size": self.step_size, "nbeta": self.nbeta, "n_chains": self.n_chains,
                    "n_draws": self.n_draws, "steps_between_draws": self.steps_between_draws,
                    "batch_size": self.batch_size, "blowup_nats": self.blowup_nats,
                    "chains_per_pass": self.chains_per_pass}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"SamplerConfig.{name} must be > 0, got {value}")
        if self.gamma < 0 or self.burn_in < 0:
            raise ValueError(f"SamplerConfig.gamma and burn_in must be >= 0, got {self.gamma}, {self.burn_in}")
        if self.step_size * self.gamma >= 4:
            raise ValueError(f"step_size * gamma = {self.step_size * self.gamma:g} >= 4: SGLD diverges even on the "
                             f"localizing term alone (stability needs eps * kappa < 4); lower step_size or gamma")
        if self.divergence_policy not in DIVERGENCE_POLICIES:
            raise ValueError(f"divergence_policy must be one of {DIVERGENCE_POLICIES}, got {self.divergence_policy!r}")
        if self.forward_dtype not in FORWARD_DTYPES:
            raise ValueError(f"forward_dtype must be one of {FORWARD_DTYPES}, got {self.forward_dtype!r}")

    @property
    def n_steps(self) -> int:
        """Total SGLD steps per chain."""
        return self.burn_in + self.n_draws * self.steps_between_draws

    def is_draw(self, step: int) -> bool:
        """Whether a draw is taken after (1-based) step ``step``."""
        return step > self.burn_in and (step - self.burn_in) % self.steps_between_draws == 0


class SGLDState(NamedTuple):
    """w: [chains, dim] current coordinates (fp32 master weights); step: steps taken."""

    w: torch.Tensor
    step: int


class SGLDInfo(NamedTuple):
    """loss: [chains] minibatch loss at the pre-step position."""

    loss: torch.Tensor


def sgld_update(w: torch.Tensor, grad: torch.Tensor, w_star: torch.Tensor, noise: torch.Tensor,
                step_size: float, nbeta: float, gamma: float) -> torch.Tensor:
    """One SGLD move: w - eps/2 * (nbeta * grad + gamma * (w - w_star)) + sqrt(eps) * noise.

    w, grad, noise: [chains, dim]; w_star: [dim] or [chains, dim]. grad is the gradient of the mean
    minibatch loss (nats per token). Returns the new [chains, dim].
    """
    drift = nbeta * grad + gamma * (w - w_star)
    return w - (step_size / 2) * drift + math.sqrt(step_size) * noise


def draw_noise(generator: torch.Generator | Sequence[torch.Generator], shape: tuple[int, int],
               device: torch.device | str) -> torch.Tensor:
    """Standard normal noise [chains, dim]: from one generator, or one generator per chain (row)."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} chains")
    return torch.stack([torch.randn(shape[1], generator=g, device=device) for g in generator])


def init(w_star: torch.Tensor, n_chains: int) -> SGLDState:
    """Every chain starts at w_star ([dim], or [n_chains, dim])."""
    return SGLDState(w_star.detach().expand(n_chains, -1).clone(), 0)


def step(generator: torch.Generator | Sequence[torch.Generator], state: SGLDState, batch,
         grad_fn: Callable[[torch.Tensor, object], tuple[torch.Tensor, torch.Tensor]],
         w_star: torch.Tensor, step_size: float, nbeta: float, gamma: float) -> tuple[SGLDState, SGLDInfo]:
    """Advance every chain once. ``grad_fn(w [chains, dim], batch) -> (loss [chains], grad [chains, dim])``."""
    loss, grad = grad_fn(state.w, batch)
    noise = draw_noise(generator, tuple(state.w.shape), state.w.device)
    w = sgld_update(state.w, grad, w_star, noise, step_size, nbeta, gamma)
    return SGLDState(w, state.step + 1), SGLDInfo(loss)

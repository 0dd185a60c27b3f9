"""What a work unit reads: its token contexts as one value, and the fp32 master weights on its device."""

from __future__ import annotations

from typing import NamedTuple

import torch

from susc_core.model.transformer import Params


class UnitContexts(NamedTuple):
    """The token contexts of a work unit, each a LongTensor [n, L+1] of one length L+1 (position t predicts t+1):
    ``train`` [N, L+1] the pool SGLD minibatches are drawn from; ``obs`` [M, L+1] the fixed baseline contexts
    of L_n(draw) and g; ``probe`` [P, L+1] the probe tokens, T = P·L in row-major order."""

    train: torch.Tensor
    obs: torch.Tensor
    probe: torch.Tensor

    def to(self, device: torch.device | str) -> UnitContexts:
        """The same contexts as int64 on ``device``."""
        return UnitContexts(*(t.to(device, torch.long) for t in self))

    def check(self, model) -> None:
        """``check_contexts`` on all three (``model``: anything with ``n_ctx`` and ``d_vocab``)."""
        check_contexts(model, train_contexts=self.train, obs_contexts=self.obs, probe_contexts=self.probe)


def check_contexts(model, **tensors: torch.Tensor) -> None:
    """Every context tensor is a non-empty [n, L+1] LongTensor with L+1 <= n_ctx+1, ids in [0, d_vocab),
    and all share one length. ``model``: anything with ``n_ctx`` and ``d_vocab`` (a config or an adapter)."""
    for name, t in tensors.items():
        if t.dim() != 2 or t.shape[0] == 0 or not 2 <= t.shape[1] <= model.n_ctx + 1:
            raise ValueError(f"{name} must be a non-empty LongTensor [n, L+1] with 2 <= L+1 <= n_ctx+1 = "
                             f"{model.n_ctx + 1}; got shape {tuple(t.shape)}")
        if t.min() < 0 or t.max() >= model.d_vocab:
            raise ValueError(f"{name} holds token ids outside [0, d_vocab={model.d_vocab})")
    if len({t.shape[1] for t in tensors.values()}) != 1:
        raise ValueError(f"all contexts must have the same length; got {[tuple(t.shape) for t in tensors.values()]}")


def master_weights(params: Params, device: torch.device) -> Params:
    """fp32 detached copies of ``params`` on ``device`` (the weights every chain starts from and moves)."""
    return {k: v.detach().to(device, torch.float32) for k, v in params.items()}

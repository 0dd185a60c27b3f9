"""The adapter interface: any causal LM seen as functional parameters, a per-token loss and named components.

A ``ModelAdapter`` exposes
- ``params() -> {name: Tensor}``: the functional parameters (fp32 master weights, detached copies);
- ``per_token_loss(params, tokens [batch, seq]) -> [batch, seq-1]``: nats, position t predicts t+1,
  pure in ``params`` (``torch.func.functional_call``), so ``vmap`` can stack chains of parameters;
- ``component_names()`` and ``component_mask(name) -> {param name: index}`` where an index is a
  basic/advanced index expression (``slice(None)`` = the whole tensor) or a boolean mask.
Names follow the bundled model: ``L{l}H{h}``, ``L{l}``, ``L{l}.mlp``, ``embed``, ``pos_embed``,
``ln_final``, ``unembed``, ``full``; globs such as ``L1H*`` expand through ``expand_names``.

``ModuleAdapter`` implements all of it for an ``nn.Module`` given a few architecture hooks; the
vocabulary projection goes through ``chunked_nll``, which never holds more than ``chunk_tokens`` rows of
logits, in the forward nor in the backward pass.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.func import functional_call

from susc_core.model.chunked_nll import chunked_nll
from susc_core.model.transformer import Params
from susc_core.model.components import FULL, expand_names, layer_names, parse_name

Mask = dict[str, object]  # param name -> index expression or boolean mask
WHOLE = slice(None)


class ModelAdapter(Protocol):
    d_vocab: int  # vocabulary size (token ids must lie in [0, d_vocab))
    n_ctx: int  # longest input the model accepts (tokens per context minus one)
    loss_chunk_tokens: int  # most token rows of vocabulary logits held at once

    def params(self) -> Params: ...

    def per_token_loss(self, params: Params, tokens: torch.Tensor) -> torch.Tensor: ...

    def component_names(self) -> list[str]: ...

    def component_mask(self, name: str) -> Mask: ...


def flat_indices(mask: Mask, params: Params) -> dict[str, torch.Tensor]:
    """{param name: int64 [n] flat (row-major) indices} of the coordinates a mask selects, in params order."""
    unknown = set(mask) - set(params)
    if unknown:
        raise ValueError(f"mask names parameters the model does not have: {sorted(unknown)}")
    out = {}
    for name, value in params.items():
        if name in mask:
            ids = torch.arange(value.numel(), device=value.device).view(value.shape)[mask[name]].reshape(-1)
            out[name] = ids
    return out


def gather_indexed(params: Params, index: dict[str, torch.Tensor]) -> torch.Tensor:
    """The selected coordinates as one flat vector [dim] (in ``index`` order)."""
    return torch.cat([params[p].reshape(-1)[ids] for p, ids in index.items()])


def scatter_indexed(params: Params, index: dict[str, torch.Tensor], w: torch.Tensor) -> Params:
    """A new dict equal to ``params`` except the selected coordinates, set to ``w [dim]``.

    Out of place, differentiable in ``w`` and usable under ``vmap`` (w batched, params not).
    """
    out = dict(params)
    start = 0
    for p, ids in index.items():
        base = params[p]
        piece = w[start:start + ids.numel()].to(base.dtype)
        start += ids.numel()
        if ids.numel() == base.numel():  # the whole tensor, in order (flat_indices is row-major)
            out[p] = piece.reshape(base.shape)
        else:
            out[p] = base.reshape(-1).index_copy(0, ids, piece).reshape(base.shape)
    return out


class _Bound(torch.nn.Module):
    """Holds the children of ``module`` (so parameter names are unchanged) and runs ``fn`` as forward."""

    def __init__(self, module: torch.nn.Module, fn):
        super().__init__()
        for name, child in module.named_children():
            self.add_module(name, child)
        for name, param in module.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self._fn = fn

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._fn(tokens)


class ModuleAdapter:
    """A ``ModelAdapter`` over an ``nn.Module``. Subclasses set ``n_layers``, ``n_heads``, ``d_vocab``,
    ``n_ctx``, ``has_mlp`` and implement ``head_mask``, ``block_prefix``, ``mlp_prefix`` (one prefix of
    parameter names, or a tuple of them), ``named_masks`` ({name: Mask} of the components that are not a
    head or a block: embed, pos_embed, ln_final, unembed) and
    ``final_hidden(tokens [batch, seq]) -> (x [batch, seq, d_model], w_u [d_vocab, d_model], b_u | None)``
    computed with the module's live submodules."""

    n_layers: int
    n_heads: int
    d_vocab: int
    n_ctx: int
    has_mlp: bool = True

    def __init__(self, module: torch.nn.Module, loss_chunk_tokens: int):
        if loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be >= 1, got {loss_chunk_tokens}")
        self.module = module.eval()
        self.loss_chunk_tokens = loss_chunk_tokens
        self._bound = _Bound(module, self._loss)
        self._buffers_on: dict[torch.device, dict[str, torch.Tensor]] = {}  # the module's buffers, per device

    # architecture hooks -------------------------------------------------------------------------
    def head_mask(self, layer: int, head: int) -> Mask:
        raise NotImplementedError

    def block_prefix(self, layer: int) -> str:
        raise NotImplementedError

    def mlp_prefix(self, layer: int) -> str | tuple[str, ...]:
        raise NotImplementedError

    def named_masks(self) -> dict[str, Mask]:
        raise NotImplementedError

    def final_hidden(self, tokens: torch.Tensor):
        raise NotImplementedError

    # the interface --------------------------------------------------------------------------------
    def params(self) -> Params:
        """Every trainable parameter (tied ones once, under their first name), fp32 detached copies."""
        return {k: v.detach().float().clone() for k, v in self.module.named_parameters()}

    def name_of(self, tensor: torch.Tensor) -> str:
        """The ``params()`` name of one of the module's parameters (resolves tied weights)."""
        for name, p in self.module.named_parameters():
            if p is tensor:
                return name
        raise KeyError("tensor is not a parameter of the module")

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        x, w_u, b_u = self.final_hidden(tokens[:, :-1])
        return chunked_nll(x, w_u, b_u, tokens[:, 1:], self.loss_chunk_tokens)

    def per_token_loss(self, params: Params, tokens: torch.Tensor) -> torch.Tensor:
        """l_xy in nats: tokens [batch, seq] -> [batch, seq-1] (position t predicts t+1), float32."""
        if tokens.shape[-1] - 1 > self.n_ctx:
            raise ValueError(f"contexts of {tokens.shape[-1]} tokens exceed the model's n_ctx + 1 = {self.n_ctx + 1}")
        return functional_call(self._bound, (params, self._buffers(tokens.device)), (tokens,))

    def _buffers(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The module's buffers (rotary frequencies, causal masks) on ``device``, copied once per device: the
        module itself stays where it was loaded."""
        if device not in self._buffers_on:
            self._buffers_on[device] = {k: b.to(device) for k, b in self._bound.named_buffers()}
        return self._buffers_on[device]

    def component_names(self) -> list[str]:
        return layer_names(self.n_layers, self.n_heads, self.has_mlp) + list(self.named_masks()) + [FULL]

    def component_mask(self, name: str) -> Mask:
        """{param name: index} of the coordinates component ``name`` moves (a concrete name, not a glob)."""
        if expand_names(self.component_names(), [name]) != [name]:
            raise ValueError(f"component_mask needs one concrete name, got the glob {name!r}")
        names = [n for n, _ in self.module.named_parameters()]
        parsed = parse_name(name)
        if parsed.kind == "head":
            return self.head_mask(parsed.layer, parsed.head)
        if parsed.kind == FULL:
            return dict.fromkeys(names, WHOLE)
        if name in (named := self.named_masks()):
            return named[name]
        prefix = self.mlp_prefix(parsed.layer) if parsed.kind == "mlp" else self.block_prefix(parsed.layer)
        return {n: WHOLE for n in names if n.startswith(prefix)}

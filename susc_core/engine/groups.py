"""Loss functions for stacks of chains (the ``chains.Group`` protocol), honest and structured.

- ``CachedGroup``: any component; the residual entering the component's first block is computed
  once per context at w* and shared by every chain (it does not change in a restricted run).
- ``HonestGroup``, ``HonestHeadGroup``: the sequential reference, one chain at a time, a full forward from
  the embedding at every call, nothing cached (for a head: gradients formed for its slices only).
- ``HeadGroup``: heads of one layer, all chains on an explicit chain axis: only the moving head is
  recomputed per chain; the rest of the layer's output is cached; for heads of the last attention-only
  block the logits come through the low-rank change (``lowrank``).
Shapes: tokens [G, B, S+1] (G minibatch streams; ``chains.Rows`` maps each chain to its row); losses [k, B, S] nats,
or each chain's mean [k] with ``mean=True`` (the SGLD step's loss; the fused groups then form the
weight gradients in the forward, see ``fused_nll``).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.func import vmap

from susc_core.model import transformer as M
from susc_core.model.components import Component, scatter, unflatten
from susc_core.engine.chains import Rows, chain_rows
from susc_core.engine.fused_nll import fused_nll
from susc_core.engine.lowrank import applies as lowrank_applies, final_map, inv_sigma


def upstream(params: M.Params, cfg: M.ModelConfig, inputs: torch.Tensor, layer: int) -> torch.Tensor:
    """blocks.{layer}.hook_resid_pre at these params: inputs [n, S] -> [n, S, d_model]."""
    resid = M.embed(params, inputs)
    pos = params["pos_embed.W_pos"][:inputs.shape[-1]]
    for l in range(layer):
        resid = M.block(params, cfg, l, resid, pos)
    return resid


class CachedGroup:
    """Chains of any component, starting from the residual before the component's first block, computed
    once per context at w* (components holding W_E change that residual, so they start from their own
    embedding). Gradients flow only to the component's coordinates.

    vmap_chains: every chain on one ``vmap``-ped forward (one launch per op instead of one per chain:
    the faster form on an accelerator, where launches bound a small model). Attention then forms its
    pattern explicitly (``model.explicit_pattern_hooks``). On a CPU the per-chain loop with the fused
    kernel is faster. Both are exact.
    """

    def __init__(self, params: M.Params, cfg: M.ModelConfig, comp: Component, chunk_tokens: int,
                 vmap_chains: bool = False):
        self.params, self.cfg, self.comp, self.chunk_tokens = params, cfg, comp, chunk_tokens
        self.vmap_chains = vmap_chains
        self.explicit_pattern = M.explicit_pattern_hooks(cfg)

    def prepare(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if any(p == "embed.W_E" for p, _ in self.comp.slices):
            return tokens, None
        g, b, s1 = tokens.shape
        inputs = tokens[..., :-1].reshape(g * b, s1 - 1)
        resid = upstream(self.params, self.cfg, inputs, self.comp.layer)
        return tokens, resid.view(g, b, s1 - 1, -1)

    def losses(self, w: torch.Tensor, rows: Rows, cache, mean: bool = False) -> torch.Tensor:
        tokens, resid = (None if t is None else chain_rows(t, rows) for t in cache)
        k, shared = len(w), len(tokens) == 1
        start = 0 if resid is None else self.comp.layer

        def normed(w_i, tokens_i, resid_i, hooks=None):  # one chain's ln_final output [B, S, d_model]
            return M.final_norm(scatter(self.params, self.comp, w_i), self.cfg, tokens_i[:, :-1], hooks=hooks,
                                start_layer=start, resid=resid_i)

        tok, res = (t[0] if shared and t is not None else t for t in (tokens, resid))  # shared: one row for all
        if self.vmap_chains:
            per_chain = None if shared else 0
            x = vmap(partial(normed, hooks=self.explicit_pattern),
                     in_dims=(0, per_chain, None if res is None else per_chain))(w, tok, res)
        else:
            x = torch.stack([normed(w[i], *(t if shared or t is None else t[i] for t in (tok, res)))
                             for i in range(k)])
        x = x.reshape(k, -1, x.shape[-1])
        targets = tokens[:, :, 1:].reshape(len(tokens), -1)
        moving = unflatten(self.comp, w)
        w_u = moving.get("unembed.W_U", self.params["unembed.W_U"][None])  # [1 or k, d_model, V]
        if "unembed.b_U" not in moving:
            nll = fused_nll(x, w_u, self.params["unembed.b_U"], targets, self.chunk_tokens, mean=mean)
        else:  # a moving bias: one call per chain (fused_nll takes one beta)
            nll = torch.cat([fused_nll(x[i:i + 1], w_u[i:i + 1], moving["unembed.b_U"][i],
                                       targets[0 if shared else i][None], self.chunk_tokens, mean=mean)
                             for i in range(k)])
        return nll if mean else nll.view(k, tokens.shape[1], -1)


class HonestGroup(CachedGroup):
    """The sequential reference for any component but a head (``HonestHeadGroup``): a full forward from the
    embedding at every call, nothing cached or shared (``plan_reference`` gives each chain its own group).
    The vocabulary goes through the same fused kernel as the batched groups (``fused_nll``: one log-softmax
    pass, no recomputed logits), so the reference is a best-effort per-chain implementation and the batched
    plan's lead is its structure alone."""

    def prepare(self, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
        return tokens, None


def _project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [G, n, d] (G = 1 or k) times per-chain w [k, d, e] -> [k, n, e]; one matmul when shared."""
    k, d, e = w.shape
    if x.shape[0] == 1:
        return (x[0] @ w.permute(1, 0, 2).reshape(d, k * e)).view(-1, k, e).permute(1, 0, 2)
    return torch.bmm(x, w)


class HeadGroup:
    """Heads of one layer, one chain per row: ``heads[i]`` is the head index of chain row i.

    lowrank: take the logits of a last-block head (attention-only model) through its rank-2·d_head logit
    change (``lowrank``) instead of the shared unembedding of the final residual. Both are exact; the
    low-rank form saves matmul FLOPs (rank 2·d_head instead of d_model per chain) but not the
    vocabulary-sized softmax passes, which bound a CPU: there it is only slightly faster (default
    model: about 5% per step, 10% per observable pass), on an accelerator it saves most of the matmul.
    """

    def __init__(self, params: M.Params, cfg: M.ModelConfig, layer: int, comp: Component, heads: Sequence[int],
                 chunk_tokens: int, lowrank: bool = True):
        self.params, self.cfg, self.layer, self.comp = params, cfg, layer, comp  # comp: any head of the layer
        self.chunk_tokens = chunk_tokens  # token rows of vocabulary logits per block (speed only)
        self.heads = torch.tensor(list(heads), device=params["embed.W_E"].device)
        self.lowrank = lowrank and lowrank_applies(cfg, layer)
        p = f"blocks.{layer}.attn"
        self.w_o_star = params[f"{p}.W_O"]  # [H, E, D]
        if self.lowrank:
            self.fmap = final_map(params, cfg)
            self.m_star = self.w_o_star @ self.fmap.wc  # [H, E, V]

    def prepare(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        g, b, s1 = tokens.shape
        s, p, cfg = s1 - 1, f"blocks.{self.layer}", self.cfg
        resid = upstream(self.params, cfg, tokens[..., :-1].reshape(g * b, s), self.layer)
        x_qk, x_v = M.attention_inputs(self.params, cfg, self.layer, resid, self.params["pos_embed.W_pos"][:s])
        store = {}
        attn = M.attention(self.params, cfg, self.layer, x_qk, x_v,
                           {M.hook_name("z", self.layer): lambda z: store.setdefault("z", z)})
        cache = {"x_v": x_v, "x_qk": x_qk, "base": resid + attn, "z_star": store["z"],
                 "targets": tokens[..., 1:].reshape(g * b, s)}
        return {k: v.reshape(g, b, *v.shape[1:]) for k, v in cache.items()}

    def losses(self, w: torch.Tensor, rows: Rows, cache: dict[str, torch.Tensor], mean: bool = False) -> torch.Tensor:
        k, p = len(w), f"blocks.{self.layer}.attn"
        heads = self.heads[rows.chains]
        c = {name: chain_rows(t, rows) for name, t in cache.items()}
        g, b, s, d = c["x_v"].shape
        wt = unflatten(self.comp, w)
        flat = lambda t: t.reshape(t.shape[0], b * s, -1)  # noqa: E731
        q = (_project(flat(c["x_qk"]), wt[f"{p}.W_Q"]) + wt[f"{p}.b_Q"][:, None]).reshape(k * b, s, -1)
        kk = (_project(flat(c["x_qk"]), wt[f"{p}.W_K"]) + wt[f"{p}.b_K"][:, None]).reshape(k * b, s, -1)
        v = (_project(flat(c["x_v"]), wt[f"{p}.W_V"]) + wt[f"{p}.b_V"][:, None]).reshape(k * b, s, -1)
        z = F.scaled_dot_product_attention(q[:, None], kk[:, None], v[:, None],  # 4-D: the fused kernel
                                           is_causal=True).view(k, b * s, -1)  # [k, B*S, E]
        z_star = c["z_star"].reshape(g, b * s, self.cfg.n_heads, -1)
        z_star = z_star[0, :, heads].transpose(0, 1) if g == 1 else z_star[torch.arange(k), :, heads]  # [k, B*S, E]
        delta = torch.bmm(z, wt[f"{p}.W_O"]) - torch.bmm(z_star, self.w_o_star[heads])  # [k, B*S, D]
        resid = c["base"].reshape(g, b * s, d) + delta
        targets = c["targets"].reshape(g, b * s)
        if self.lowrank:
            factors = torch.cat([z, z_star], dim=-1)
            basis = torch.cat([wt[f"{p}.W_O"] @ self.fmap.wc, -self.m_star[heads]], dim=1)
            nll = fused_nll(factors, basis, self.fmap.beta, targets, self.chunk_tokens,
                            scale=inv_sigma(resid, self.cfg.ln_eps), base=c["base"].reshape(g, b * s, d),
                            w_base=self.fmap.wc, mean=mean)
            return nll if mean else nll.view(k, b, s)
        resid = resid.view(k * b, s, d)
        if self.cfg.d_mlp > 0:
            l = f"blocks.{self.layer}"
            x = M.layer_norm(resid, self.params[f"{l}.ln2.w"], self.params[f"{l}.ln2.b"], self.cfg.ln_eps)
            resid = resid + M.mlp(self.params, self.layer, x)
        x = M.final_norm(self.params, self.cfg, targets.new_zeros(1, s), start_layer=self.layer + 1, resid=resid)
        nll = fused_nll(x.reshape(k, b * s, d), self.params["unembed.W_U"][None], self.params["unembed.b_U"],
                        targets, self.chunk_tokens, mean=mean)
        return nll if mean else nll.view(k, b, s)


class HonestHeadGroup(HeadGroup):
    """The sequential reference for one chain of a head: ``HeadGroup``'s computation (the layer at w*, then
    the moving head recomputed with gradients for its slices only, the full unembedding) with its cache
    rebuilt from the tokens at every call, so nothing is shared between calls, steps or chains. A head
    scattered into its layer's weights (``HonestGroup``) would form the whole layer's weight gradients
    and every head's attention backward, which a per-chain implementation has no need of."""

    def __init__(self, params: M.Params, cfg: M.ModelConfig, comp: Component, chunk_tokens: int):
        super().__init__(params, cfg, comp.layer, comp, [comp.head], chunk_tokens, lowrank=False)

    def prepare(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def losses(self, w: torch.Tensor, rows: Rows, cache: torch.Tensor, mean: bool = False) -> torch.Tensor:
        with torch.no_grad():
            head_cache = super().prepare(cache)
        return super().losses(w, rows, head_cache, mean)

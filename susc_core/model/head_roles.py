"""Head-role probes: induction, previous-token and current-token scores from attention patterns, and
per-token zero-ablation loss deltas (used later to validate susceptibilities against ablations).

Scores are mean attention weights in [0, 1]; loss deltas are in nats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from susc_core.model.transformer import LOSS_CHUNK_TOKENS, ModelConfig, Params, final_norm, hook_name, per_token_loss
from susc_core.data.synthetic import repeated_random


def head_labels(cfg: ModelConfig) -> list[str]:
    """Every head's label ``L{layer}H{head}``, layer-major."""
    return [f"L{layer}H{head}" for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]


@torch.no_grad()
def attention_patterns(params: Params, cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Attention patterns of every layer for input tokens [batch, pos].

    Returns [n_layers, batch, n_heads, pos(query), pos(key)].
    """
    patterns: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(pattern: torch.Tensor) -> torch.Tensor:
            patterns[layer] = pattern
            return pattern
        return hook

    hooks = {hook_name("pattern", layer): keep(layer) for layer in range(cfg.n_layers)}
    final_norm(params, cfg, tokens, hooks)
    return torch.stack([patterns[layer] for layer in range(cfg.n_layers)])


def offset_score(pattern: torch.Tensor, offset: int, first_query: int) -> torch.Tensor:
    """Mean attention from query i to key i - offset over queries i >= first_query.

    pattern: [..., batch, n_heads, q, k]. Returns [..., n_heads].
    """
    n = pattern.shape[-1]
    queries = torch.arange(first_query, n, device=pattern.device)
    picked = pattern[..., queries, queries - offset]  # [..., batch, heads, n_queries]
    return picked.mean(dim=(-3, -1))


def induction_score(pattern: torch.Tensor, half_len: int) -> torch.Tensor:
    """Induction score on sequences whose second half repeats the first (length 2·half_len).

    Query i in the second copy should attend to key i - half_len + 1, the token after the earlier
    occurrence of the current token. pattern: [..., batch, heads, q, k] -> [..., heads].
    """
    return offset_score(pattern, half_len - 1, half_len)


def previous_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """Mean attention to position i - 1 over queries i >= 1: [..., batch, heads, q, k] -> [..., heads]."""
    return offset_score(pattern, 1, 1)


def current_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """Mean attention to position i itself over queries i >= 1 (query 0 can only attend to itself)."""
    return offset_score(pattern, 0, 1)


def head_scores(params: Params, cfg: ModelConfig, repeated_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """All three scores per head on repeated random sequences [batch, 2·half_len].

    Returns {"induction", "previous_token", "current_token"} -> [n_layers, n_heads].
    """
    half_len = repeated_tokens.shape[1] // 2
    pattern = attention_patterns(params, cfg, repeated_tokens)
    return {
        "induction": induction_score(pattern, half_len),
        "previous_token": previous_token_score(pattern),
        "current_token": current_token_score(pattern),
    }


def repeat_test_scores(params: Params, cfg: ModelConfig, generator: np.random.Generator, n_seqs: int,
                       half_len: int, vocab_low: int = 1) -> dict[str, np.ndarray]:
    """Every head's scores on ``n_seqs`` fresh sequences of random ids in [vocab_low, d_vocab) repeated
    twice (the half length is capped at n_ctx // 2). Returns score name -> [n_layers * n_heads], in
    :func:`head_labels` order."""
    half = min(half_len, cfg.n_ctx // 2)
    tokens = torch.from_numpy(repeated_random(generator, n_seqs, half, vocab_low, cfg.d_vocab))
    return {k: v.flatten().numpy() for k, v in head_scores(params, cfg, tokens).items()}


@torch.no_grad()
def ablation_loss_deltas(params: Params, cfg: ModelConfig, tokens: torch.Tensor,
                         chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Per-token zero-ablation loss deltas of every head.

    tokens: [batch, seq]. Returns [n_layers * n_heads, batch, seq - 1] (nats): loss with the head's
    output z zeroed minus the clean loss, heads in :func:`head_labels` order. chunk_tokens: as in
    ``per_token_loss``.
    """
    clean = per_token_loss(params, cfg, tokens, chunk_tokens=chunk_tokens)
    deltas = []
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            def zero_head(z: torch.Tensor, head: int = head) -> torch.Tensor:
                z = z.clone()
                z[:, :, head] = 0.0
                return z
            ablated = per_token_loss(params, cfg, tokens, {hook_name("z", layer): zero_head}, chunk_tokens)
            deltas.append(ablated - clean)
    return torch.stack(deltas)


def ablation_effects(params: Params, cfg: ModelConfig, natural_tokens: torch.Tensor,
                     repeated_tokens: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> dict[str, np.ndarray]:
    """Every head's mean zero-ablation loss increase (nats), the multigram measure's two halves.

    natural_tokens: [batch, seq] natural-text contexts (every position); repeated_tokens:
    [batch, 2·half_len] random sequences repeated twice (only the second copy's predictions, which
    copying can make). Returns {"natural", "repeat"} -> [n_layers * n_heads] in :func:`head_labels`
    order. A head that raises the natural-text loss when ablated but not the repeat loss does
    multigram (n-gram statistics) work; an induction head raises the repeat loss far more.
    """
    half = repeated_tokens.shape[1] // 2
    deltas = {name: ablation_loss_deltas(params, cfg, tokens, chunk_tokens)
              for name, tokens in (("natural", natural_tokens), ("repeat", repeated_tokens))}
    return {"natural": deltas["natural"].mean(dim=(1, 2)).numpy(),
            "repeat": deltas["repeat"][:, :, half:].mean(dim=(1, 2)).numpy()}


@dataclass
class CensusRules:
    """The rules of :func:`head_census` (a structured config: ``head_roles.census`` in the study,
    ``head_scores.census`` in training)."""

    role_threshold: float = 0.4  # an induction / previous-token score at or above this gives the role
    # natural text for the multigram measure: held-out contexts of these corpus domains
    natural_domains: list[str] = field(default_factory=lambda: ["shakespeare", "bible", "legal", "code", "docs"])
    multigram_max_induction: float = 0.15  # a multigram head's induction score is below this
    multigram_min_natural: float = 0.01  # and ablating it raises the natural-text loss by at least this (nats)


def head_census(scores: dict[str, np.ndarray], effects: dict[str, np.ndarray], rules: CensusRules) -> list[str]:
    """One measured role per head (arrays [n_heads_total] in :func:`head_labels` order):

    - ``induction`` / ``previous_token``: that attention score ≥ ``rules.role_threshold`` (induction first);
    - ``multigram``: induction score < ``rules.multigram_max_induction``, ablation raises the natural-text
      loss by ≥ ``rules.multigram_min_natural`` nats and by more than it raises the repeat loss;
    - ``other``: none of these (a head with little measured effect).
    """
    roles = []
    for i in range(len(scores["induction"])):
        if scores["induction"][i] >= rules.role_threshold:
            roles.append("induction")
        elif scores["previous_token"][i] >= rules.role_threshold:
            roles.append("previous_token")
        elif (scores["induction"][i] < rules.multigram_max_induction
              and effects["natural"][i] >= rules.multigram_min_natural and effects["natural"][i] > effects["repeat"][i]):
            roles.append("multigram")
        else:
            roles.append("other")
    return roles


def measured_roles(params: Params, cfg: ModelConfig, natural_tokens: torch.Tensor, rules: CensusRules, n_seqs: int,
                   half_len: int, score_generator: np.random.Generator, repeat_generator: np.random.Generator,
                   chunk_tokens: int = LOSS_CHUNK_TOKENS) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """Every head's attention scores (:func:`repeat_test_scores`), ablation effects (the multigram measure,
    :func:`ablation_effects`, on ``natural_tokens`` [batch, seq] and on fresh repeated random sequences) and
    role (:func:`head_census`). With no natural contexts the effects are NaN and roles come from the scores."""
    scores = repeat_test_scores(params, cfg, score_generator, n_seqs, half_len)
    half = min(half_len, cfg.n_ctx // 2)
    repeated = torch.from_numpy(repeated_random(repeat_generator, n_seqs, half, 1, cfg.d_vocab))
    n_heads = cfg.n_layers * cfg.n_heads
    effects = (ablation_effects(params, cfg, natural_tokens, repeated, chunk_tokens) if len(natural_tokens)
               else {"natural": np.full(n_heads, np.nan), "repeat": np.full(n_heads, np.nan)})
    return scores, effects, head_census(scores, effects, rules)

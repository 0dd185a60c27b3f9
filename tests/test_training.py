"""Training pieces: the head gate of a curriculum phase, the training loss, the phase schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from susc_core.model.training import (CurriculumConfig, OptimConfig, PhaseConfig, head_gate_hooks, make_optimizer,
                                      mean_loss, phase_at, train_step)
from susc_core.model.transformer import ModelConfig, Transformer, init_params, per_token_loss

CFG = ModelConfig(n_layers=2, n_heads=3, d_head=4, d_model=8, n_ctx=16, d_vocab=32)


def _model():
    return Transformer(CFG, init_params(CFG, torch.Generator().manual_seed(0)))


def test_gated_heads_get_no_gradient_and_active_heads_do():
    model = _model()
    tokens = torch.randint(0, CFG.d_vocab, (4, 12), generator=torch.Generator().manual_seed(1))
    mean_loss(model.params(), CFG, tokens, head_gate_hooks(CFG, ["L0H1", "L1H*"])).backward()
    for layer, active in ((0, {1}), (1, {0, 1, 2})):
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
            grad = dict(model.named_parameters())[f"blocks.{layer}.attn.{name}"].grad
            for head in range(CFG.n_heads):
                # a gated head's output is multiplied by 0: none of its weights gets a gradient
                assert (grad[head].abs().max().item() > 0) == (head in active), (layer, head, name)


def test_gate_equals_zeroed_output_weights():
    """Gating a head = removing its output (W_O slice zeroed), checked on the loss itself."""
    params = init_params(CFG, torch.Generator().manual_seed(2))
    tokens = torch.randint(0, CFG.d_vocab, (3, 10), generator=torch.Generator().manual_seed(3))
    zeroed = {k: v.clone() for k, v in params.items()}
    zeroed["blocks.0.attn.W_O"][[0, 2]] = 0.0
    zeroed["blocks.1.attn.W_O"][1] = 0.0
    gated = mean_loss(params, CFG, tokens, head_gate_hooks(CFG, ["L0H1", "L1H0", "L1H2"]))
    torch.testing.assert_close(gated, per_token_loss(zeroed, CFG, tokens).mean())
    assert head_gate_hooks(CFG, []) == {}  # no list: every head active, no hooks at all


def test_gate_rejects_unknown_heads():
    with pytest.raises(ValueError, match="unknown component 'L2H0'"):
        head_gate_hooks(CFG, ["L2H0"])


def test_training_loss_equals_the_models_per_token_loss():
    params = init_params(CFG, torch.Generator().manual_seed(4))
    tokens = torch.randint(0, CFG.d_vocab, (5, 9), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(mean_loss(params, CFG, tokens), per_token_loss(params, CFG, tokens).mean())


def test_train_step_with_a_gate_leaves_gated_heads_to_weight_decay_alone():
    model = _model()
    before = model.params()["blocks.1.attn.W_O"].detach().clone()
    optim = OptimConfig(lr=1e-2, weight_decay=0.0, warmup_steps=0)
    optimizer = make_optimizer(list(model.parameters()), optim)
    tokens = torch.randint(0, CFG.d_vocab, (4, 12), generator=torch.Generator().manual_seed(6))
    loss = train_step(model, optimizer, tokens, optim, 0, head_gate_hooks(CFG, ["L1H0"]))
    assert np.isfinite(loss)
    after = model.params()["blocks.1.attn.W_O"].detach()
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1:], before[1:])


def test_phase_schedule():
    curriculum = CurriculumConfig(phases=[PhaseConfig(steps=3, active_heads=["L1H0"]), PhaseConfig(steps=2)])
    assert [phase_at(curriculum, s).active_heads for s in range(6)] == [["L1H0"]] * 3 + [[]] * 3


def _train_cfg(out_dir, corpus_dir, steps: int):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import workflows.train_model  # noqa: F401  (registers the schema)

    with initialize_config_module(version_base="1.3", config_module="conf"):
        cfg = compose("train_model", overrides=[
            "arch=tiny", f"out_dir={out_dir}", f"corpus_dir={corpus_dir}", "device=cpu", "notes_file=null",
            "curriculum.batch_size=4", f"curriculum.phases=[{{steps: 2, seq_len: 8, synthetic_share: 1.0, "
            f"active_heads: [L0H1, L1H0]}}, {{steps: {steps - 2}, seq_len: 16, synthetic_share: 0.0}}]",
            "eval_every=2", "checkpoint_every=2", "eval_contexts=2", "head_scores.n_seqs=2", "head_scores.half_len=4",
            "head_scores.natural_contexts=2"])
    return OmegaConf.to_object(cfg)


def test_training_resumes_bitwise_and_writes_its_card(tmp_path, corpus_dir):
    from susc_core.model.checkpoint import load_model
    from workflows.train_model import train

    straight = train(_train_cfg(tmp_path / "straight", corpus_dir, 6))
    train(_train_cfg(tmp_path / "resumed", corpus_dir, 4))  # stops after step 4 (a checkpoint) ...
    resumed = train(_train_cfg(tmp_path / "resumed", corpus_dir, 6))  # ... and the same command with 6 steps resumes
    assert resumed["steps"] == straight["steps"] == 6 and resumed["tokens_seen"] == straight["tokens_seen"]
    _, a = load_model(tmp_path / "straight" / "model.safetensors")
    _, b = load_model(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["sha256"] == straight["sha256"] and resumed["roles"] == straight["roles"]
    card = (tmp_path / "resumed" / "MODEL_CARD.md").read_text()
    assert "| L1H1 |" in card and "## Held-out loss per domain" in card

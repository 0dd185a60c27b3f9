"""The benchmarks' FLOP counts and their plumbing (the benchmarks themselves run by hand, not in CI)."""

from pathlib import Path

import pytest

from benchmarks.engine import executed_flops, matmul_peak, reference_flops
from susc_core.model import ModelConfig
from susc_core.sgld import SamplerConfig

CFG = ModelConfig()  # the default model's shapes
SAMPLER = SamplerConfig(step_size=1e-3, nbeta=30.0, gamma=300.0, batch_size=16)
SEQ, OBS_TOKENS = 128, 16 * 128


def test_full_run_alone_executes_the_reference_work():
    """Nothing is shared for the full run: both counts are one full forward, the unembedding's input and
    weight gradients and every block's backward (2x its forward) per step token, one forward per observable."""
    forward = CFG.n_layers * (2 * 4 * CFG.d_model * CFG.n_heads * CFG.d_head + 2 * 2 * SEQ * CFG.n_heads * CFG.d_head) \
        + 2 * CFG.d_model * CFG.d_vocab
    expected = 3 * forward * SAMPLER.batch_size * SEQ + forward * OBS_TOKENS
    assert reference_flops(CFG, SAMPLER, SEQ, OBS_TOKENS, []) == pytest.approx(expected)
    assert executed_flops(CFG, SAMPLER, SEQ, OBS_TOKENS, []) == pytest.approx(expected)


@pytest.mark.parametrize("layer,lowest,highest", [(0, 1.0, 1.1), (1, 3.0, 3.5)])
def test_structure_saves_flops_where_it_is_exact(layer, lowest, highest):
    """A layer-0 head saves only layer 0's forward (its change reaches the unembedding in full rank); a
    last-layer head of an attention-only model takes its logits through the rank-2·d_head change."""
    heads = [layer] * CFG.n_heads
    full = reference_flops(CFG, SAMPLER, SEQ, OBS_TOKENS, [])
    per_head = [(f(CFG, SAMPLER, SEQ, OBS_TOKENS, heads) * (len(heads) + 1) - full) / len(heads)
                for f in (reference_flops, executed_flops)]
    assert lowest < per_head[0] / per_head[1] < highest


def test_matmul_peak_measures_a_positive_rate():
    assert matmul_peak("cpu", 64, reps=2) > 0


def test_study_flop_count_reads_the_default_study(tmp_path: Path):
    from benchmarks.study import study_config, study_flops

    cfg = study_config(tmp_path / "run", tmp_path / "cache", ["sampler.n_draws=2"])
    assert study_flops(cfg) == pytest.approx(executed_flops(
        CFG, cfg.sampler, SEQ, (cfg.data.observable_contexts + cfg.perturbation.contexts_per_probe
                                * len(cfg.perturbation.probes)) * SEQ, [0] * 8 + [1] * 8) * 17 * 4 * 2)

"""The benchmarks' FLOP counts against what the code executes (torch's FlopCounterMode), and their plumbing
(the benchmarks themselves run by hand, not in CI)."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count,
                                      sdpa_flop_count)

from benchmarks.engine import group_flops, matmul_peak, unit_flops
from susc_core.engine.chains import Rows, pass_rows
from susc_core.model.components import component, gather
from susc_core.engine.reference import plan_reference
from susc_core.engine.groups import CachedGroup, HeadGroup
from susc_core.model.transformer import ModelConfig, init_params

# torch's counter knows the CUDA attention kernels only; the CPU flash kernels do the same products
_SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _SDPA_CPU.default not in flop_registry:
    register_flop_formula(_SDPA_CPU)(lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
    register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)(
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v))

# vocabulary blocks of one chain's tokens (as on a CPU): the scale Jacobian's row dot is then a counted product
CFG = ModelConfig(n_layers=2, n_heads=4, d_head=8, d_model=32, n_ctx=16, d_vocab=64)
CHUNK = 16
CFG_MLP = replace(CFG, d_mlp=48)
STEP_CONTEXTS, OBS_CONTEXTS, CHAINS = 3, 1, 2


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _measured(group, cfg, params, k: int, passes: list[Rows]) -> tuple[float, float]:
    """(step, observable) FLOPs per token and chain of ``group`` with k chains evaluated in ``passes``, as the
    engine calls it: one cache per step shared by the passes; fixed contexts prepared once per run."""
    gen = torch.Generator().manual_seed(0)
    streams = int(passes[0].tokens.max()) + 1  # minibatch streams of a step (fixed contexts: one)
    step_tokens, obs_tokens = (torch.randint(0, cfg.d_vocab, (g, n, cfg.n_ctx + 1), generator=gen)
                               for g, n in ((streams, STEP_CONTEXTS), (1, OBS_CONTEXTS)))
    w = gather(params, group.comp).expand(k, -1).clone()

    def step():
        with torch.no_grad():
            cache = group.prepare(step_tokens)
        for rows in passes:
            leaf = w[rows.chains].requires_grad_()
            torch.autograd.grad(group.losses(leaf, rows, cache, mean=True).sum(), leaf)

    with torch.no_grad():
        cache = group.prepare(obs_tokens)
        obs = _counted(lambda: [group.losses(w[rows.chains], rows, cache) for rows in passes])
    return (_counted(step) / (STEP_CONTEXTS * cfg.n_ctx * k), obs / (OBS_CONTEXTS * cfg.n_ctx * k))


@pytest.mark.parametrize("cfg", [CFG, CFG_MLP])
@pytest.mark.parametrize("name", ["L0H1", "L1H2", "full"])
@pytest.mark.parametrize("plan", ["reference", "batched"])
def test_flop_counts_equal_what_the_groups_execute(cfg, name, plan):
    """Batched heads: 8 chains share the layer's cache, in two passes of 4 (the low-rank path shares its logit
    product per pass), with step and observable calls of different lengths (its basis is formed per call)."""
    params = init_params(cfg, torch.Generator().manual_seed(1))
    comp = component(cfg, name)
    layer = None if name == "full" else comp.layer
    if plan == "reference":
        group, k = plan_reference(params, cfg, [name], [0], CHUNK)[0][0], 1
    elif layer is None:
        group, k = CachedGroup(params, cfg, comp, CHUNK), CHAINS
    else:
        k = cfg.n_heads * CHAINS
        group = HeadGroup(params, cfg, layer, comp, [h for h in range(cfg.n_heads) for _ in range(CHAINS)], CHUNK)
    passes = pass_rows(torch.zeros(k, dtype=torch.long), (k + 1) // 2)
    expected = group_flops(cfg, cfg.n_ctx, layer, plan, shared_by=k, pass_rows=(passes[0].chains.stop,) * 2,
                           call_tokens=(STEP_CONTEXTS * cfg.n_ctx, OBS_CONTEXTS * cfg.n_ctx))
    assert _measured(group, cfg, params, k, passes) == pytest.approx(tuple(expected), rel=1e-9)


@pytest.mark.parametrize("name", ["L0H1", "L1H2"])
def test_flop_counts_with_one_minibatch_stream_per_chain_index(name):
    """Independent streams: chain c of every head reads stream c, so the layer's cache is shared by its heads
    (per stream) and the low-rank path forms each chain's base logits (no sharing within a pass)."""
    cfg = CFG
    params = init_params(cfg, torch.Generator().manual_seed(1))
    comp = component(cfg, name)
    k = cfg.n_heads * CHAINS
    group = HeadGroup(params, cfg, comp.layer, comp, [h for h in range(cfg.n_heads) for _ in range(CHAINS)], CHUNK)
    passes = pass_rows(torch.arange(k) % CHAINS, (k + 1) // 2)
    expected = group_flops(cfg, cfg.n_ctx, comp.layer, "batched", shared_by=cfg.n_heads, pass_rows=(1, (k + 1) // 2),
                           call_tokens=(STEP_CONTEXTS * cfg.n_ctx, OBS_CONTEXTS * cfg.n_ctx))
    assert _measured(group, cfg, params, k, passes) == pytest.approx(tuple(expected), rel=1e-9)


def test_structure_saves_flops_on_the_default_model():
    """Layer-0 heads save only layer 0's forward (their change reaches the unembedding in full rank); a
    last-layer head of an attention-only model takes its logits through the rank-2·d_head change."""
    cfg, seq = ModelConfig(), 128
    batched = [group_flops(cfg, seq, l, "batched", 32, (32, 32), (2048, 256)) for l in (0, 1)]
    ratio = [group_flops(cfg, seq, l, "reference").step / batched[l].step for l in (0, 1)]
    assert 1.0 < ratio[0] < 1.2 and 2.5 < ratio[1] < 3.5


def test_matmul_peak_divides_the_products_it_runs_by_their_time(monkeypatch):
    """On a fake clock (2 s between its two readings), the rate is the timed products' FLOPs / 2 s, and torch's
    counter sees those products plus the three warm-up ones."""
    import benchmarks.engine as engine

    clock = iter([10.0, 12.0])
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock))
    with FlopCounterMode(display=False) as counter:
        rate = matmul_peak("cpu", 64, reps=4)
    assert counter.get_total_flops() == 2 * 64 ** 3 * (4 + 3)
    assert rate == 2 * 64 ** 3 * 4 / 2.0


def test_study_flop_count_reads_the_default_study(tmp_path: Path):
    from benchmarks.study import study_config, study_flops

    cfg = study_config(tmp_path / "run", tmp_path / "cache", ["sampler.n_draws=2"])
    seq, model = 128, ModelConfig()
    probe_contexts = cfg.perturbation.contexts_per_probe * len(cfg.perturbation.probes)
    obs_tokens = (cfg.data.observable_contexts + probe_contexts) * seq
    per_unit = unit_flops(model, cfg.sampler, seq, obs_tokens, [0] * 8 + [1] * 8, "batched", cfg.model.loss_chunk_tokens,
                          cfg.units.chains_per_unit)
    assert study_flops(cfg) == pytest.approx(per_unit * 17 * cfg.sampler.n_chains * 2)


@pytest.mark.parametrize("name", ["L0H1", "L1H3", "full"])
def test_devinterp_restriction_masks_the_components_coordinates(name):
    """The weight restriction handed to devinterp moves exactly the coordinates our engine moves."""
    from benchmarks.vs_devinterp import DevinterpModel, head_masks
    from susc_core.model.components import scatter

    params = init_params(CFG, torch.Generator().manual_seed(2))
    masks = head_masks(CFG, DevinterpModel(CFG, params), name)
    comp = component(CFG, name)
    assert sum(int(m.sum()) for m in masks.values()) == comp.dim
    moved = scatter(params, comp, gather(params, comp) + 1.0)  # every coordinate of the component, +1
    for key, value in params.items():
        changed = moved[key] != value
        assert torch.equal(changed, masks.get(key, torch.zeros_like(changed)))


def test_cost_scaling_fit_recovers_a_line_and_flags_a_bend():
    import numpy as np

    from benchmarks.cost_scaling import line_fit, sweep

    x = np.asarray([4096.0, 8192, 16384, 32768, 65536])
    exact = line_fit(x, 2.0 + 1e-3 * x)
    assert exact["slope"] == pytest.approx(1e-3) and exact["intercept"] == pytest.approx(2.0)
    assert exact["r2"] == pytest.approx(1.0) and exact["max_rel_deviation"] < 1e-9
    bent = line_fit(x, 2.0 + 1e-8 * x ** 2)  # quadratic growth: the line misses the points by tens of percent
    assert bent["max_rel_deviation"] > 0.3
    points = [{"draws": d, "wall_s": 1.0 + d, "memory_before_mib": 100.0, "memory_peak_mib": 100.0 + m}
              for d, m in ((10, 50.0), (100, 60.0))]
    assert sweep(points, "draws")["working_memory_max_over_min"] == pytest.approx(1.2)

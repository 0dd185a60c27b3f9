"""Side by side with devinterp 2.0.1 (``pip install -e .[devinterp]``): the same model, data, settings and threads.

    python benchmarks/vs_devinterp.py [--threads 2] [--draws 5] [--device cpu]

The work of issue 19: every head + the full run, 4 chains x ``--draws`` draws, minibatches of 16 contexts of
129 tokens, ε 1e-3, nβ 30, γ 300, 16 observable and 32 probe contexts per draw. devinterp gets the bundled
model as a plain ``nn.Module`` (``transformer.Transformer``: the same weights and forward, fused causal
attention) and a loss function returning its per-token losses; the script first checks that devinterp's
model and our engine's reference compute the same per-token losses at w*. Rates are component·chain·draws
per second, each timed once after a one-draw warm-up; devinterp's L_n(w*) is taken on one batch of 16
contexts (``num_init_loss_batches``; its default 32 batches per restriction is work our engine does not do). Prints ONE JSON object as its last line (rates,
``speedup_vs_devinterp``, the fp32 and bf16 matmul peaks of ``benchmarks/engine.py``, the FLOPs per unit of work
our batched engine executes and a dense full-forward plan executes (a lower bound of devinterp's), each side's
fraction of the fp32 peak, and ``speedup_ceiling_at_fp32_peak``: the speedup our FLOP count would give with
every FLOP at the fp32 matmul peak, the most this machine allows without fewer FLOPs or lower precision).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import matmul_peak, model, unit_flops  # noqa: E402
from susc_core.engine.inputs import UnitContexts  # noqa: E402
from susc_core.engine.unit import run_unit  # noqa: E402
from susc_core.engine.sgld import SamplerConfig  # noqa: E402
from susc_core.model.components import component  # noqa: E402
from susc_core.model.transformer import Transformer, per_token_loss  # noqa: E402
from workflows.study_config import ModelSection  # noqa: E402

OBS_CONTEXTS, PROBE_CONTEXTS, BATCH = 16, 32, 16


class DevinterpModel(Transformer):
    """The bundled model as devinterp drives it: its samplers call ``model.to(device, print_details=...)``
    (TransformerLens' signature)."""

    def to(self, *args, print_details: bool = False, **kwargs):
        return super().to(*args, **kwargs)


def head_masks(cfg, module: torch.nn.Module, name: str) -> dict[str, torch.Tensor | None]:
    """devinterp's weight restriction of component ``name``: a bool mask per parameter it moves."""
    masks = {}
    for param, head in component(cfg, name).slices:
        mask = torch.zeros_like(module.get_parameter(param), dtype=torch.bool)
        if head is None:
            mask[...] = True
        else:
            mask[head] = True
        masks[param] = mask
    return masks


def run_devinterp(cfg, params, train, obs, probe, sampler: SamplerConfig, names: list[str]) -> float:
    """Seconds of devinterp's ``susceptibilities`` for ``names`` (+ full) with ``sampler``'s settings."""
    from datasets import Dataset
    from devinterp.slt.susceptibilities import susceptibilities

    module = DevinterpModel(cfg, params)
    data = {key: Dataset.from_dict({"input_ids": t.tolist()}).with_format("torch") for key, t in
            (("train", train), ("obs", obs), ("probe", probe))}
    restrictions = {"full": None, **{name: head_masks(cfg, module, name) for name in names}}
    start = time.perf_counter()
    susceptibilities(module, data["train"], {"obs": (data["obs"], OBS_CONTEXTS // BATCH),
                                             "probe": (data["probe"], PROBE_CONTEXTS // BATCH)},
                     restrictions, sampling_task="obs", lr=sampler.step_size, n_beta=sampler.nbeta,
                     loss_fn=lambda m, ids: m(ids), num_chains=sampler.n_chains, num_draws=sampler.n_draws,
                     batch_size=BATCH, localization=sampler.gamma, num_init_loss_batches=OBS_CONTEXTS // BATCH,
                     device="cpu")
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draws", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, params, source = model()
    chunk = ModelSection().loss_chunk_tokens
    gen = torch.Generator().manual_seed(1)
    train, obs, probe = (torch.randint(0, cfg.d_vocab, (n, cfg.n_ctx + 1), generator=gen)
                         for n in (256, OBS_CONTEXTS, PROBE_CONTEXTS))
    module = Transformer(cfg, params)
    with torch.no_grad():
        gap = (module(probe) - per_token_loss(params, cfg, probe, chunk_tokens=chunk)).abs().max().item()
    names = [f"L{l}H{h}" for l in range(cfg.n_layers) for h in range(cfg.n_heads)]
    sampler = SamplerConfig(step_size=1e-3, nbeta=30.0, gamma=300.0, n_chains=4, n_draws=args.draws,
                            batch_size=BATCH)
    warm = SamplerConfig(**{**sampler.__dict__, "n_draws": 1})
    contexts = UnitContexts(train, obs, probe)
    run_unit(cfg, params, ["L0H0", "full"], [0], warm, contexts, seed=0, chunk_tokens=chunk)
    start = time.perf_counter()
    run_unit(cfg, params, names + ["full"], list(range(sampler.n_chains)), sampler, contexts, seed=0, chunk_tokens=chunk)
    ours = time.perf_counter() - start
    run_devinterp(cfg, params, train, obs, probe, warm, names[:1])
    theirs = run_devinterp(cfg, params, train, obs, probe, sampler, names)
    work = (len(names) + 1) * sampler.n_chains * sampler.n_draws
    peak, peak_bf16 = matmul_peak("cpu"), matmul_peak("cpu", dtype=torch.bfloat16)
    flops = {plan: unit_flops(cfg, sampler, cfg.n_ctx, (OBS_CONTEXTS + PROBE_CONTEXTS) * cfg.n_ctx,
                              [component(cfg, n).layer for n in names], plan, chunk) for plan in ("batched", "reference")}
    executed, dense = flops["batched"], flops["reference"]  # dense: a full forward per chain, as devinterp runs
    print(json.dumps({"model": source, "threads": args.threads, "draws": args.draws,
                      "per_token_loss_max_abs_diff_at_w_star": gap,
                      "ours_units_per_s": work / ours, "devinterp_units_per_s": work / theirs,
                      "speedup_vs_devinterp": theirs / ours,
                      "matmul_peak_flops_fp32": peak, "matmul_peak_flops_bf16": peak_bf16,
                      "ours_executed_flops_per_unit": executed,
                      "ours_fraction_of_fp32_peak": executed * work / ours / peak,
                      "dense_flops_per_unit": dense,
                      "devinterp_dense_fraction_of_fp32_peak": dense * work / theirs / peak,
                      # the largest speedup our FLOPs allow on this machine: all of them at the fp32 matmul peak
                      "speedup_ceiling_at_fp32_peak": (peak / executed) / (work / theirs)}))


if __name__ == "__main__":
    main()

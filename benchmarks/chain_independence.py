"""How honest is the across-chain standard error with shared and with independent minibatch streams?

    python benchmarks/chain_independence.py [--repeats 4] [--workers 2] [hydra overrides of the study ...]

On the default study's model, data and sampler (its contexts chosen by the study's ``seed``), the chains
of every component are run ``--repeats`` times with different chain seeds, once with
``sampler.share_minibatches=true`` (every chain reads one minibatch stream) and once with the default
independent streams (chain k of every component reads stream k). Units are the study's (one chain index
of every component per unit), run side by side in ``--workers`` processes of one torch thread, the two
modes interleaved so they share the machine's noise.

For each mode and component: the across-chain SE of per-token χ̂ that one study reports (root mean square
over the repeats and probe tokens) against the reference SE, the spread of χ̂ across the independent
repeats (its standard deviation, root mean square over tokens); their ratio is 1 for an honest SE.
``se_without_centring``: the spread of per-chain χ̂ centred on the pooled full run, the SE without the
full run's own noise (what ``estimators`` reported before it added that term). Also
split-R-hat of g (median and max over components and repeats) and the rate in component·chain·draws/s.
Prints ONE JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.study import study_config  # noqa: E402
from susc_core.stats.chain_stats import pool  # noqa: E402
from susc_core.stats.estimators import chi_from_sums, convergence, per_token_chi  # noqa: E402

MODES = {"shared": True, "independent": False}


def _unit(job: tuple) -> tuple:
    """One study unit (every component, one chain) in a worker process: (mode, repeat, chain, stats, seconds)."""
    import torch

    from susc_core.engine.inputs import UnitContexts
    from susc_core.engine.unit import run_unit

    mode, repeat, chain, seed, inputs, components, sampler = job
    torch.set_num_threads(1)
    start = time.perf_counter()
    contexts = UnitContexts(inputs["train"], inputs["obs"], inputs["probe"])
    stats = run_unit(inputs["model_cfg"], inputs["w_star"], components, [chain], sampler, contexts, seed,
                     chunk_tokens=inputs["chunk_tokens"])
    return mode, repeat, chain, stats, time.perf_counter() - start


def per_chain_spread(values: list[np.ndarray]) -> np.ndarray:
    """Standard error of the mean of per-chain estimates [T] each: their std (ddof 1) / sqrt(chains)."""
    return np.std(values, axis=0, ddof=1) / np.sqrt(len(values))


def summarize(runs: dict, components: list[str], n_chains: int) -> dict:
    """runs[(mode, repeat)] = {(component, chain): ChainStats} -> per-mode SE ratios and R-hat."""
    out = {}
    for mode in MODES:
        repeats = sorted(r for m, r in runs if m == mode)
        chi, se, se_uncentred, rhat = [], [], [], []
        for r in repeats:
            stats = runs[(mode, r)]
            full = [stats[("full", c)] for c in range(n_chains)]
            f = pool(full)
            estimates = [per_token_chi([stats[(name, c)] for c in range(n_chains)], full) for name in components]
            chi.append(np.stack([e.value for e in estimates]))  # [components, T]
            se.append(np.stack([e.se for e in estimates]))
            # the spread of per-chain χ̂ centred on the pooled full run: the SE without the centring's noise
            se_uncentred.append(np.stack([per_chain_spread([
                chi_from_sums(s.sum_ga, s.sum_g, s.count, f.sum_a, f.count)
                for s in (stats[(name, c)] for c in range(n_chains))]) for name in components]))
            rhat += [convergence([stats[(name, c)] for c in range(n_chains)]).rhat for name in components + ["full"]]
        chi = np.stack(chi)  # [repeats, components, T]
        reference = np.sqrt(chi.var(axis=0, ddof=1).mean(axis=1))  # per component
        ratio, uncentred = (np.sqrt((np.stack(s) ** 2).mean(axis=(0, 2))) / reference for s in (se, se_uncentred))
        out[mode] = {"se_reported_over_reference_median": float(np.median(ratio)),
                     "se_reported_over_reference_min": float(ratio.min()),
                     "se_reported_over_reference_max": float(ratio.max()),
                     "se_reported_over_reference": dict(zip(components, ratio.round(3).tolist())),
                     "se_without_centring_over_reference_median": float(np.median(uncentred)),
                     "rhat_median": float(np.median(rhat)), "rhat_max": float(np.max(rhat)),
                     "rhat_share_le_1.1": float(np.mean(np.asarray(rhat) <= 1.1))}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=4, help="independent chain seeds per mode (>= 2)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="processes, one torch thread each")
    ap.add_argument("--first-seed", type=int, default=100, help="chain seed of the first repeat")
    ap.add_argument("overrides", nargs="*", help="hydra overrides of the study (e.g. sampler.n_draws=10)")
    args = ap.parse_args()
    if args.repeats < 2:
        raise SystemExit("--repeats must be >= 2: the reference SE is the spread across repeats")
    import tempfile

    from susc_core.model.components import expand_names
    from workflows.study_data import load_inputs

    with tempfile.TemporaryDirectory() as tmp:
        cfg = study_config(Path(tmp) / "run", Path(tmp) / "cache", args.overrides)
    inputs = load_inputs(cfg)
    components = [c for c in expand_names(inputs.component_names, list(cfg.components.names)) if c != "full"]
    shipped = {"model_cfg": inputs.model_cfg, "w_star": inputs.w_star, "train": inputs.train, "obs": inputs.obs,
               "probe": inputs.probe, "chunk_tokens": cfg.model.loss_chunk_tokens}
    n_chains = cfg.sampler.n_chains
    jobs = [(mode, r, c, args.first_seed + r, shipped, components + ["full"],
             replace(cfg.sampler, share_minibatches=shared))
            for r in range(args.repeats) for c in range(n_chains) for mode, shared in MODES.items()]
    runs, seconds = {}, {mode: 0.0 for mode in MODES}
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        for done, (mode, r, c, stats, wall) in enumerate(pool.map(_unit, jobs), 1):
            runs.setdefault((mode, r), {}).update(stats)
            seconds[mode] += wall
            left = (time.perf_counter() - start) / done * (len(jobs) - done)
            print(f"[{done}/{len(jobs)}] {mode} repeat {r} chain {c}: {wall:.1f} s; about {left / 60:.1f} min left",
                  file=sys.stderr, flush=True)
    work = (len(components) + 1) * n_chains * cfg.sampler.n_draws * args.repeats
    result = {"study": {"components": len(components) + 1, "chains": n_chains, "draws": cfg.sampler.n_draws,
                        "probe_tokens": int(inputs.probe[:, 1:].numel()), "data_seed": cfg.seed,
                        "overrides": args.overrides},
              "repeats": args.repeats, "workers": args.workers, "cpu_count": os.cpu_count(),
              **summarize(runs, components, n_chains),
              "units_per_s": {mode: work / seconds[mode] for mode in MODES},
              "independent_cost_ratio": seconds["independent"] / seconds["shared"]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

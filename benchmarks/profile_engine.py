"""Where the engine's time goes: torch.profiler tables of one batched group and of its sequential reference.

    python benchmarks/profile_engine.py [--device cpu|cuda] [--components L1H*] [--chains 4] [--draws 2]
                                        [--chunk-tokens N] [--rows 25]

Profiles ``run_unit`` on the default model with the settings of ``benchmarks/engine.py`` (random contexts,
batch 16, 8 + 8 observable contexts) after a warm-up, and prints the top operators by self time on the
device (CUDA) or the CPU. Last line: one JSON object with the wall seconds of both runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine import model  # noqa: E402
from susc_core.engine.inputs import UnitContexts  # noqa: E402
from susc_core.engine.unit import run_unit  # noqa: E402
from susc_core.engine.sgld import SamplerConfig  # noqa: E402
from workflows.study_config import ModelSection  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--components", nargs="+", default=["L1H*"])
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--contexts", type=int, default=8, help="observable and probe contexts (each)")
    ap.add_argument("--chunk-tokens", type=int, default=ModelSection().loss_chunk_tokens,
                    help="rows of vocabulary logits per block (default: the study's model.loss_chunk_tokens)")
    ap.add_argument("--rows", type=int, default=25, help="operators shown per table")
    args = ap.parse_args()
    cfg, params, _ = model()
    gen = torch.Generator().manual_seed(1)
    train, obs, probe = (torch.randint(0, cfg.d_vocab, (n, cfg.n_ctx + 1), generator=gen)
                         for n in (256, args.contexts, args.contexts))
    sampler = SamplerConfig(step_size=1e-3, nbeta=30.0, gamma=300.0, n_chains=args.chains, n_draws=args.draws,
                            batch_size=16)
    chains = list(range(args.chains))
    cuda = torch.device(args.device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    wall = {}
    for mode in ("batched", "reference"):
        run_unit(cfg, params, args.components, chains, sampler, UnitContexts(train, obs, probe), seed=0, device=args.device,
                 mode=mode, chunk_tokens=args.chunk_tokens)  # warm-up
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            run_unit(cfg, params, args.components, chains, sampler, UnitContexts(train, obs, probe), seed=0, device=args.device,
                     mode=mode, chunk_tokens=args.chunk_tokens)
            wall[mode] = time.perf_counter() - start
        print(f"== {mode}: {wall[mode]:.3f} s wall, {args.components} x {args.chains} chains x {args.draws} draws")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    print(json.dumps({"device": args.device, "components": args.components, "chunk_tokens": args.chunk_tokens,
                      "wall_s": wall}))


if __name__ == "__main__":
    main()

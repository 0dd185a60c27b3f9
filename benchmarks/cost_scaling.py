"""How the engine's cost grows: wall time against probe tokens and against draws, memory against draws.

    python benchmarks/cost_scaling.py [--tokens 4096 8192 16384 32768 65536] [--draws 10 25 50 100]
                                      [--fixed-draws 10] [--fixed-tokens 4096] [--components L0H0 L1H0 full]
                                      [--threads 1] [--device cpu]

Each point is ``run_unit`` on the default model (one chain of each of ``--components``, batch 16 × 128 tokens,
16 observable contexts, random token ids: the cost does not depend on their values) in a fresh subprocess,
so its peak memory is its own (RSS on a CPU, ``torch.cuda.max_memory_allocated`` on a GPU); the time excludes
start-up and model loading. The token sweep holds the draws at ``--fixed-draws``, the draw sweep the tokens
at ``--fixed-tokens``. For each sweep: a least-squares line time = a + b·x, its r², the largest relative
deviation of a point from the line, and the working memory (peak minus the memory before the unit ran)
at each point; memory should be flat in draws (statistics stream) and linear in tokens (per-token sums).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import model, sync  # noqa: E402
from susc_core.engine.inputs import UnitContexts  # noqa: E402
from susc_core.engine.memory import peak_memory_mib, reset_peak_memory  # noqa: E402
from susc_core.engine.sgld import SamplerConfig  # noqa: E402
from susc_core.engine.unit import run_unit  # noqa: E402
from workflows.study_config import ModelSection  # noqa: E402

TRAIN_CONTEXTS, OBS_CONTEXTS, BATCH = 256, 16, 16


def one_point(tokens: int, draws: int, components: list[str], device: str) -> dict:
    """Wall seconds and memory (MiB: before the unit, peak) of one unit: one chain of each component,
    ``draws`` draws, ``tokens`` probe tokens (rounded up to whole contexts of the model's n_ctx)."""
    cfg, params, _ = model()
    seq = cfg.n_ctx
    generator = torch.Generator().manual_seed(0)
    contexts = lambda n: torch.randint(0, cfg.d_vocab, (n, seq + 1), generator=generator)  # noqa: E731
    train, obs, probe = contexts(TRAIN_CONTEXTS), contexts(OBS_CONTEXTS), contexts(-(-tokens // seq))
    sampler = SamplerConfig(step_size=1e-3, nbeta=30.0, gamma=300.0, n_chains=1, n_draws=draws, batch_size=BATCH)
    chunk = ModelSection().cuda_loss_chunk_tokens if torch.device(device).type == "cuda" else ModelSection().loss_chunk_tokens
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    if kind == "cuda":
        reset_peak_memory("cuda")
    before = torch.cuda.memory_allocated() / 2**20 if kind == "cuda" else peak_memory_mib("cpu")
    sync(device)
    start = time.perf_counter()
    run_unit(cfg, params, components, [0], sampler, UnitContexts(train, obs, probe), seed=0, device=device, chunk_tokens=chunk)
    sync(device)
    return {"tokens": probe[:, 1:].numel(), "draws": draws, "wall_s": time.perf_counter() - start,
            "memory_before_mib": before, "memory_peak_mib": peak_memory_mib(kind)}


def measure(tokens: int, draws: int, args) -> dict:
    """``one_point`` in a fresh subprocess (its own peak memory)."""
    command = [sys.executable, __file__, "--child", str(tokens), str(draws), "--threads", str(args.threads),
               "--device", args.device, "--components", *args.components]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    point = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"tokens {point['tokens']:>6} draws {draws:>4}: {point['wall_s']:8.2f} s, working memory "
          f"{point['memory_peak_mib'] - point['memory_before_mib']:.0f} MiB", file=sys.stderr)
    return point


def line_fit(x: np.ndarray, y: np.ndarray) -> dict:
    """Least-squares y = a + b·x: intercept, slope, r² and the largest |y - fit| / y over the points."""
    slope, intercept = np.polyfit(x, y, 1)
    fit = intercept + slope * x
    r2 = 1 - ((y - fit) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    return {"intercept": float(intercept), "slope": float(slope), "r2": float(r2),
            "max_rel_deviation": float(np.max(np.abs(y - fit) / y))}


def sweep(points: list[dict], key: str) -> dict:
    """The sweep's points, the line through its wall times, and its working memory per point."""
    x = np.asarray([p[key] for p in points], dtype=float)
    wall = np.asarray([p["wall_s"] for p in points])
    working = [p["memory_peak_mib"] - p["memory_before_mib"] for p in points]
    return {"points": points, "wall_time_fit": line_fit(x, wall), "working_memory_mib": working,
            "working_memory_max_over_min": max(working) / max(min(working), 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--draws", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--fixed-draws", type=int, default=10)
    parser.add_argument("--fixed-tokens", type=int, default=4096)
    parser.add_argument("--components", nargs="+", default=["L0H0", "L1H0", "full"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", type=int, nargs=2, metavar=("TOKENS", "DRAWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(one_point(*args.child, args.components, args.device)))
        return
    by_tokens = sweep([measure(t, args.fixed_draws, args) for t in args.tokens], "tokens")
    by_draws = sweep([measure(args.fixed_tokens, d, args) for d in args.draws], "draws")
    print(json.dumps({"device": args.device, "threads": args.threads, "components": args.components, "chains": 1,
                      "batch_size": BATCH, "observable_contexts": OBS_CONTEXTS,
                      "tokens_sweep": by_tokens, "draws_sweep": by_draws}))


if __name__ == "__main__":
    main()

"""Benchmark of the estimator engine on the default model; prints ONE JSON object as its last line.

    python benchmarks/engine.py [--device cpu|cuda] [--draws 2] [--obs 8] [--probe 8] [--threads N] [--chunk-tokens 256]
                                [--cpu-sequential-threads N]

Measures component·chain·draws per second of the batched engine (every head + full, 4 chains in one unit;
with independent minibatch streams, the default, and with ``share_minibatches``) and of
the sequential reference plan (all chains and draws of one head per layer and of the full run, each
head standing for its layer's heads), FLOPs of one unit counted from the model's shapes, both those the
sequential reference executes (full forward per chain) and those the batched engine executes (their ratio
is the speedup at equal efficiency), the FLOP/s they imply against a torch matmul peak measured in the same
run, and peak memory at two draw counts (fresh subprocesses; RSS on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU). On a GPU, ``--cpu-sequential-threads N`` also times the
sequential reference on the host CPU with N threads (and the CPU's block size), for the
GPU-engine-vs-CPU-reference ratio.
On a CPU shared with other jobs, ``--threads 1`` avoids OpenMP oversubscription (2 threads on 2 busy
cores ran the engine several times slower than 1 thread in our measurements).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from susc_core.engine.inputs import UnitContexts  # noqa: E402
from susc_core.model.checkpoint import load_model  # noqa: E402
from susc_core.engine.unit import run_unit  # noqa: E402
from susc_core.engine.lowrank import applies as lowrank_applies  # noqa: E402
from susc_core.engine.memory import peak_memory_mib, reset_peak_memory  # noqa: E402
from susc_core.model.transformer import ModelConfig, init_params  # noqa: E402
from susc_core.engine.sgld import SamplerConfig  # noqa: E402
from workflows.study_config import ModelSection  # noqa: E402

ASSET = ROOT / "susc_core" / "assets" / "default_model.safetensors"


def model():
    if ASSET.exists():
        cfg, params = load_model(ASSET)
        return cfg, params, str(ASSET.relative_to(ROOT))
    cfg = ModelConfig()
    return cfg, init_params(cfg, torch.Generator().manual_seed(0)), "random init (no trained checkpoint found)"


def default_peak_size(device) -> int:
    """n of the n x n x n matmul-peak product: 8192 fills a GPU, 1024 is at a CPU core's peak."""
    return 8192 if torch.device(device).type == "cuda" else 1024


def matmul_peak(device, n: int | None = None, dtype=torch.float32, reps=20) -> float:
    """FLOP/s of an n x n x n product (default ``default_peak_size``) in ``dtype`` under torch's current
    matmul precision (random data)."""
    n = n or default_peak_size(device)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class TokenFlops(NamedTuple):
    """Matmul FLOPs (multiply-adds x 2) per token and chain: an SGLD step's forward + backward, and an
    observable's forward."""

    step: float
    obs: float


def group_flops(cfg: ModelConfig, seq: int, layer: int | None, plan: str, shared_by: int = 1,
                pass_rows: tuple[int, int] = (1, 1), call_tokens: tuple[int, int] = (1, 1)) -> TokenFlops:
    """FLOPs per token and chain of one component in ``plan`` ("reference" or "batched"), counted from the
    shapes as the code runs them: a head of ``layer`` (``HeadGroup``; the reference rebuilds its cache at every
    call, ``HonestHeadGroup``) or, with ``layer=None``, the full run (both plans do the same work). Attention
    counts the full causal square; its backward 2.5x its forward (flash attention recomputes the scores; a
    GPU's vmapped full run forms the pattern explicitly, 2x, not modelled); the
    blocks above a component need input gradients only; the unembedding's gradients are formed in its forward
    (``fused_nll``). Batched heads share the layer at w* among ``shared_by`` chains (the heads of the layer x
    chains) and, in the low-rank path of a last attention-only block, the d_model-wide logit product among
    ``pass_rows`` (step, observable) chains of a pass that read the same tokens; the low-rank basis is formed once per chain and call of ``call_tokens``
    (step, observable) tokens."""
    h, d, e, v, n = cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_vocab, cfg.n_layers
    proj, attn, mlp = 2 * 4 * d * h * e, 2 * 2 * seq * h * e, 4 * d * cfg.d_mlp
    layer_fwd, layer_input_grads, unembed = proj + attn + mlp, proj + 2.5 * attn + mlp, 2 * d * v
    forward = n * layer_fwd + unembed
    if layer is None:
        return TokenFlops(forward + 2 * unembed + n * (layer_input_grads + proj + mlp), forward)
    above, reference = n - 1 - layer, plan == "reference"
    head_attn = 2 * 2 * seq * e
    head_fwd = 2 * 3 * d * e + head_attn + 2 * 2 * e * d  # q, k, v; attention; z W_O and z* W_O*
    head_bwd = 2 * 4 * d * e + 2 * e * d + 2.5 * head_attn  # weight gradients of q, k, v, o; dz; attention
    cached = (layer * layer_fwd + proj + attn) / (1 if reference else shared_by)  # the layer at w*, per step
    if reference or not lowrank_applies(cfg, layer):
        after = head_fwd + mlp + above * layer_fwd + unembed
        step = cached + after + unembed + above * layer_input_grads + mlp + head_bwd
        return TokenFlops(step, after + (cached if reference else 0))  # the batched plan caches fixed contexts
    rank = 2 * e  # the low-rank logits (``lowrank``): forward, input and basis gradients of [2e, V] products
    basis = 2 * e * d * v  # W_O Wc, formed per chain and call; its gradient costs as much
    step = (cached + unembed / pass_rows[0] + head_fwd + 3 * 2 * rank * v + 2 * v + 2 * rank + head_bwd
            + 2 * basis / call_tokens[0])
    return TokenFlops(step, head_fwd + 2 * rank * v + unembed / pass_rows[1] + basis / call_tokens[1])


def unit_flops(cfg: ModelConfig, sampler: SamplerConfig, seq: int, n_obs_tokens: int, head_layers: list[int],
               plan: str, chunk_tokens: int, chains_per_group: int | None = None) -> float:
    """Matmul FLOPs of one (component, chain, draw) in ``plan``, averaged over the components: one head per
    entry of ``head_layers`` (its layer) and the full run; ``group_flops`` per token. A layer's heads share one
    ``HeadGroup`` per ``chains_per_group`` chains (a study's ``units.chains_per_unit``; default all
    ``n_chains``): with independent minibatch streams (chain k of every head reads stream k) the layer's cache
    is shared by its heads of one chain index, by all chains of the group when they share one stream."""
    step_tokens = sampler.batch_size * seq
    call_tokens = (step_tokens, max(1, chunk_tokens // seq) * seq)
    units = [group_flops(cfg, seq, None, plan)]
    chains = chains_per_group or sampler.n_chains
    for l in head_layers:
        members = head_layers.count(l) * chains
        pass_size = min(members, sampler.chains_per_pass)
        if sampler.share_minibatches or chains == 1:  # one minibatch stream in the group: every chain shares
            group, pass_rows = members, (pass_size, pass_size)
        else:  # one stream per chain index: the layer's heads share its cache; each chain has its own base logits
            group, pass_rows = head_layers.count(l), (1, pass_size)
        units.append(group_flops(cfg, seq, l, plan, group, pass_rows, call_tokens))
    per_unit = [f.step * step_tokens * sampler.steps_between_draws + f.obs * n_obs_tokens for f in units]
    return sum(per_unit) / len(per_unit)


def timed_unit(*args, **kwargs):
    """Wall seconds of ``run_unit`` (its statistics come back on the host, so the device has finished)."""
    start = time.perf_counter()
    out = run_unit(*args, **kwargs)
    return time.perf_counter() - start, out


def sequential_seconds(cfg, params, sampler, contexts: UnitContexts, device,
                       chunk_tokens: int) -> tuple[float, dict[str, float]]:
    """Seconds of the sequential reference plan for every head + full (all chains and draws of ``sampler``):
    one head per layer and the full run are timed whole (after a warm-up), each head's time stands for its
    layer's heads. Returns (total seconds, seconds per chain·draw of each timed component)."""
    run_unit(cfg, params, ["L0H0"], [0], SamplerConfig(**{**sampler.__dict__, "n_draws": 1}), contexts,
             seed=0, device=device, mode="reference", chunk_tokens=chunk_tokens)  # warm-up
    chains = list(range(sampler.n_chains))
    seconds = {name: timed_unit(cfg, params, [name], chains, sampler, contexts, seed=0, device=device,
                                mode="reference", chunk_tokens=chunk_tokens)[0]
               for name in [f"L{l}H0" for l in range(cfg.n_layers)] + ["full"]}
    total = sum(cfg.n_heads * seconds[f"L{l}H0"] for l in range(cfg.n_layers)) + seconds["full"]
    return total, {name: t / (sampler.n_chains * sampler.n_draws) for name, t in seconds.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--obs", type=int, default=8, help="fixed observable contexts")
    ap.add_argument("--probe", type=int, default=8, help="probe contexts")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--chunk-tokens", type=int, default=None,
                    help="rows of vocabulary logits per block (default: the study's model.loss_chunk_tokens on a CPU, "
                         "model.cuda_loss_chunk_tokens on a GPU); changes speed, not results")
    ap.add_argument("--memory-draws", type=int, nargs=2, default=(1, 5), help="draw counts of the memory check")
    ap.add_argument("--peak-size", type=int, default=None,
                    help="n of the n x n x n matmul-peak product (default 1024 on a CPU, 8192 on a GPU: fills it)")
    ap.add_argument("--cpu-sequential-threads", type=int, default=0,
                    help="with a GPU --device, also time the sequential reference on the host CPU (N threads)")
    ap.add_argument("--cpu-chunk-tokens", type=int, default=None,
                    help="rows of vocabulary logits per block of that CPU reference (default: the GPU run's; on a "
                         "16-thread host large blocks ran 1.5x faster than the 1-thread optimum of 256)")
    ap.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, params, source = model()
    study_model = ModelSection()
    args.chunk_tokens = args.chunk_tokens or (study_model.cuda_loss_chunk_tokens
                                              if torch.device(args.device).type == "cuda"
                                              else study_model.loss_chunk_tokens)
    seq = cfg.n_ctx
    gen = torch.Generator().manual_seed(1)
    train = torch.randint(0, cfg.d_vocab, (256, seq + 1), generator=gen)
    obs = torch.randint(0, cfg.d_vocab, (args.obs, seq + 1), generator=gen)
    probe = torch.randint(0, cfg.d_vocab, (args.probe, seq + 1), generator=gen)
    contexts = UnitContexts(train, obs, probe)
    sampler = SamplerConfig(step_size=1e-3, nbeta=30.0, gamma=300.0, n_chains=4, n_draws=args.draws, batch_size=16)
    heads = [f"L{l}H{h}" for l in range(cfg.n_layers) for h in range(cfg.n_heads)]
    chains = list(range(sampler.n_chains))
    if args.memory_child:
        reset_peak_memory(args.device)
        run_unit(cfg, params, ["L*H*", "full"], chains, SamplerConfig(**{**sampler.__dict__, "n_draws": args.memory_child}),
                 contexts, seed=0, device=args.device, chunk_tokens=args.chunk_tokens)
        print(peak_memory_mib(args.device))
        return
    peak_size = args.peak_size or default_peak_size(args.device)
    peak = matmul_peak(args.device, peak_size)
    peak_bf16 = matmul_peak(args.device, peak_size, torch.bfloat16)
    units = (len(heads) + 1) * len(chains) * args.draws
    bf16 = SamplerConfig(**{**sampler.__dict__, "forward_dtype": "bfloat16"})
    for timed in (sampler, bf16):  # warm-up of each precision: kernels, handles and allocator pools stay out
        run_unit(cfg, params, ["L0H*", f"L{cfg.n_layers - 1}H*", "full"], [0],
                 SamplerConfig(**{**timed.__dict__, "n_draws": 1}), contexts, seed=0, device=args.device,
                 chunk_tokens=args.chunk_tokens)
    everything = heads + ["full"]
    t_batched, _ = timed_unit(cfg, params, everything, chains, sampler, contexts, seed=0, device=args.device,
                              chunk_tokens=args.chunk_tokens)
    shared = SamplerConfig(**{**sampler.__dict__, "share_minibatches": True})
    t_shared, _ = timed_unit(cfg, params, everything, chains, shared, contexts, seed=0, device=args.device,
                             chunk_tokens=args.chunk_tokens)
    t_seq, per_chain_draw = sequential_seconds(cfg, params, sampler, contexts, args.device, args.chunk_tokens)
    cpu_reference = {}
    if args.cpu_sequential_threads and torch.device(args.device).type != "cpu":
        gpu_threads = torch.get_num_threads()
        torch.set_num_threads(args.cpu_sequential_threads)
        args.cpu_chunk_tokens = args.cpu_chunk_tokens or args.chunk_tokens
        t_cpu, per_chain_draw_cpu = sequential_seconds(cfg, params, sampler, contexts, "cpu",
                                                       args.cpu_chunk_tokens)
        torch.set_num_threads(gpu_threads)
        cpu_reference = {"cpu_sequential_threads": args.cpu_sequential_threads,
                         "cpu_chunk_tokens": args.cpu_chunk_tokens,
                         "cpu_sequential_units_per_s": units / t_cpu,
                         "cpu_sequential_s_per_chain_draw": per_chain_draw_cpu,
                         "speedup_vs_cpu_sequential": t_cpu / t_batched}
    t_bf16, _ = timed_unit(cfg, params, everything, chains, bf16, contexts, seed=0, device=args.device,
                           chunk_tokens=args.chunk_tokens)
    n_obs_tokens = (args.obs + args.probe) * seq
    head_layers = [l for l in range(cfg.n_layers) for _ in range(cfg.n_heads)]
    flops = unit_flops(cfg, sampler, seq, n_obs_tokens, head_layers, "reference", args.chunk_tokens)
    executed = unit_flops(cfg, sampler, seq, n_obs_tokens, head_layers, "batched", args.chunk_tokens)
    memory = {}
    for draws in args.memory_draws:
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--obs", str(args.obs), "--probe",
                              str(args.probe), "--threads", str(args.threads), "--chunk-tokens", str(args.chunk_tokens),
                              "--memory-child", str(draws)], capture_output=True, text=True, check=True)
        memory[f"draws_{draws}"] = float(out.stdout.strip().splitlines()[-1])
    print(json.dumps({
        "model": source, "device": args.device, "device_name": device_name(args.device),
        "threads": torch.get_num_threads(), "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "chunk_tokens": args.chunk_tokens, "load_average_1min": os.getloadavg()[0],
        "unit": {"components": len(heads) + 1, "chains": len(chains), "draws": args.draws, "batch_size": 16,
                 "obs_contexts": args.obs, "probe_contexts": args.probe, "seq": seq},
        "batched_units_per_s": units / t_batched,
        "batched_bf16_units_per_s": units / t_bf16,
        "batched_shared_minibatches_units_per_s": units / t_shared,
        "independent_minibatches_cost_ratio": t_batched / t_shared,
        "sequential_units_per_s": units / t_seq,
        "speedup_vs_sequential": t_seq / t_batched,
        "speedup_bf16_vs_sequential": t_seq / t_bf16,
        "sequential_s_per_chain_draw": per_chain_draw,
        **cpu_reference,
        "sequential_flops_per_unit": flops,
        "executed_flops_per_unit": executed,
        "flop_ratio_sequential_over_batched": flops / executed,
        "matmul_peak_size": peak_size, "matmul_peak_flops_fp32": peak, "matmul_peak_flops_bf16": peak_bf16,
        "batched_sequential_equiv_flops_per_s": flops * units / t_batched,
        "batched_sequential_equiv_fraction_of_fp32_peak": flops * units / t_batched / peak,
        "batched_executed_flops_per_s": executed * units / t_batched,
        "batched_executed_fraction_of_fp32_peak": executed * units / t_batched / peak,
        "sequential_fraction_of_fp32_peak": flops * units / t_seq / peak,
        "peak_memory_kind": "cuda_max_allocated" if torch.device(args.device).type == "cuda" else "rss",
        "peak_memory_mib_heads_plus_full": memory,
    }))


if __name__ == "__main__":
    main()

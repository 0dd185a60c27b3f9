"""Benchmark of the estimator engine on the default model; prints ONE JSON object as its last line.

    python benchmarks/engine.py [--device cpu|cuda] [--draws 2] [--obs 8] [--probe 8] [--threads N] [--chunk-tokens 256]
                                [--cpu-sequential-threads N]

Measures component·chain·draws per second of the batched engine (every head + full, 4 chains) and of
the sequential reference plan (all chains and draws of one head per layer and of the full run, each
head standing for its layer's heads), FLOPs of one unit counted from the model's shapes, both those the
sequential reference executes (full forward per chain) and those the batched engine executes (their ratio
bounds the speedup at equal efficiency), the FLOP/s they imply against a torch matmul peak measured in the
same run, and peak memory at two draw
counts (fresh subprocesses; RSS on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU). On a GPU,
``--cpu-sequential-threads N`` also times the sequential reference on the host CPU with N threads (and
the CPU's block size), for the GPU-engine-vs-CPU-reference ratio.
On a CPU shared with other jobs, ``--threads 1`` avoids OpenMP oversubscription (2 threads on 2 busy
cores ran the engine several times slower than 1 thread in our measurements).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from susc_core.checkpoint import load_model  # noqa: E402
from susc_core.engine import run_unit  # noqa: E402
from susc_core.memory import peak_memory_mib, reset_peak_memory  # noqa: E402
from susc_core.model import ModelConfig, init_params  # noqa: E402
from susc_core.sgld import SamplerConfig  # noqa: E402
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


def layer_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Multiply-adds x 2 of one block's forward per token (attention over the full causal square)."""
    h, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
    return 2 * 4 * d * h * e + 2 * 2 * seq * h * e + (4 * d * cfg.d_mlp if cfg.d_mlp else 0)


def forward_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Multiply-adds x 2 of one forward per token, embedding to logits."""
    return cfg.n_layers * layer_flops_per_token(cfg, seq) + 2 * cfg.d_model * cfg.d_vocab


def reference_flops(cfg, sampler, seq, n_obs_tokens, head_layers: list[int]):
    """Matmul FLOPs the sequential reference executes per unit, averaged over the components (heads of
    ``head_layers`` + full). A step is one chain's full forward, the unembedding's input gradient (formed
    in its forward by ``fused_nll``; no logits recomputed), and the backward through the blocks above the
    component (input gradients: projections 1x, attention 2x its forward) and into the component's own
    weights; the full run also forms every weight gradient (1x each matmul). A draw adds one forward per
    observable token."""
    h, d, e, v = cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_vocab
    layer = layer_flops_per_token(cfg, seq)
    attention = 2 * 2 * seq * h * e
    layer_input_grads = layer + attention
    forward, unembed = forward_flops_per_token(cfg, seq), 2 * d * v
    head_grads = 2 * 4 * d * e + 2 * (2 * 2 * seq * e)  # its four weight slices, its attention's inputs
    step_tokens = sampler.batch_size * seq * sampler.steps_between_draws
    heads = [(forward + unembed + (cfg.n_layers - 1 - l) * layer_input_grads + head_grads) * step_tokens
             + forward * n_obs_tokens for l in head_layers]
    full = ((forward + 2 * unembed + cfg.n_layers * (layer_input_grads + (layer - attention))) * step_tokens
            + forward * n_obs_tokens)
    return (sum(heads) + full) / (len(heads) + 1)


def executed_flops(cfg, sampler, seq, n_obs_tokens, head_layers: list[int]):
    """Matmul FLOPs the batched engine executes per unit, averaged over the components (heads of
    ``head_layers`` + full): a head recomputes only itself (q, k, v, z·W_O and z*·W_O*), the blocks after
    its layer and the unembedding. A step is forward + backward (2x), except that the unembedding's
    gradients are formed in its forward (``fused_nll``): a head's needs the input gradient only (2x), the
    full run's also the weight gradient (3x). A last-block head of an attention-only model takes its
    logits through the rank-2·d_head change (``lowrank``): forward, input and basis gradients (3x) of a
    [2·d_head, d_vocab] product, plus the shared d_model-wide product at w* once per token for all the
    chains of its layer. Shared upstream activations (once per step for all chains) are not counted."""
    h, d, e, v = cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_vocab
    layer = layer_flops_per_token(cfg, seq)
    head = 2 * 3 * d * e + 2 * 2 * seq * e + 2 * 2 * e * d
    unembed = 2 * d * v
    step_tokens = sampler.batch_size * seq * sampler.steps_between_draws

    def logits(l: int, grad: bool) -> float:
        """Unembedding FLOPs per token and chain of a head in layer l (grad: an SGLD step, else an observable)."""
        if l == cfg.n_layers - 1 and not cfg.d_mlp:
            shared = unembed / (head_layers.count(l) * sampler.n_chains)
            return (3 if grad else 1) * 2 * (2 * e) * v + shared
        return (2 if grad else 1) * unembed

    heads = [(3 * (head + (cfg.n_layers - 1 - l) * layer) + logits(l, True)) * step_tokens
             + (head + (cfg.n_layers - 1 - l) * layer + logits(l, False)) * n_obs_tokens for l in head_layers]
    full = (3 * cfg.n_layers * layer + 3 * unembed) * step_tokens + (cfg.n_layers * layer + unembed) * n_obs_tokens
    return (sum(heads) + full) / (len(heads) + 1)


def timed_unit(*args, **kwargs):
    """Wall seconds of ``run_unit`` (its statistics come back on the host, so the device has finished)."""
    start = time.perf_counter()
    out = run_unit(*args, **kwargs)
    return time.perf_counter() - start, out


def sequential_seconds(cfg, params, sampler, train, obs, probe, device) -> tuple[float, dict[str, float]]:
    """Seconds of the sequential reference plan for every head + full (all chains and draws of ``sampler``):
    one head per layer and the full run are timed whole (after a warm-up), each head's time stands for its
    layer's heads. Returns (total seconds, seconds per chain·draw of each timed component)."""
    run_unit(cfg, params, ["L0H0"], [0], SamplerConfig(**{**sampler.__dict__, "n_draws": 1}), train, obs, probe,
             seed=0, device=device, mode="reference")  # warm-up
    chains = list(range(sampler.n_chains))
    seconds = {name: timed_unit(cfg, params, [name], chains, sampler, train, obs, probe, seed=0, device=device,
                                mode="reference")[0]
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
    cfg = dataclasses.replace(cfg, loss_chunk_tokens=args.chunk_tokens)
    seq = cfg.n_ctx
    gen = torch.Generator().manual_seed(1)
    train = torch.randint(0, cfg.d_vocab, (256, seq + 1), generator=gen)
    obs = torch.randint(0, cfg.d_vocab, (args.obs, seq + 1), generator=gen)
    probe = torch.randint(0, cfg.d_vocab, (args.probe, seq + 1), generator=gen)
    sampler = SamplerConfig(step_size=1e-3, nbeta=30.0, gamma=300.0, n_chains=4, n_draws=args.draws, batch_size=16)
    heads = [f"L{l}H{h}" for l in range(cfg.n_layers) for h in range(cfg.n_heads)]
    chains = list(range(sampler.n_chains))
    if args.memory_child:
        reset_peak_memory(args.device)
        run_unit(cfg, params, ["L*H*", "full"], chains, SamplerConfig(**{**sampler.__dict__, "n_draws": args.memory_child}),
                 train, obs, probe, seed=0, device=args.device)
        print(peak_memory_mib(args.device))
        return
    peak_size = args.peak_size or default_peak_size(args.device)
    peak = matmul_peak(args.device, peak_size)
    peak_bf16 = matmul_peak(args.device, peak_size, torch.bfloat16)
    units = (len(heads) + 1) * len(chains) * args.draws
    bf16 = SamplerConfig(**{**sampler.__dict__, "forward_dtype": "bfloat16"})
    for timed in (sampler, bf16):  # warm-up of each precision: kernels, handles and allocator pools stay out
        run_unit(cfg, params, ["L0H*", f"L{cfg.n_layers - 1}H*", "full"], [0],
                 SamplerConfig(**{**timed.__dict__, "n_draws": 1}), train, obs, probe, seed=0, device=args.device)
    t_batched, _ = timed_unit(cfg, params, heads + ["full"], chains, sampler, train, obs, probe, seed=0, device=args.device)
    t_seq, per_chain_draw = sequential_seconds(cfg, params, sampler, train, obs, probe, args.device)
    cpu_reference = {}
    if args.cpu_sequential_threads and torch.device(args.device).type != "cpu":
        gpu_threads = torch.get_num_threads()
        torch.set_num_threads(args.cpu_sequential_threads)
        args.cpu_chunk_tokens = args.cpu_chunk_tokens or args.chunk_tokens
        cpu_cfg = dataclasses.replace(cfg, loss_chunk_tokens=args.cpu_chunk_tokens)
        t_cpu, per_chain_draw_cpu = sequential_seconds(cpu_cfg, params, sampler, train, obs, probe, "cpu")
        torch.set_num_threads(gpu_threads)
        cpu_reference = {"cpu_sequential_threads": args.cpu_sequential_threads,
                         "cpu_chunk_tokens": args.cpu_chunk_tokens,
                         "cpu_sequential_units_per_s": units / t_cpu,
                         "cpu_sequential_s_per_chain_draw": per_chain_draw_cpu,
                         "speedup_vs_cpu_sequential": t_cpu / t_batched}
    t_bf16, _ = timed_unit(cfg, params, heads + ["full"], chains, bf16, train, obs, probe, seed=0, device=args.device)
    n_obs_tokens = (args.obs + args.probe) * seq
    head_layers = [l for l in range(cfg.n_layers) for _ in range(cfg.n_heads)]
    flops = reference_flops(cfg, sampler, seq, n_obs_tokens, head_layers)
    executed = executed_flops(cfg, sampler, seq, n_obs_tokens, head_layers)
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
        "batched_fraction_of_fp32_peak": flops * units / t_batched / peak,
        "batched_executed_flops_per_s": executed * units / t_batched,
        "batched_executed_fraction_of_fp32_peak": executed * units / t_batched / peak,
        "sequential_fraction_of_fp32_peak": flops * units / t_seq / peak,
        "peak_memory_kind": "cuda_max_allocated" if torch.device(args.device).type == "cuda" else "rss",
        "peak_memory_mib_heads_plus_full": memory,
    }))


if __name__ == "__main__":
    main()

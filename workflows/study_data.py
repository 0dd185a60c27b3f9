"""Load what a study needs from disk: the model, the SGLD pool, the fixed observable contexts and the
probe contexts (with each probe token's identity and text for the outputs)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from susc_core.checkpoint import file_sha256, load_model
from susc_core.corpus import load_context_table, load_documents
from susc_core.model import ModelConfig, Params
from susc_core.seeds import choose_contexts
from workflows.study_config import FAMILIES, StudyConfig


@dataclass
class StudyInputs:
    model_cfg: ModelConfig
    w_star: Params
    train: torch.Tensor  # [sgld_contexts, L+1] minibatch pool
    obs: torch.Tensor  # [observable_contexts, L+1] fixed baseline contexts
    probe: torch.Tensor  # [P, L+1] every probe's contexts, probe by probe
    probe_rows: pa.Table  # one row per probe context: probe, domain, context_id, doc_id, char spans
    hashes: dict[str, str]  # model, corpus manifest


def _tokens(table: pa.Table, width: int) -> torch.Tensor:
    """The first ``width`` token ids of every context: [rows, width]."""
    full = len(table.column("tokens")[0])
    flat = table.column("tokens").combine_chunks().flatten().to_numpy()
    return torch.from_numpy(flat.astype(np.int64).reshape(len(table), full)[:, :width].copy())


def _probe_allocation(cfg: StudyConfig) -> list[tuple[str, str, int]]:
    """(probe, domain, number of contexts) for every probe, mixture weights normalised."""
    pert = cfg.perturbation
    if pert.family not in FAMILIES:
        raise ValueError(f"perturbation.family={pert.family!r}; choose one of {FAMILIES}")
    if not pert.probes:
        raise ValueError("perturbation.probes is empty; list at least one {name, domains} probe")
    out = []
    for spec in pert.probes:
        if not spec.domains:
            raise ValueError(f"probe {spec.name!r} lists no domains")
        weights = np.asarray(spec.weights or [1.0] * len(spec.domains), dtype=float)
        if len(weights) != len(spec.domains) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"probe {spec.name!r}: weights {spec.weights} must be non-negative, one per domain")
        counts = np.floor(weights / weights.sum() * pert.contexts_per_probe + 1e-9).astype(int)
        counts[np.argmax(weights)] += pert.contexts_per_probe - counts.sum()
        out += [(spec.name, domain, int(n)) for domain, n in zip(spec.domains, counts) if n > 0]
    return out


def load_inputs(cfg: StudyConfig) -> StudyInputs:
    """Read the checkpoint and the corpus slices that the study config names."""
    model_cfg, w_star = load_model(cfg.model.checkpoint)
    model_cfg = replace(model_cfg, loss_chunk_tokens=cfg.model.loss_chunk_tokens)  # speed only, not results
    corpus = Path(cfg.data.corpus_dir)
    train_table = load_context_table(corpus / "train.parquet")
    corpus_width = len(train_table.column("tokens")[0])
    width = min(corpus_width, (cfg.data.seq_len or model_cfg.n_ctx) + 1)
    train_all = _tokens(train_table, width)
    n = len(train_all)
    pool = choose_contexts(cfg.seed, n, min(cfg.data.sgld_contexts, n), "sgld_pool")
    obs = choose_contexts(cfg.seed, n, cfg.data.observable_contexts, "baseline_observables")
    available = sorted(p.stem for p in (corpus / "probes").glob("*.parquet"))
    pieces, rows = [], []
    for probe, domain, count in _probe_allocation(cfg):
        if domain not in available:
            raise ValueError(f"probe {probe!r} names domain {domain!r}, which the corpus at {corpus} does not "
                             f"have; available domains: {available}")
        table = load_context_table(corpus / "probes" / f"{domain}.parquet")
        picked = choose_contexts(cfg.seed, len(table), min(count, len(table)), f"probe:{probe}:{domain}")
        table = table.take(pa.array(picked))
        pieces.append(_tokens(table, width))
        rows.append(table.drop_columns(["tokens"]).append_column("probe", pa.array([probe] * len(table))))
    manifest = corpus / "manifest.json"
    return StudyInputs(
        model_cfg=model_cfg, w_star=w_star, train=train_all[pool], obs=train_all[obs],
        probe=torch.cat(pieces), probe_rows=pa.concat_tables(rows),
        hashes={"model": file_sha256(cfg.model.checkpoint),
                "corpus_manifest": file_sha256(manifest) if manifest.exists() else "missing"})


def token_texts(corpus_dir: str | Path, probe_rows: pa.Table, width: int) -> list[list[str]]:
    """Text of the first ``width`` tokens of every probe context, [P][width], from the documents' spans."""
    texts = load_documents(Path(corpus_dir) / "documents.parquet")
    out = []
    for doc_id, starts, ends in zip(probe_rows.column("doc_id").to_pylist(), probe_rows.column("char_start").to_pylist(),
                                    probe_rows.column("char_end").to_pylist()):
        doc = texts[doc_id]
        out.append([doc[s:e] for s, e in zip(starts, ends)][:width])
    return out

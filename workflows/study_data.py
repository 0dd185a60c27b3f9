"""Load what a study needs from disk: the model, the SGLD pool, the fixed observable contexts and the
probe contexts (with each probe token's identity and text for the outputs).

The bundled model reads the built corpus (``train.parquet``, ``probes/``). An adapter model
(``model.adapter: hf``) reads the same documents re-tokenised with its own tokenizer
(``susc_core.data.retokenize``): baseline windows come from the train documents in the training mixture's
domain shares, probe windows from the probe documents, as in the built corpus.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from susc_core.data import retokenize
from susc_core.adapters.base import ModelAdapter
from susc_core.adapters.load import AdapterSpec, load_adapter, load_adapter_tokenizer, package_file
from susc_core.model.checkpoint import file_sha256, load_model, path_sha256
from susc_core.model.components import valid_component_names
from susc_core.data.corpus import context_table, concat_contexts, load_context_table, load_documents
from susc_core.model.transformer import ModelConfig, Params
from susc_core.engine.seeds import choose_contexts
from susc_core.data.tokenizer import encode_documents
from workflows.study_config import FAMILIES, ModelSection, StudyConfig


@dataclass
class StudyInputs:
    train: torch.Tensor  # [sgld_contexts, L+1] minibatch pool
    obs: torch.Tensor  # [observable_contexts, L+1] fixed baseline contexts
    probe: torch.Tensor  # [P, L+1] every probe's contexts, probe by probe
    probe_rows: pa.Table  # one row per probe context: probe, domain, context_id, doc_id, char spans
    hashes: dict[str, str]  # model, corpus manifest (adapters: also the re-tokenised contexts)
    component_names: list[str]  # every concrete component name of the model, canonical order
    n_layers: int
    texts: list[list[str]]  # [P][L+1] the text of every probe token (what the token viewer shows)
    model_label: str  # what the logs call the model: "bundled", "hf", "tl", an adapter's class name
    model_cfg: ModelConfig | None = None  # bundled model only
    w_star: Params | None = None  # bundled model only
    # adapter models: what a worker loads (``load_adapter``), or the adapter itself when built in memory
    adapter: AdapterSpec | ModelAdapter | None = None


def _tokens(table: pa.Table, width: int) -> torch.Tensor:
    """The first ``width`` token ids of every context: [rows, width]."""
    full = len(table.column("tokens")[0])
    flat = table.column("tokens").combine_chunks().flatten().to_numpy()
    return torch.from_numpy(flat.astype(np.int64).reshape(len(table), full)[:, :width].copy())


def _probe_rows(table: pa.Table, probe: str) -> pa.Table:
    """A context table's rows without token ids, tagged with their probe."""
    return table.drop_columns(["tokens"]).append_column("probe", pa.array([probe] * len(table)))


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
        counts = retokenize.allocate(weights, pert.contexts_per_probe)
        out += [(spec.name, domain, int(n)) for domain, n in zip(spec.domains, counts) if n > 0]
    return out


def _check_domain(probe: str, domain: str, available: list[str], corpus: Path) -> None:
    if domain not in available:
        raise ValueError(f"probe {probe!r} names domain {domain!r}, which the corpus at {corpus} does not "
                         f"have; available domains: {available}")


def _corpus_hash(corpus: Path) -> str:
    manifest = corpus / "manifest.json"
    return file_sha256(manifest) if manifest.exists() else "missing"


def load_inputs(cfg: StudyConfig) -> StudyInputs:
    """Read the model and the corpus slices that the study config names."""
    if cfg.model.adapter == "bundled":
        return _bundled_inputs(cfg)
    return _adapter_inputs(cfg)


def _bundled_inputs(cfg: StudyConfig) -> StudyInputs:
    model_cfg, w_star = load_model(cfg.model.checkpoint)
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
        _check_domain(probe, domain, available, corpus)
        table = load_context_table(corpus / "probes" / f"{domain}.parquet")
        picked = choose_contexts(cfg.seed, len(table), min(count, len(table)), f"probe:{probe}:{domain}")
        table = table.take(pa.array(picked))
        pieces.append(_tokens(table, width))
        rows.append(_probe_rows(table, probe))
    probe_rows = pa.concat_tables(rows)
    return StudyInputs(
        train=train_all[pool], obs=train_all[obs], probe=torch.cat(pieces), probe_rows=probe_rows,
        hashes={"model": file_sha256(cfg.model.checkpoint), "corpus_manifest": _corpus_hash(corpus)},
        component_names=valid_component_names(model_cfg), n_layers=model_cfg.n_layers,
        texts=token_texts(corpus, probe_rows, width), model_label="bundled", model_cfg=model_cfg, w_star=w_star)


def adapter_spec(model: ModelSection) -> AdapterSpec:
    """The loadable description of an adapter model: ``checkpoint`` (a directory or .gguf file), or the
    GGUF ``gguf_file`` inside installed package ``gguf_package``."""
    path, gguf_file = model.checkpoint, model.gguf_file
    if model.gguf_package:
        if not model.gguf_file:
            raise ValueError(f"model.gguf_package={model.gguf_package!r} needs model.gguf_file, the GGUF file's "
                             f"name inside that package")
        path = str(package_file(model.gguf_package, model.gguf_file, model.gguf_pip or model.gguf_package))
        gguf_file = None  # path is the file itself
    return AdapterSpec(model.adapter, path, gguf_file, model.loss_chunk_tokens, model.shared_kv,
                       model.attn_implementation)


def _model_file(spec: AdapterSpec) -> Path:
    return Path(spec.path) / spec.gguf_file if spec.gguf_file else Path(spec.path)


def _adapter_inputs(cfg: StudyConfig) -> StudyInputs:
    spec = adapter_spec(cfg.model)
    adapter = load_adapter(spec)  # cached: an in-process study's units reuse it
    encode = partial(encode_documents, load_adapter_tokenizer(spec))
    n_ctx = cfg.data.seq_len or adapter.n_ctx
    corpus = Path(cfg.data.corpus_dir)
    documents = load_context_table(corpus / "documents.parquet")
    train_docs, probe_docs = (retokenize.documents_by_domain(documents, s) for s in ("train", "probe"))

    # baseline: windows of the training documents in the training mixture's domain shares
    shares = Counter(pq.read_table(corpus / "train.parquet", columns=["domain"]).column("domain").to_pylist())
    domains = sorted(shares)
    n_base = cfg.data.sgld_contexts + cfg.data.observable_contexts
    counts = retokenize.allocate([shares[d] for d in domains], n_base)
    baseline = concat_contexts([retokenize.windows(train_docs[d], encode, n_ctx, int(k), cfg.seed, f"baseline:{d}")
                                for d, k in zip(domains, counts) if k > 0])
    base = torch.from_numpy(baseline.tokens.astype(np.int64))
    obs = choose_contexts(cfg.seed, n_base, cfg.data.observable_contexts, "baseline_observables")
    pool = np.setdiff1d(np.arange(n_base), obs)  # disjoint from the observable contexts

    parts, rows = [], []
    for probe, domain, count in _probe_allocation(cfg):
        _check_domain(probe, domain, sorted(probe_docs), corpus)
        part = retokenize.windows(probe_docs[domain], encode, n_ctx, count, cfg.seed, f"probe:{probe}:{domain}")
        # context_id: the context's row among the study's probe contexts (re-tokenised windows have no corpus id)
        rows.append(_probe_rows(context_table(part, [domain] * count, sum(map(len, rows)), {}), probe))
        parts.append(part)
    probe = torch.from_numpy(concat_contexts(parts).tokens.astype(np.int64))
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in (base, probe))).hexdigest()
    probe_rows = pa.concat_tables(rows)
    return StudyInputs(
        train=base[pool], obs=base[obs], probe=probe, probe_rows=probe_rows,
        hashes={"model": path_sha256(_model_file(spec)), "corpus_manifest": _corpus_hash(corpus), "contexts": digest},
        component_names=adapter.component_names(), n_layers=adapter.n_layers,
        texts=token_texts(corpus, probe_rows, probe.shape[1]), model_label=spec.kind, adapter=spec)


def token_texts(corpus_dir: str | Path, probe_rows: pa.Table, width: int) -> list[list[str]]:
    """Text of the first ``width`` tokens of every probe context, [P][width], from the documents' spans."""
    texts = load_documents(Path(corpus_dir) / "documents.parquet")
    out = []
    for doc_id, starts, ends in zip(probe_rows.column("doc_id").to_pylist(), probe_rows.column("char_start").to_pylist(),
                                    probe_rows.column("char_end").to_pylist()):
        doc = texts[doc_id]
        out.append([doc[s:e] for s, e in zip(starts, ends)][:width])
    return out

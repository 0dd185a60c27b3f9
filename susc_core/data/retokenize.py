"""The corpus documents under another model's tokenizer: fixed-length windows with character spans.

The built corpus (``train.parquet``, ``probes/``) holds contexts in the bundled tokenizer's ids; a model
with its own vocabulary (``susc_core.adapters``) reads the same documents (``documents.parquet``)
re-tokenised. Windows are cut as in the corpus build (``corpus.cut_contexts``: ``n_ctx + 1`` tokens of
one document at stride ``n_ctx``, each token with its character span in the document) and chosen
spread over documents (``corpus.spread_selection``). Documents are visited in a seeded order and
tokenised only as far as the requested windows need. Streams are ``seeds.stream_seed(seed,
"observables", label)``, as for ``seeds.choose_contexts``, so each labelled set is independent.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from susc_core.data.corpus import Contexts, Document, contexts_from_documents
from susc_core.engine.seeds import stream_seed
from susc_core.data.tokenizer import TokenSpans

Encode = Callable[[Sequence[str]], list[TokenSpans]]  # texts -> each text's ids and character spans


def allocate(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts proportional to ``weights`` [k] (non-negative, positive sum) that sum to ``total``:
    the floors, with what is left over given to the largest weight. int64 [k]."""
    w = np.asarray(weights, dtype=float)
    counts = np.floor(w / w.sum() * total + 1e-9).astype(np.int64)
    counts[np.argmax(w)] += total - counts.sum()
    return counts


def documents_by_domain(table: pa.Table, split: str) -> dict[str, list[Document]]:
    """domain -> the documents of ``split`` ("train" or "probe") of a ``corpus.DOCUMENT_SCHEMA`` table,
    in table order."""
    out: dict[str, list[Document]] = {}
    for row in table.filter(pc.equal(table.column("split"), split)).to_pylist():
        out.setdefault(row["domain"], []).append(Document(row["doc_id"], row["domain"], row["source"], row["text"]))
    return out


def windows(docs: Sequence[Document], encode: Encode, n_ctx: int, n: int, seed: int, label: str) -> Contexts:
    """``n`` windows of ``n_ctx + 1`` tokens of ``docs``, spread over documents: ``Contexts`` [n, n_ctx + 1].

    Documents are tokenised in a seeded order (stream ``label``), a batch at a time, until they hold
    at least ``n`` windows in at least ``min(n, len(docs))`` documents; ``n`` of those windows are then
    chosen by ``spread_selection``. Same arguments, same windows.
    """
    if n < 1 or n_ctx < 1:
        raise ValueError(f"need n >= 1 windows of n_ctx >= 1 tokens, got n={n}, n_ctx={n_ctx}")
    generator = np.random.default_rng(stream_seed(seed, "observables", label))
    order = generator.permutation(len(docs))
    picked: list[Document] = []
    spans: list[TokenSpans] = []
    n_windows, batch = 0, n
    while len(picked) < len(docs) and (n_windows < n or len(picked) < min(n, len(docs))):
        chunk = [docs[i] for i in order[len(picked):len(picked) + batch]]
        encoded = encode([d.text for d in chunk])
        picked += chunk
        spans += encoded
        n_windows += sum(max(len(s.ids) - 1, 0) // n_ctx for s in encoded)
        batch *= 2
    if n_windows < n:
        raise ValueError(f"{label}: the {len(docs)} documents hold {n_windows} windows of {n_ctx + 1} tokens, "
                         f"fewer than the {n} asked for; ask for fewer contexts or shorter ones (data.seq_len)")
    return contexts_from_documents(picked, spans, n_ctx, n, generator)

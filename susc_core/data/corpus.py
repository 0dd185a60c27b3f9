"""Corpus maths and file format: split documents, bundle short ones, cut contexts, build and load tables.

A *context* is ``n_ctx + 1`` consecutive tokens of ONE document (position t predicts token t+1), with
each token's character span in that document's text. Consecutive contexts of a document overlap by
one token (stride ``n_ctx``), so every token of the document is a prediction target at most once.
Files (see ``workflows/build_corpus.py``): ``train.parquet`` and ``probes/{domain}.parquet`` with
columns ``context_id`` int64, ``domain``, ``doc_id`` string, ``tokens``, ``char_start``, ``char_end``
list<int32>; ``documents.parquet`` (doc_id, domain, source, split, text); ``manifest.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from susc_core.data.tokenizer import TokenSpans


class Document(NamedTuple):
    """One text document; ``doc_id`` is unique across the corpus, ``source`` names where it came from."""

    doc_id: str
    domain: str
    source: str
    text: str


class Contexts(NamedTuple):
    """Fixed-length windows: ``tokens``, ``char_start``, ``char_end`` int32 ``[n, n_ctx + 1]``; ``doc_ids`` [n]."""

    tokens: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray
    doc_ids: list[str]


CONTEXT_SCHEMA = pa.schema([
    ("context_id", pa.int64()), ("domain", pa.string()), ("doc_id", pa.string()),
    ("tokens", pa.list_(pa.int32())), ("char_start", pa.list_(pa.int32())),
    ("char_end", pa.list_(pa.int32())),
])
DOCUMENT_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("domain", pa.string()), ("source", pa.string()),
    ("split", pa.string()), ("text", pa.string()),
])


def split_documents(generator: np.random.Generator, docs: Sequence[Document],
                    probe_fraction: float) -> tuple[list[Document], list[Document]]:
    """Seeded split by whole documents into (train, probe); ``round(probe_fraction * n)`` go to probe.

    Both lists come out in the same random permutation order, so taking a prefix of either is a
    random sample of documents.
    """
    if not 0.0 <= probe_fraction <= 1.0:
        raise ValueError(f"probe_fraction must lie in [0, 1], got {probe_fraction}")
    order = generator.permutation(len(docs))
    n_probe = int(round(probe_fraction * len(docs)))
    return [docs[i] for i in order[n_probe:]], [docs[i] for i in order[:n_probe]]


def bundle_documents(docs: Sequence[Document], min_chars: int, separator: str) -> list[Document]:
    """Join runs of consecutive documents shorter than ``min_chars`` into bundles of >= ``min_chars``.

    A bundle is one document: member texts joined by ``separator`` (the end-of-text token), its id the
    member ids joined by ``+``. Documents already at least ``min_chars`` long pass through unchanged;
    a trailing bundle that stays short is kept as it is.
    """
    out: list[Document] = []
    pending: list[Document] = []

    def flush() -> None:
        if pending:
            out.append(pending[0] if len(pending) == 1 else Document(
                "+".join(d.doc_id for d in pending), pending[0].domain, pending[0].source,
                separator.join(d.text for d in pending)))
            pending.clear()

    for doc in docs:
        if separator in doc.text:
            raise ValueError(f"document {doc.doc_id} contains the separator {separator!r}; "
                             "remove it from the source text before bundling")
        if len(doc.text) >= min_chars:
            out.append(doc)
            continue
        pending.append(doc)
        if sum(len(d.text) for d in pending) + len(separator) * (len(pending) - 1) >= min_chars:
            flush()
    flush()
    return out


def cut_contexts(spans: TokenSpans, n_ctx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut one document's tokens into windows of ``n_ctx + 1`` tokens at stride ``n_ctx``.

    Returns ``(tokens, char_start, char_end)``, each int32 ``[k, n_ctx + 1]`` with
    ``k = (n_tokens - 1) // n_ctx``; a tail too short for a full window is dropped.
    """
    k = max(len(spans.ids) - 1, 0) // n_ctx
    index = np.arange(k)[:, None] * n_ctx + np.arange(n_ctx + 1)[None, :]
    return spans.ids[index], spans.char_start[index], spans.char_end[index]


def spread_selection(generator: np.random.Generator, counts: Sequence[int], k: int) -> np.ndarray:
    """Choose ``k`` of the windows of several documents, spread over documents as evenly as possible.

    ``counts[i]`` is document i's number of windows. Round r takes the r-th window of every
    document that still has one (each document's windows in a random order); rounds are filled in
    order until ``k`` are chosen (the last round's documents are picked at random).
    Returns sorted flat window indices, int64 ``[min(k, sum(counts))]``.
    """
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rank = np.empty(offsets[-1], dtype=np.int64)
    for i, c in enumerate(counts):
        rank[offsets[i]: offsets[i + 1]] = generator.permutation(c)
    tiebreak = generator.random(offsets[-1])
    return np.sort(np.lexsort((tiebreak, rank))[:k])


def contexts_from_documents(docs: Sequence[Document], spans: Sequence[TokenSpans], n_ctx: int,
                            max_contexts: int | None = None,
                            generator: np.random.Generator | None = None) -> Contexts:
    """All windows of ``docs`` (in document order), or ``max_contexts`` of them chosen by
    ``spread_selection`` with ``generator`` (so many documents contribute, not just the first)."""
    parts, doc_ids = [], []
    for doc, sp in zip(docs, spans, strict=True):
        cut = cut_contexts(sp, n_ctx)
        parts.append(cut)
        doc_ids += [doc.doc_id] * len(cut[0])
    empty = np.zeros((0, n_ctx + 1), dtype=np.int32)
    arrays = [np.concatenate([p[j] for p in parts] or [empty]) for j in range(3)]
    if max_contexts is not None and max_contexts < len(doc_ids):
        if generator is None:
            raise ValueError("max_contexts below the number of windows needs a generator to choose them")
        keep = spread_selection(generator, [len(p[0]) for p in parts], max_contexts)
        arrays, doc_ids = [a[keep] for a in arrays], [doc_ids[i] for i in keep]
    return Contexts(*arrays, doc_ids)


def concat_contexts(parts: Sequence[Contexts]) -> Contexts:
    """Stack several ``Contexts`` (same ``n_ctx``) in order."""
    return Contexts(*(np.concatenate([getattr(p, f) for p in parts])
                      for f in ("tokens", "char_start", "char_end")),
                    [d for p in parts for d in p.doc_ids])


def context_table(contexts: Contexts, domains: Sequence[str], first_id: int,
                  metadata: Mapping[str, str]) -> pa.Table:
    """Arrow table in ``CONTEXT_SCHEMA``; ``context_id`` runs from ``first_id``; ``metadata`` -> schema metadata."""
    n, width = contexts.tokens.shape

    def lists(a: np.ndarray) -> pa.ListArray:
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width)
        return pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1).astype(np.int32)))

    table = pa.Table.from_arrays(
        [pa.array(np.arange(first_id, first_id + n, dtype=np.int64)), pa.array(list(domains), pa.string()),
         pa.array(contexts.doc_ids, pa.string()), lists(contexts.tokens), lists(contexts.char_start),
         lists(contexts.char_end)], schema=CONTEXT_SCHEMA)
    return table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})


def document_table(docs: Sequence[Document], splits: Sequence[str]) -> pa.Table:
    """Arrow table in ``DOCUMENT_SCHEMA``, one row per (possibly bundled) document."""
    columns = [[d.doc_id for d in docs], [d.domain for d in docs], [d.source for d in docs],
               list(splits), [d.text for d in docs]]
    return pa.Table.from_arrays([pa.array(c, pa.string()) for c in columns], schema=DOCUMENT_SCHEMA)


def load_context_table(path: str | Path) -> pa.Table:
    """Read a context Parquet file (``train.parquet`` or ``probes/{domain}.parquet``) with its metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no context file at {path}; build the corpus with "
                                "`python -m workflows.build_corpus`")
    return pq.read_table(path)


def load_contexts(path: str | Path) -> torch.Tensor:
    """Token ids of every context in a Parquet file: LongTensor ``[n, n_ctx + 1]``."""
    table = load_context_table(path)
    n_ctx = int(table.schema.metadata[b"n_ctx"])
    flat = table.column("tokens").combine_chunks().flatten().to_numpy()
    return torch.from_numpy(flat.astype(np.int64).reshape(len(table), n_ctx + 1))


def load_documents(path: str | Path) -> dict[str, str]:
    """``doc_id -> text`` from ``documents.parquet`` (the text that ``char_start``/``char_end`` index)."""
    table = load_context_table(path)
    return dict(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()))


def context_text(texts: Mapping[str, str], table: pa.Table, row: int,
                 position: int | None = None) -> str:
    """Text of context ``row`` of ``table`` (whole window), or of its token at ``position``.

    ``texts`` is ``load_documents(...)``. The whole window's text runs from its first token's start to
    its last token's end.
    """
    record = table.slice(row, 1).to_pylist()[0]
    text = texts[record["doc_id"]]
    if position is None:
        return text[record["char_start"][0]: record["char_end"][-1]]
    return text[record["char_start"][position]: record["char_end"][position]]


def write_table(table: pa.Table, path: Path, compression: str) -> None:
    """Write a Parquet file deterministically (same table, same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression=compression)


def metadata_of(path: str | Path) -> dict[str, str]:
    """Schema metadata of a Parquet file as ``str -> str`` (JSON values stay strings)."""
    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW")}



def token_document(doc_id: str, domain: str, source: str, ids: np.ndarray,
                   strings: Sequence[str]) -> tuple[Document, TokenSpans]:
    """A document made of given token ids: its text is their strings concatenated (``strings[id]``).

    Used for token-level synthetic families, whose ids must not be re-tokenized. ``ids`` [n] int.
    """
    pieces = [strings[i] for i in ids]
    ends = np.cumsum([len(p) for p in pieces], dtype=np.int64).astype(np.int32)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int32)
    return (Document(doc_id, domain, source, "".join(pieces)),
            TokenSpans(np.asarray(ids, dtype=np.int32), starts, ends))

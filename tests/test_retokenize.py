"""Re-tokenised corpus windows (adapter studies): spans, spread over documents, seeded, sized."""

import numpy as np
import pytest

from susc_core.data import retokenize
from susc_core.data.corpus import Document, document_table
from susc_core.data.tokenizer import TokenSpans


def _chars(texts):
    """One token per character (id = code point): spans are known exactly."""
    return [TokenSpans(np.array([ord(c) for c in t], np.int32), np.arange(len(t), dtype=np.int32),
                       np.arange(1, len(t) + 1, dtype=np.int32)) for t in texts]


def _docs(n, length=40):
    return [Document(f"d{i}", "x", "test", "".join(chr(97 + (i + j) % 26) for j in range(length))) for i in range(n)]


def test_windows_are_spans_of_one_document_spread_and_seeded():
    docs = _docs(12)
    texts = {d.doc_id: d.text for d in docs}
    out = retokenize.windows(docs, _chars, n_ctx=7, n=6, seed=0, label="a")
    assert out.tokens.shape == out.char_start.shape == (6, 8)
    assert len(set(out.doc_ids)) == 6  # one window per document while there are enough documents
    for ids, start, end, doc in zip(out.tokens, out.char_start, out.char_end, out.doc_ids):
        assert "".join(chr(i) for i in ids) == texts[doc][start[0]:end[-1]]
        assert np.all(start[1:] == end[:-1])  # consecutive tokens of the document
    again = retokenize.windows(docs, _chars, n_ctx=7, n=6, seed=0, label="a")
    assert np.array_equal(again.tokens, out.tokens) and again.doc_ids == out.doc_ids
    other = retokenize.windows(docs, _chars, n_ctx=7, n=6, seed=0, label="b")
    assert other.doc_ids != out.doc_ids


def test_windows_use_several_per_document_and_say_when_too_few():
    docs = _docs(2, length=36)  # 5 windows of 8 tokens (stride 7) per document
    assert retokenize.windows(docs, _chars, n_ctx=7, n=10, seed=1, label="x").tokens.shape == (10, 8)
    with pytest.raises(ValueError, match="hold 10 windows of 8 tokens, fewer than the 11"):
        retokenize.windows(docs, _chars, n_ctx=7, n=11, seed=1, label="x")


def test_allocate_and_documents_by_domain():
    assert retokenize.allocate([3, 1], 8).tolist() == [6, 2]
    counts = retokenize.allocate([5, 3, 1], 10)
    assert counts.sum() == 10 and counts.tolist() == [6, 3, 1]
    docs = [Document("a", "x", "s", "t1"), Document("b", "y", "s", "t2"), Document("c", "x", "s", "t3")]
    by = retokenize.documents_by_domain(document_table(docs, ["train", "probe", "train"]), "train")
    assert {k: [d.doc_id for d in v] for k, v in by.items()} == {"x": ["a", "c"]}

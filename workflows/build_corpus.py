"""Build the offline corpus: ``python -m workflows.build_corpus`` (config: ``conf/build_corpus.yaml``).

Natural domains are read from registry archives and the standard library (``corpus_sources``),
split into train/probe by document, short documents bundled, tokenized and cut into
``n_ctx + 1``-token contexts; synthetic families (induction repeats, brackets, digits) are generated
from the seed. Writes ``train.parquet`` (all domains, rows shuffled), ``probes/{domain}.parquet``,
``documents.parquet`` (every document a context points into) and ``manifest.json``. Deterministic:
the same config gives byte-identical files and the same ``manifest["content_hash"]``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple
from pathlib import Path

import hydra
import numpy as np
import pyarrow as pa
import tokenizers
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from susc_core.data import corpus, synthetic
from susc_core.data.tokenizer import (EOT, clean_token_ids, encode_documents, load_tokenizer, token_strings,
                                      tokenizer_hash, train_tokenizer)
from workflows import corpus_sources as sources
from workflows.runtime import get_logger

REPO_ROOT = Path(__file__).resolve().parent.parent
log = get_logger("build_corpus")


@dataclass
class DomainConfig:
    probe_fraction: float = 0.1  # share of the domain's documents held out for probes
    train_tokens: int = 800_000  # cap on tokens this domain contributes to train.parquet
    probe_tokens: int = 38_400  # cap on tokens in probes/{domain}.parquet (300 contexts at n_ctx 128)
    max_documents: int | None = None  # per split, documents tokenized at most (None: all; small = quick builds)


@dataclass
class InductionConfig:  # token-level tiled repeats of random segments (one document per context)
    train_contexts: int = 1000
    probe_contexts: int = 300
    seg_min: int = 4
    seg_max: int = 24
    copies_min: int = 2
    copies_max: int = 5


@dataclass
class BracketsConfig:  # text documents of nested ()[]{} and quotes around random words
    train_docs: int = 600
    probe_docs: int = 120
    lines_per_doc: int = 40
    max_depth: int = 4
    p_open: float = 0.35
    max_items: int = 5
    n_words: int = 400  # filler words: lower-case whole-word tokens (" word") of the vocabulary
    min_word_chars: int = 3
    train_tokens: int = 200_000
    probe_tokens: int = 38_400


@dataclass
class DigitsConfig:  # text documents of numbers, dates and arithmetic lines
    train_docs: int = 600
    probe_docs: int = 120
    lines_per_doc: int = 100
    max_digits: int = 6
    train_tokens: int = 200_000
    probe_tokens: int = 38_400


@dataclass
class SyntheticConfig:
    induction: InductionConfig = field(default_factory=InductionConfig)
    brackets: BracketsConfig = field(default_factory=BracketsConfig)
    digits: DigitsConfig = field(default_factory=DigitsConfig)


@dataclass
class BuildCorpusConfig:
    out_dir: str = "data/corpus"  # relative paths resolve against the repository root
    sources_dir: str = ".cache/sources"
    seed: int = 0
    n_ctx: int = 128  # contexts hold n_ctx + 1 tokens
    domains: dict[str, DomainConfig] = field(default_factory=lambda: {
        name: DomainConfig() for name in ("shakespeare", "bible", "legal", "code", "docs")})
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    bundle_min_chars: int = 4096  # documents shorter than this are bundled with neighbours
    chars_per_token: float = 8.0  # train splits: tokenize documents up to this many chars per capped token
    # (about twice what the cap needs); probe splits are small and are always tokenized whole
    stdlib_skip_dirs: list[str] = field(default_factory=lambda: [
        "site-packages", "test", "tests", "idle_test"])
    docs_module_docstrings: bool = True  # add stdlib module docstrings to the docs domain
    docs_min_docstring_chars: int = 200
    docs_rst_dir: str | None = None  # e.g. /usr/share/doc/python3.11/html/_sources (off by default)
    tokenizer_path: str = "susc_core/assets/tokenizer.json"
    train_tokenizer: bool = False  # true: retrain on the natural train split and overwrite tokenizer_path
    tokenizer_vocab_size: int = 4096
    tokenizer_chars_per_domain: int = 2_000_000  # training text per natural domain (no domain dominates)
    compression: str = "zstd"


ConfigStore.instance().store(name="build_corpus_schema", node=BuildCorpusConfig)


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def _domain_generator(seed: int, name: str) -> np.random.Generator:
    """A generator per (seed, domain name): independent of the order domains are listed in."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def read_natural(cfg: BuildCorpusConfig) -> tuple[dict[str, list[corpus.Document]], list[dict]]:
    """Raw documents of every configured natural domain, and the source records for the manifest."""
    sd, skip = _resolve(cfg.sources_dir), tuple(cfg.stdlib_skip_dirs)
    readers = {
        "shakespeare": lambda: sources.shakespeare(sd), "bible": lambda: sources.bible(sd),
        "legal": lambda: sources.licences(sd), "code": lambda: sources.stdlib_code(skip),
        "docs": lambda: sources.stdlib_docs(skip, cfg.docs_module_docstrings,
                                            cfg.docs_min_docstring_chars, cfg.docs_rst_dir)}
    unknown = set(cfg.domains) - set(readers)
    if unknown:
        raise ValueError(f"unknown natural domains {sorted(unknown)}; valid: {sorted(readers)}")
    docs, records = {}, []
    for name in cfg.domains:
        docs[name], rec = readers[name]()
        records += rec if isinstance(rec, list) else [rec]
    return docs, records


def _take_contexts(generator: np.random.Generator, tokenizer, docs: list[corpus.Document], n_ctx: int,
                   max_tokens: int, chars_per_token: float | None) -> corpus.Contexts:
    """``max_tokens // n_ctx`` contexts of ``docs``, spread over as many documents as possible.

    With ``chars_per_token`` set, only a prefix of ``docs`` holding ``chars_per_token * max_tokens``
    characters is tokenized (``None``: all of them).
    """
    if chars_per_token is not None:
        lengths = np.cumsum([len(d.text) for d in docs])
        docs = docs[: int(np.searchsorted(lengths, chars_per_token * max_tokens)) + 1]
    spans = encode_documents(tokenizer, [d.text for d in docs])
    return corpus.contexts_from_documents(docs, spans, n_ctx, max_tokens // n_ctx, generator)


def synthetic_contexts(cfg: BuildCorpusConfig, tokenizer) -> dict:
    """``family -> (train Contexts, probe Contexts, [(Document, split)])`` for the synthetic families."""
    sc, strings = cfg.synthetic, token_strings(tokenizer)
    out = {}
    ind, clean = sc.induction, clean_token_ids(tokenizer, n_special=1)
    parts, used = [], []
    for split, n in (("train", ind.train_contexts), ("probe", ind.probe_contexts)):
        idx = synthetic.tiled_repeats(_domain_generator(cfg.seed, f"induction/{split}"), n, cfg.n_ctx + 1, 0,
                                      len(clean), ind.seg_min, ind.seg_max, ind.copies_min, ind.copies_max)
        made = [corpus.token_document(f"induction/{split}/{i:06d}", "induction", "synthetic.tiled_repeats",
                                      clean[row], strings) for i, row in enumerate(idx)]
        parts.append(corpus.contexts_from_documents([d for d, _ in made], [s for _, s in made], cfg.n_ctx))
        used += [(d, split) for d, _ in made]
    out["induction"] = (*parts, used)
    words = sorted({s[1:] for s in strings if s.startswith(" ") and s[1:].isascii() and s[1:].isalpha()
                    and s[1:].islower() and len(s) > cfg.synthetic.brackets.min_word_chars})
    words = list(_domain_generator(cfg.seed, "words").choice(words, size=min(sc.brackets.n_words, len(words)),
                                                               replace=False))
    for name, fc, make in (
            ("brackets", sc.brackets, lambda g, n: synthetic.bracket_documents(
                g, n, sc.brackets.lines_per_doc, words, sc.brackets.max_depth, sc.brackets.p_open,
                sc.brackets.max_items)),
            ("digits", sc.digits, lambda g, n: synthetic.digit_documents(
                g, n, sc.digits.lines_per_doc, sc.digits.max_digits))):
        parts, used = [], []
        for split, n, cap in (("train", fc.train_docs, fc.train_tokens), ("probe", fc.probe_docs, fc.probe_tokens)):
            texts = make(_domain_generator(cfg.seed, f"{name}/{split}"), n)
            docs = [corpus.Document(f"{name}/{split}/{i:06d}", name, f"synthetic.{name}", t)
                    for i, t in enumerate(texts)]
            parts.append(_take_contexts(_domain_generator(cfg.seed, f"{name}/{split}/take"), tokenizer,
                                        docs, cfg.n_ctx, cap, None))
            ids = set(parts[-1].doc_ids)
            used += [(d, split) for d in docs if d.doc_id in ids]
        out[name] = (*parts, used)
    return out


def _tokenizer(cfg: BuildCorpusConfig, train_docs: dict[str, list[corpus.Document]]):
    path = _resolve(cfg.tokenizer_path)
    if not cfg.train_tokenizer:
        tok = load_tokenizer(path)
        recipe_path = path.with_name(path.stem + "_recipe.json")
        recipe = json.loads(recipe_path.read_text()) if recipe_path.is_file() else None
        return tok, {"path": cfg.tokenizer_path, "sha256": tokenizer_hash(tok), "recipe": recipe}
    texts = []
    for name in sorted(train_docs):
        budget = cfg.tokenizer_chars_per_domain
        for d in train_docs[name]:
            if budget <= 0:
                break
            texts.append(d.text)
            budget -= len(d.text)
    tok = train_tokenizer(texts, cfg.tokenizer_vocab_size, [EOT])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    fractions = {n: cfg.domains[n].probe_fraction for n in sorted(train_docs)}
    command = " ".join(["python -m workflows.build_corpus train_tokenizer=true", f"seed={cfg.seed}",
                        f"tokenizer_vocab_size={cfg.tokenizer_vocab_size}",
                        f"tokenizer_chars_per_domain={cfg.tokenizer_chars_per_domain}",
                        f"bundle_min_chars={cfg.bundle_min_chars}",
                        *(f"domains.{n}.probe_fraction={f}" for n, f in fractions.items())])
    recipe = {"made_by": f"susc_core.data.tokenizer.train_tokenizer (byte-level BPE, tokenizers {tokenizers.__version__})",
              "command": command, "python": sys.version.split()[0],
              "vocab_size": cfg.tokenizer_vocab_size, "special_tokens": {EOT: 0}, "seed": cfg.seed,
              "training_text": f"train split (by document, seeded, probe fractions {fractions}) of the natural "
                               f"domains, documents in seeded order, up to {cfg.tokenizer_chars_per_domain} "
                               "chars per domain",
              "n_training_docs": len(texts), "n_training_chars": sum(map(len, texts)),
              "sha256": tokenizer_hash(tok)}
    path.with_name(path.stem + "_recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    return tok, {"path": cfg.tokenizer_path, "sha256": tokenizer_hash(tok), "recipe": recipe}


Splits = dict[str, tuple[list[corpus.Document], list[corpus.Document]]]  # domain -> (train, probe) documents


def _split_natural(cfg: BuildCorpusConfig, raw: dict[str, list[corpus.Document]]) -> Splits:
    """Each natural domain's documents split by document (seeded) into train and probe, capped, bundled."""
    splits: Splits = {}
    for name, docs in raw.items():
        train, probe = corpus.split_documents(_domain_generator(cfg.seed, name), docs,
                                              cfg.domains[name].probe_fraction)
        cap = cfg.domains[name].max_documents
        splits[name] = (corpus.bundle_documents(train[:cap], cfg.bundle_min_chars, EOT),
                        corpus.bundle_documents(probe[:cap], cfg.bundle_min_chars, EOT))
    return splits


class Parts(NamedTuple):
    """Every domain's train and probe contexts, the documents they came from (with their split), and counts."""

    train: dict[str, corpus.Contexts]
    probe: dict[str, corpus.Contexts]
    documents: dict[str, tuple[corpus.Document, str]]
    counts: dict[str, dict]


def _take_parts(cfg: BuildCorpusConfig, splits: Splits, tok) -> Parts:
    """Contexts of every natural domain (token budgets per split) and of every synthetic family."""
    parts = Parts({}, {}, {}, {})
    for name, (train, probe) in splits.items():
        dc = cfg.domains[name]
        for split, docs, cap, store, cpt in (
                ("train", train, dc.train_tokens, parts.train, cfg.chars_per_token),
                ("probe", probe, dc.probe_tokens, parts.probe, None)):
            store[name] = _take_contexts(_domain_generator(cfg.seed, f"{name}/{split}/take"), tok, docs,
                                         cfg.n_ctx, cap, cpt)
            ids = set(store[name].doc_ids)
            parts.documents.update({d.doc_id: (d, split) for d in docs if d.doc_id in ids})
            parts.counts.setdefault(name, {})[split] = {"documents_available": len(docs),
                                                        "documents_used": len(ids),
                                                        "contexts": len(store[name].doc_ids)}
    for name, (train_c, probe_c, docs) in synthetic_contexts(cfg, tok).items():
        parts.train[name], parts.probe[name] = train_c, probe_c
        parts.documents.update({d.doc_id: (d, split) for d, split in docs})
        parts.counts[name] = {s: {"documents_used": len(set(c.doc_ids)), "contexts": len(c.doc_ids)}
                              for s, c in (("train", train_c), ("probe", probe_c))}
    return parts


def _tables(cfg: BuildCorpusConfig, parts: Parts, meta: dict) -> dict[str, pa.Table]:
    """{relative path: table}: the shuffled training contexts, one probe file per domain, the documents."""
    names = list(parts.train)
    train_all = corpus.concat_contexts([parts.train[n] for n in names])
    domains = np.repeat(names, [len(parts.train[n].doc_ids) for n in names])
    order = np.random.default_rng([cfg.seed, 1]).permutation(len(domains))
    shuffled = corpus.Contexts(train_all.tokens[order], train_all.char_start[order],
                               train_all.char_end[order], [train_all.doc_ids[i] for i in order])
    files = {"train.parquet": corpus.context_table(shuffled, domains[order].tolist(), 0,
                                                   meta | {"domain": json.dumps(names)})}
    next_id = len(order)
    for name in names:
        part = parts.probe[name]
        files[f"probes/{name}.parquet"] = corpus.context_table(part, [name] * len(part.doc_ids), next_id,
                                                               meta | {"domain": name})
        next_id += len(part.doc_ids)
    docs_sorted = sorted(parts.documents.values(), key=lambda ds: ds[0].doc_id)
    files["documents.parquet"] = corpus.document_table([d for d, _ in docs_sorted], [s for _, s in docs_sorted])
    return files


def build_corpus(cfg: BuildCorpusConfig) -> dict:
    """Build the corpus files under ``cfg.out_dir``; returns the manifest (also written as JSON)."""
    t0 = time.perf_counter()
    out = _resolve(cfg.out_dir)
    raw, source_records = read_natural(cfg)
    splits = _split_natural(cfg, raw)
    tok, tok_info = _tokenizer(cfg, {n: s[0] for n, s in splits.items()})
    parts = _take_parts(cfg, splits, tok)
    files = _tables(cfg, parts, {"n_ctx": cfg.n_ctx, "tokenizer_sha256": tok_info["sha256"]})
    for rel, table in files.items():
        corpus.write_table(table, out / rel, cfg.compression)

    file_hashes = {rel: hashlib.sha256((out / rel).read_bytes()).hexdigest() for rel in sorted(files)}
    n_train = sum(len(c.doc_ids) for c in parts.train.values())
    manifest = {
        "content_hash": hashlib.sha256(json.dumps(file_hashes, sort_keys=True).encode()).hexdigest(),
        "files": file_hashes, "n_ctx": cfg.n_ctx, "seed": cfg.seed, "tokenizer": tok_info,
        "counts": parts.counts, "train_tokens": int(sum(c.tokens.size for c in parts.train.values())),
        "sources": source_records, "python": sys.version.split()[0],
        "attribution": "Licence texts from ScanCode LicenseDB (licensedcode-data), (c) nexB Inc. and "
                       "others, CC-BY-4.0; SPDX License List data CC0; CPython stdlib PSF-2.0.",
        "config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log.info("corpus %s: %d train contexts, hash %s, %.1f s", out, n_train, manifest["content_hash"][:12],
             time.perf_counter() - t0)
    return manifest


@hydra.main(version_base="1.3", config_path="../conf", config_name="build_corpus")
def main(cfg) -> None:
    build_corpus(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()

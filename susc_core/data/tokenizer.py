"""Byte-level BPE tokenizer: train (offline, deterministic), load the shipped one, map tokens to text.

The document separator ``<|endoftext|>`` is special token id 0. Byte-level BPE round-trips any
Unicode text exactly (``decode(encode(text)) == text``), and offsets are character positions in the
Python string, so ``text[start:end]`` is each token's text (a character split across several
byte-level tokens gives each of them that character's span).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOT = "<|endoftext|>"
DEFAULT_PATH = Path(__file__).parents[1] / "assets" / "tokenizer.json"


class TokenSpans(NamedTuple):
    """One document's tokens: ``ids``, ``char_start``, ``char_end``, each int32 ``[n_tokens]``."""

    ids: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray


def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    special_tokens: Sequence[str] = (EOT,)) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (offline; same texts in the same order give the same vocab).

    ``special_tokens`` get ids ``0..len-1`` in the given order, so ``<|endoftext|>`` first is id 0.
    ``vocab_size`` counts the special tokens and the 256 byte symbols.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least "
                         f"{len(alphabet) + len(special_tokens)} (256 bytes + special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load a tokenizer JSON file; ``None`` loads the shipped ``susc_core/assets/tokenizer.json``."""
    path = Path(path) if path is not None else DEFAULT_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}; build one with "
            "`python -m workflows.build_corpus train_tokenizer=true tokenizer_path={path}`")
    return Tokenizer.from_file(str(path))


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """sha256 hex digest of the tokenizer's canonical JSON (identifies the vocabulary and rules)."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> list[TokenSpans]:
    """Tokenize many documents at once (parallel inside ``tokenizers``); no special tokens added."""
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    out = []
    for enc in encodings:
        offsets = np.asarray(enc.offsets, dtype=np.int32).reshape(-1, 2)
        out.append(TokenSpans(np.asarray(enc.ids, dtype=np.int32), offsets[:, 0].copy(),
                              offsets[:, 1].copy()))
    return out


def token_spans(tokenizer: Tokenizer, text: str) -> TokenSpans:
    """Token ids of ``text`` with each token's character span ``text[char_start:char_end]``."""
    return encode_documents(tokenizer, [text])[0]


def token_strings(tokenizer: Tokenizer) -> list[str]:
    """Each id's text when decoded alone, indexed by id ``[vocab_size]``.

    A token holding part of a multi-byte character decodes to U+FFFD; callers that need exact text
    (e.g. synthetic token documents) should keep to ids whose string has no U+FFFD.
    """
    return [tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.get_vocab_size())]


def clean_token_ids(tokenizer: Tokenizer, n_special: int) -> np.ndarray:
    """Ids ``>= n_special`` whose lone decoding is exact text (non-empty, no U+FFFD), int64 ``[k]``.

    Concatenating their strings gives a text whose character spans are known token by token.
    """
    strings = token_strings(tokenizer)
    return np.array([i for i in range(n_special, len(strings)) if strings[i] and "\ufffd" not in strings[i]],
                    dtype=np.int64)

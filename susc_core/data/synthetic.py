"""Synthetic pattern families: token-level repeat sequences and text-level bracket/digit documents.

Token families (``tiled_repeats``, ``repeated_random``) return int64 arrays of token ids drawn from
``[vocab_low, vocab_high)``; choosing ``vocab_low`` above the special-token ids keeps them out.
Text families (``bracket_documents``, ``digit_documents``) return plain strings that the tokenizer
turns into tokens like any natural document. Every function is pure given its
``numpy.random.Generator`` (argument ``generator``): the same seed gives the same output.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _check_vocab(vocab_low: int, vocab_high: int) -> None:
    if not 0 <= vocab_low < vocab_high:
        raise ValueError(
            f"need 0 <= vocab_low < vocab_high, got vocab_low={vocab_low}, vocab_high={vocab_high}; "
            "set vocab_low above the special-token ids and vocab_high to d_vocab")


def _check_range(name: str, low: int, high: int) -> None:
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= {name}_min <= {name}_max, got {name}_min={low}, {name}_max={high}")


def tiled_repeats(generator: np.random.Generator, n_seqs: int, seq_len: int, vocab_low: int,
                  vocab_high: int, seg_min: int, seg_max: int, copies_min: int,
                  copies_max: int) -> np.ndarray:
    """Sequences tiled from random segments, each repeated back to back (induction-head curriculum).

    Each sequence is a concatenation of blocks; a block is a segment of ``L ~ U{seg_min..seg_max}``
    uniform random tokens from ``[vocab_low, vocab_high)`` written ``c ~ U{copies_min..copies_max}``
    times in a row. The concatenation is cut to ``seq_len`` (the last block may be truncated).

    Returns: int64 array ``[n_seqs, seq_len]`` of token ids.
    """
    _check_vocab(vocab_low, vocab_high)
    _check_range("seg", seg_min, seg_max)
    _check_range("copies", copies_min, copies_max)
    out = np.empty((n_seqs, seq_len), dtype=np.int64)
    for row in out:
        pos = 0
        while pos < seq_len:
            seg_len = int(generator.integers(seg_min, seg_max + 1))
            copies = int(generator.integers(copies_min, copies_max + 1))
            segment = generator.integers(vocab_low, vocab_high, size=seg_len)
            block = np.tile(segment, copies)[: seq_len - pos]
            row[pos: pos + block.size] = block
            pos += block.size
    return out


def gapped_repeats(generator: np.random.Generator, n_seqs: int, seq_len: int, vocab_low: int,
                   vocab_high: int, seg_min: int, seg_max: int, gap_min: int, gap_max: int) -> np.ndarray:
    """Sequences of blocks ``segment, gap, segment``: a random segment (length in [seg_min, seg_max]),
    random filler (length in [gap_min, gap_max]), then the segment again, cut to ``seq_len``.

    The distance between the two copies varies from block to block, so no fixed look-back offset
    predicts the copy: only an induction circuit does. Returns int64 ``[n_seqs, seq_len]`` ids in
    ``[vocab_low, vocab_high)``.
    """
    _check_vocab(vocab_low, vocab_high)
    _check_range("seg", seg_min, seg_max)
    if not 0 <= gap_min <= gap_max:
        raise ValueError(f"need 0 <= gap_min <= gap_max, got gap_min={gap_min}, gap_max={gap_max}")
    out = np.empty((n_seqs, seq_len), dtype=np.int64)
    for row in out:
        pos = 0
        while pos < seq_len:
            segment = generator.integers(vocab_low, vocab_high, size=int(generator.integers(seg_min, seg_max + 1)))
            gap = generator.integers(vocab_low, vocab_high, size=int(generator.integers(gap_min, gap_max + 1)))
            block = np.concatenate([segment, gap, segment])[: seq_len - pos]
            row[pos: pos + block.size] = block
            pos += block.size
    return out


def repeated_random(generator: np.random.Generator, n_seqs: int, half_len: int, vocab_low: int,
                    vocab_high: int) -> np.ndarray:
    """Random tokens followed by an exact copy: the classic induction test.

    Returns: int64 array ``[n_seqs, 2 * half_len]`` with ``out[:, half_len:] == out[:, :half_len]``.
    """
    _check_vocab(vocab_low, vocab_high)
    if half_len < 1:
        raise ValueError(f"half_len must be >= 1, got {half_len}")
    first = generator.integers(vocab_low, vocab_high, size=(n_seqs, half_len), dtype=np.int64)
    return np.concatenate([first, first], axis=1)


BRACKET_PAIRS: tuple[tuple[str, str], ...] = (("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'"))


def _nested(generator: np.random.Generator, words: Sequence[str], depth: int, max_depth: int,
            p_open: float, max_items: int) -> str:
    """One nested group: random words and (with probability ``p_open`` per item) deeper groups."""
    items = []
    for _ in range(int(generator.integers(1, max_items + 1))):
        if depth < max_depth and generator.random() < p_open:
            left, right = BRACKET_PAIRS[int(generator.integers(len(BRACKET_PAIRS)))]
            inner = _nested(generator, words, depth + 1, max_depth, p_open, max_items)
            items.append(f"{left}{inner}{right}")
        else:
            items.append(str(words[int(generator.integers(len(words)))]))
    return " ".join(items)


def bracket_documents(generator: np.random.Generator, n_docs: int, lines_per_doc: int,
                      words: Sequence[str], max_depth: int, p_open: float,
                      max_items: int) -> list[str]:
    """Text documents of balanced nested delimiters ``()[]{}`` and quotes around random words.

    Each line is one top-level group of at most ``max_items`` items, nested at most ``max_depth``
    deep; every opened delimiter is closed in the same line. ``words`` is the vocabulary of fillers.

    Returns: ``n_docs`` strings of ``lines_per_doc`` newline-terminated lines.
    """
    if not words:
        raise ValueError("words must be a non-empty list of filler words")
    if not 0.0 <= p_open < 1.0:
        raise ValueError(f"p_open must lie in [0, 1), got {p_open}")
    return ["".join(_nested(generator, words, 0, max_depth, p_open, max_items) + "\n"
                    for _ in range(lines_per_doc)) for _ in range(n_docs)]


MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")


def _digit_line(generator: np.random.Generator, max_digits: int) -> str:
    """One line of a digit document: a number, a date, or an arithmetic identity (kind chosen uniformly)."""
    kind = int(generator.integers(3))
    if kind == 0:
        return str(int(generator.integers(0, 10 ** int(generator.integers(1, max_digits + 1)))))
    if kind == 1:
        year, month, day = (int(generator.integers(1000, 2100)), int(generator.integers(1, 13)),
                            int(generator.integers(1, 29)))
        if generator.random() < 0.5:
            return f"{year:04d}-{month:02d}-{day:02d}"
        return f"{day} {MONTHS[month - 1]} {year}"
    a, b = (int(generator.integers(0, 10 ** int(generator.integers(1, max_digits + 1)))) for _ in range(2))
    op = "+-*"[int(generator.integers(3))]
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b} = {value}"


def digit_documents(generator: np.random.Generator, n_docs: int, lines_per_doc: int,
                    max_digits: int) -> list[str]:
    """Text documents of digit strings: plain numbers, dates and arithmetic lines (``a op b = c``).

    Operands have at most ``max_digits`` digits; arithmetic results are correct.

    Returns: ``n_docs`` strings of ``lines_per_doc`` newline-terminated lines.
    """
    if max_digits < 1:
        raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    return ["".join(_digit_line(generator, max_digits) + "\n" for _ in range(lines_per_doc))
            for _ in range(n_docs)]

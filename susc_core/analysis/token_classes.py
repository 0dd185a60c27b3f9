"""Token-pattern classes of predicted tokens in context (SCIENCE.md §5; definitions *unconfirmed*,
so every character set and the label order live in ``TokenClassRules``).

A token is the predicted token y at one position of a context; its text is the decoded text.
Classes (a token may have several):
- ``word_start``: begins a word: a word-start prefix (a space) then a letter, or a letter right
  after a token that does not end in a letter or digit (e.g. after a newline or "(").
- ``word_part``: begins with a letter, continues a word, and the next token continues it too.
- ``word_end``: begins with a letter (after an optional prefix) and the next token does not begin
  with a letter, or the context ends. A one-token word " the" is both word_start and word_end.
- ``induction_pattern``: the bigram (previous token, y) already occurred earlier in the context.
- ``left_delimiter`` / ``right_delimiter``: the stripped text ends with an opening bracket / begins
  with a closing one; a token of quote characters only is left when preceded by whitespace (or a
  left delimiter, or the context start) and right otherwise.
- ``spacing``: whitespace without a newline. ``formatting``: whitespace with a newline, or only
  formatting characters (markup rules, ``#``, ``*``...). ``numeric``: digits (with separators).
The first token of a context has no known predecessor: it is never an induction pattern and never
a word start by the "after a non-letter" rule.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pyarrow as pa

from susc_core.analysis.config import TokenClassRules

CLASSES = ("word_start", "word_part", "word_end", "induction_pattern", "left_delimiter",
           "right_delimiter", "spacing", "formatting", "numeric")
OTHER = "other"


class TokenClasses(NamedTuple):
    """Class flags aligned with the rows they were computed for."""

    names: tuple[str, ...]  # = CLASSES
    flags: np.ndarray  # [n_tokens, n_classes] bool
    primary: np.ndarray  # [n_tokens] str: first class of rules.priority that applies, else "other"


def _body(text: str, rules: TokenClassRules) -> tuple[bool, str]:
    """(has a word-start prefix, text without it)."""
    for prefix in rules.word_start_prefixes:
        if text.startswith(prefix) and len(text) > len(prefix):
            return True, text[len(prefix):]
    return False, text


def _quote_side(text: str, prev: str | None, rules: TokenClassRules) -> str | None:
    stripped = text.strip()
    if not stripped or any(ch not in rules.quotes for ch in stripped):
        return None
    opens = (text[0].isspace() or prev is None or prev == "" or prev[-1].isspace()
             or prev.strip()[-1:] in tuple(rules.left_delimiters))
    return "left" if opens else "right"


def classify_context(texts: Sequence[str], token_ids: Sequence[int],
                     rules: TokenClassRules) -> np.ndarray:
    """Class flags [n_tokens, len(CLASSES)] (bool) of the predicted tokens of one context, given
    their texts and ids at consecutive positions 0..n-1 (in order)."""
    if len(texts) != len(token_ids):
        raise ValueError(f"texts ({len(texts)}) and token_ids ({len(token_ids)}) differ in length")
    col = {name: j for j, name in enumerate(CLASSES)}
    flags = np.zeros((len(texts), len(CLASSES)), dtype=bool)
    seen_bigrams: set[tuple[int, int]] = set()
    for i, text in enumerate(texts):
        prev = texts[i - 1] if i > 0 else None
        nxt = texts[i + 1] if i + 1 < len(texts) else None
        row = flags[i]
        has_prefix, body = _body(text, rules)
        letter = body[:1].isalpha()
        after_non_word = prev is not None and not prev[-1:].isalnum()
        row[col["word_start"]] = letter and (has_prefix or after_non_word)
        next_continues = nxt is not None and nxt[:1].isalpha()
        row[col["word_part"]] = letter and not row[col["word_start"]] and next_continues
        row[col["word_end"]] = letter and not next_continues
        if i > 0:
            bigram = (int(token_ids[i - 1]), int(token_ids[i]))
            row[col["induction_pattern"]] = bigram in seen_bigrams
            seen_bigrams.add(bigram)
        stripped = text.strip()
        quote = _quote_side(text, prev, rules)
        row[col["left_delimiter"]] = quote == "left" or (
            stripped[-1:] != "" and stripped[-1] in rules.left_delimiters)
        row[col["right_delimiter"]] = quote == "right" or (
            stripped[:1] != "" and stripped[0] in rules.right_delimiters)
        blank = text != "" and text.isspace()
        row[col["spacing"]] = blank and "\n" not in text
        row[col["formatting"]] = (blank and "\n" in text) or (
            stripped != "" and all(ch in rules.formatting_chars for ch in stripped))
        row[col["numeric"]] = (any(ch.isdigit() for ch in stripped)
                               and all(ch in rules.numeric_chars for ch in stripped))
    return flags


def primary_class(flags: np.ndarray, rules: TokenClassRules) -> np.ndarray:
    """One label per token from flags [n_tokens, n_classes]: the first class in ``rules.priority``
    that applies, else "other". Returns [n_tokens] str."""
    unknown = [c for c in rules.priority if c not in CLASSES]
    if unknown:
        raise ValueError(f"token_classes.priority names unknown classes {unknown}; valid: {CLASSES}")
    labels = np.full(len(flags), OTHER, dtype=object)
    for name in reversed(rules.priority):
        labels[flags[:, CLASSES.index(name)]] = name
    return labels


def classify_table(table: pa.Table, rules: TokenClassRules) -> TokenClasses:
    """Token classes of every row of a token table (columns ``probe``, ``context_id``,
    ``position``, ``token_id``, ``token_text``), aligned with the table's row order.

    Rows of one (probe, context_id) must cover consecutive positions: the classes need each
    token's neighbours.
    """
    probe = np.asarray(table.column("probe").to_pylist(), dtype=object)
    context = table.column("context_id").to_numpy()
    position = table.column("position").to_numpy()
    ids = table.column("token_id").to_numpy()
    texts = table.column("token_text").to_pylist()
    _, probe_code = np.unique(probe, return_inverse=True)
    order = np.lexsort((position, context, probe_code))
    key = np.stack([probe_code[order], context[order]], axis=1)
    breaks = np.flatnonzero((key[1:] != key[:-1]).any(axis=1)) + 1
    flags = np.zeros((len(order), len(CLASSES)), dtype=bool)
    for rows in np.split(order, breaks):
        if len(rows) and np.any(np.diff(position[rows]) != 1):
            raise ValueError(f"context {context[rows[0]]} of probe {probe[rows[0]]!r} has missing or "
                             "repeated positions; token classes need every position of a context")
        flags[rows] = classify_context([texts[r] for r in rows], ids[rows], rules)
    return TokenClasses(CLASSES, flags, primary_class(flags, rules))


def extreme_class_shares(scores: np.ndarray, flags: np.ndarray, names: tuple[str, ...],
                         fraction: float) -> list[dict]:
    """The paper's Fig. 3 for one PC: per token class, the share of the lowest-scoring (``low``: the
    expression side) and of the highest-scoring (``high``: the suppression side) ``fraction`` of tokens
    that have the class, beside its share among all tokens (``all``). A token counts in every class it
    has; ``other`` holds the tokens with none. scores: [n]; flags: [n, len(names)] bool; each end holds
    max(1, round(fraction · n)) tokens. Classes no token has are left out."""
    if not 0 < fraction <= 0.5:
        raise ValueError(f"report.extreme_fraction must be in (0, 0.5]; got {fraction}")
    flags = np.column_stack([flags, ~flags.any(axis=1)])
    order = np.argsort(scores, kind="stable")
    n_end = max(1, round(fraction * len(scores)))
    ends = {"low": order[:n_end], "all": order, "high": order[len(order) - n_end:]}
    return [{"class": name, **{end: float(flags[rows, j].mean()) for end, rows in ends.items()}}
            for j, name in enumerate((*names, OTHER)) if flags[:, j].any()]

"""Token-pattern classes on hand-written token sequences."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from susc_core.analysis import TokenClassRules
from susc_core.analysis.token_classes import CLASSES, classify_context, classify_table, primary_class

RULES = TokenClassRules()


def classes_of(texts: list[str], ids: list[int] | None = None, rules: TokenClassRules = RULES):
    ids = list(range(len(texts))) if ids is None else ids
    flags = classify_context(texts, ids, rules)
    return [{c for c, on in zip(CLASSES, row) if on} for row in flags]


def test_word_start_part_end():
    got = classes_of([" The", " trans", "form", "er", " is", "\n", "Next", "("])
    assert got == [{"word_start", "word_end"}, {"word_start"}, {"word_part"}, {"word_end"},
                   {"word_start", "word_end"}, {"formatting"}, {"word_start", "word_end"},
                   {"left_delimiter"}]


def test_first_token_has_no_known_predecessor():
    # "ing" at position 0 may continue a word: never a word start by the after-non-letter rule
    assert classes_of(["ing", " x"]) == [{"word_end"}, {"word_start", "word_end"}]


def test_induction_pattern_needs_the_same_bigram_earlier():
    # ids: A B C A B  -> the second "B" repeats the bigram (A, B); the second "A" does not
    got = classes_of([" a", " b", " c", " a", " b"], [1, 2, 3, 1, 2])
    assert ["induction_pattern" in g for g in got] == [False, False, False, False, True]
    # the same token after a different predecessor is no induction pattern
    got = classes_of([" a", " b", " c", " b"], [1, 2, 3, 2])
    assert not any("induction_pattern" in g for g in got)


def test_delimiters_and_quotes():
    got = classes_of([" (", "x", ")", ":", " [", "])", " \"", "hi", "\"", "=<", ">"])
    assert [g & {"left_delimiter", "right_delimiter"} for g in got] == [
        {"left_delimiter"}, set(), {"right_delimiter"}, set(), {"left_delimiter"}, {"right_delimiter"},
        {"left_delimiter"}, set(), {"right_delimiter"}, {"left_delimiter"}, {"right_delimiter"}]


def test_spacing_formatting_numeric():
    got = classes_of(["  ", "\t", "\n\n", " ##", "---", "42", " 3.14", "1,000", "v2", ","])
    assert got == [{"spacing"}, {"spacing"}, {"formatting"}, {"formatting"}, {"formatting"},
                   {"numeric"}, {"numeric"}, {"numeric"}, {"word_end"}, set()]  # "v2" follows a digit


def test_rules_are_configurable():
    rules = TokenClassRules(left_delimiters="(", right_delimiters=")", word_start_prefixes=["Ġ"],
                            numeric_chars="0123456789")
    assert classes_of([" <", "Ġword", "1.5"], rules=rules) == [set(), {"word_start", "word_end"}, set()]


def test_primary_class_follows_priority():
    flags = classify_context([" a", " b", " a", " b", "s"], [1, 2, 1, 2, 3], RULES)
    assert list(primary_class(flags, RULES)) == ["word_start", "word_start", "word_start",
                                                 "induction_pattern", "word_end"]
    reordered = TokenClassRules(priority=["word_start", "induction_pattern"])
    assert primary_class(flags, reordered)[3] == "word_start"
    assert primary_class(np.zeros((1, len(CLASSES)), bool), RULES)[0] == "other"
    with pytest.raises(ValueError, match="unknown classes"):
        primary_class(flags, TokenClassRules(priority=["wordstart"]))


def test_classify_table_aligns_with_shuffled_rows_and_checks_positions():
    texts = [" a", " b", " a", " b", " (", ")"]
    table = pa.table({"probe": ["p"] * 4 + ["q"] * 2, "context_id": [7] * 6,
                      "position": [0, 1, 2, 3, 0, 1], "token_id": [1, 2, 1, 2, 5, 6],
                      "token_text": texts})
    perm = [5, 3, 0, 4, 1, 2]
    got = classify_table(table.take(perm), RULES)
    assert list(got.primary) == [["word_start", "word_start", "word_start", "induction_pattern",
                                  "left_delimiter", "right_delimiter"][i] for i in perm]
    gap = table.set_column(2, "position", pa.array([0, 1, 3, 4, 0, 1], pa.int32()))
    with pytest.raises(ValueError, match="context 7 of probe 'p' has missing or repeated positions"):
        classify_table(gap, RULES)

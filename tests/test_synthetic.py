"""Structure of the synthetic families: repeats really repeat, ids stay in range, seeds reproduce."""

import re

import numpy as np
import pytest

from susc_core.data import synthetic


def _blocks(row: np.ndarray, seg_min: int, seg_max: int, copies_min: int, copies_max: int) -> bool:
    """True if ``row`` can be parsed as blocks of a segment repeated ``copies`` times (last cut)."""
    pos = 0
    while pos < row.size:
        ok = False
        for seg_len in range(seg_min, seg_max + 1):
            seg = row[pos: pos + seg_len]
            for copies in range(copies_max, copies_min - 1, -1):
                block = np.tile(seg, copies)[: row.size - pos]
                if np.array_equal(row[pos: pos + block.size], block):
                    ok = True
                    break
            if ok:
                break
        if not ok:
            return False
        pos += block.size
    return True


def test_tiled_repeats_shape_range_and_repeats():
    gen = np.random.default_rng(0)
    out = synthetic.tiled_repeats(gen, n_seqs=8, seq_len=64, vocab_low=5, vocab_high=50,
                                  seg_min=4, seg_max=8, copies_min=2, copies_max=4)
    assert out.shape == (8, 64) and out.dtype == np.int64
    assert out.min() >= 5 and out.max() < 50
    assert all(_blocks(row, 4, 8, 2, 4) for row in out)
    # the first segment is copied at least twice: positions [L, 2L) repeat [0, L) for some L in range
    assert all(any(np.array_equal(r[:L], r[L:2 * L]) for L in range(4, 9)) for r in out)


def test_tiled_repeats_exact_structure_with_fixed_lengths():
    gen = np.random.default_rng(1)
    out = synthetic.tiled_repeats(gen, 3, 20, 1, 1000, seg_min=3, seg_max=3, copies_min=2, copies_max=2)
    for row in out:
        for start in range(0, 18, 6):
            np.testing.assert_array_equal(row[start: start + 3], row[start + 3: start + 6])
        assert not np.array_equal(row[0:3], row[6:9])  # fresh segment per block (1000-token vocab)


def test_tiled_repeats_seed_reproduces_and_differs():
    args = dict(n_seqs=4, seq_len=32, vocab_low=1, vocab_high=100, seg_min=2, seg_max=6,
                copies_min=2, copies_max=5)
    a = synthetic.tiled_repeats(np.random.default_rng(7), **args)
    b = synthetic.tiled_repeats(np.random.default_rng(7), **args)
    c = synthetic.tiled_repeats(np.random.default_rng(8), **args)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_low=10, vocab_high=10), "vocab_low"),
    (dict(seg_min=5, seg_max=4), "seg_min"),
    (dict(copies_min=0), "copies_min"),
])
def test_tiled_repeats_bad_input(kwargs, match):
    args = dict(n_seqs=1, seq_len=8, vocab_low=1, vocab_high=10, seg_min=2, seg_max=3,
                copies_min=2, copies_max=3) | kwargs
    with pytest.raises(ValueError, match=match):
        synthetic.tiled_repeats(np.random.default_rng(0), **args)


def test_repeated_random_copies_first_half():
    out = synthetic.repeated_random(np.random.default_rng(0), n_seqs=5, half_len=30, vocab_low=1,
                                    vocab_high=4096)
    assert out.shape == (5, 60)
    np.testing.assert_array_equal(out[:, :30], out[:, 30:])
    assert out.min() >= 1 and 0 not in out
    assert len(np.unique(out[0, :30])) > 25  # random, not constant


def _balanced(line: str) -> bool:
    stack = []
    closers = {")": "(", "]": "[", "}": "{"}
    for ch in line:
        if ch in "([{":
            stack.append(ch)
        elif ch in closers:
            if not stack or stack.pop() != closers[ch]:
                return False
    return not stack


def test_bracket_documents_balanced_and_nested():
    docs = synthetic.bracket_documents(np.random.default_rng(0), n_docs=20, lines_per_doc=10,
                                       words=["alpha", "beta", "gamma"], max_depth=4, p_open=0.5,
                                       max_items=4)
    assert len(docs) == 20
    lines = [line for doc in docs for line in doc.splitlines()]
    assert len(lines) == 200 and all(_balanced(line) for line in lines)
    assert all(line.count('"') % 2 == 0 for line in lines)
    assert any(re.search(r"[(\[{][^)\]}]*[(\[{]", line) for line in lines)  # some nesting occurs
    assert set(re.findall(r"[a-z]+", "".join(docs))) == {"alpha", "beta", "gamma"}


def test_digit_documents_arithmetic_is_correct():
    docs = synthetic.digit_documents(np.random.default_rng(3), n_docs=10, lines_per_doc=30, max_digits=4)
    lines = [line for doc in docs for line in doc.splitlines()]
    sums = [line for line in lines if "=" in line]
    assert len(sums) > 50
    for line in sums:
        a, op, b, _, c = line.split()
        assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert any(re.fullmatch(r"\d{4}-\d{2}-\d{2}", line) for line in lines)
    assert synthetic.digit_documents(np.random.default_rng(3), 10, 30, 4) == docs


def test_gapped_repeats_exact_structure_with_fixed_lengths():
    gen = np.random.default_rng(2)
    out = synthetic.gapped_repeats(gen, 4, 30, 1, 1000, seg_min=4, seg_max=4, gap_min=2, gap_max=2)
    assert out.shape == (4, 30) and out.min() >= 1 and out.max() < 1000
    for row in out:  # blocks of 10 tokens: segment (4), gap (2), the same segment (4)
        for start in range(0, 30, 10):
            np.testing.assert_array_equal(row[start: start + 4], row[start + 6: start + 10])
            assert not np.array_equal(row[start: start + 4], row[start + 4: start + 8])


def test_gapped_repeats_vary_the_distance_between_copies():
    gen = np.random.default_rng(3)
    out = synthetic.gapped_repeats(gen, 64, 40, 1, 5000, seg_min=6, seg_max=6, gap_min=0, gap_max=8)
    # the second copy of the first segment starts 6 + gap tokens in: several distinct offsets occur
    offsets = {next(o for o in range(6, 15) if np.array_equal(r[o:o + 6], r[:6])) for r in out}
    assert len(offsets) >= 5

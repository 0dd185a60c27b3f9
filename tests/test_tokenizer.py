"""Byte-level BPE: exact round trips, character offsets, determinism, the shipped tokenizer."""

import json

import pytest

from susc_core.data import tokenizer as T

SAMPLES = {
    "code": 'def f(x: int) -> dict[str, list[int]]:\n\treturn {"a": [x ** 2, x // 3]}  # ok\n',
    "prose": "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "unicode": "naïve café — Grüße, 東京 🙂 e\u0301 \u00a0nbsp\r\nend",
}


@pytest.fixture(scope="module")
def shipped():
    return T.load_tokenizer()


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_round_trip(shipped, kind):
    text = SAMPLES[kind]
    ids = shipped.encode(text, add_special_tokens=False).ids
    assert shipped.decode(ids) == text
    assert 0 not in ids  # plain text never produces the separator


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_offsets_map_tokens_to_text(shipped, kind):
    text = SAMPLES[kind]
    spans = T.token_spans(shipped, text)
    assert spans.ids.dtype == spans.char_start.dtype == spans.char_end.dtype
    assert spans.char_start[0] == 0 and spans.char_end[-1] == len(text)
    assert (spans.char_start[1:] >= spans.char_start[:-1]).all()
    for i, s, e in zip(spans.ids, spans.char_start, spans.char_end):
        piece = shipped.decode([int(i)])
        if "\ufffd" not in piece:  # whole characters: the span is exactly the token's text
            assert text[s:e] == piece
    # a multi-byte character split over several byte tokens gives each of them its span
    if kind == "unicode":
        emoji = text.index("🙂")
        assert ((spans.char_start <= emoji) & (spans.char_end > emoji)).sum() >= 1


def test_shipped_tokenizer_vocab_and_separator(shipped):
    assert shipped.get_vocab_size() == 4096
    assert shipped.token_to_id(T.EOT) == 0
    spans = T.token_spans(shipped, f"one{T.EOT}two")
    assert 0 in spans.ids.tolist()
    k = spans.ids.tolist().index(0)
    assert (spans.char_start[k], spans.char_end[k]) == (3, 3 + len(T.EOT))
    recipe = json.loads((T.DEFAULT_PATH.with_name("tokenizer_recipe.json")).read_text())
    assert recipe["vocab_size"] == 4096 and recipe["special_tokens"] == {T.EOT: 0}
    assert recipe["sha256"] == T.tokenizer_hash(shipped)  # the recipe describes this very file


def test_training_is_deterministic_and_puts_eot_first():
    texts = [SAMPLES["prose"] * 20, SAMPLES["code"] * 20, "the theme of the thesis " * 50]
    a = T.train_tokenizer(texts, vocab_size=300, special_tokens=[T.EOT])
    b = T.train_tokenizer(texts, vocab_size=300, special_tokens=[T.EOT])
    assert a.to_str() == b.to_str() and T.tokenizer_hash(a) == T.tokenizer_hash(b)
    assert a.get_vocab_size() == 300 and a.token_to_id(T.EOT) == 0
    assert len(a.encode("the theme of the thesis").ids) < len("the theme of the thesis")  # merges learned
    assert a.decode(a.encode(SAMPLES["unicode"]).ids) == SAMPLES["unicode"]


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        T.train_tokenizer(["abc"], vocab_size=100)


def test_missing_tokenizer_file_says_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tokenizer=true"):
        T.load_tokenizer(tmp_path / "nope.json")


def test_clean_token_ids_decode_to_exact_text(shipped):
    ids = T.clean_token_ids(shipped, n_special=1)
    strings = T.token_strings(shipped)
    assert ids.min() >= 1 and len(ids) > 3500
    assert all(strings[i] and "\ufffd" not in strings[i] for i in ids)
    sample = [int(i) for i in ids[::97]]
    assert shipped.decode(sample) == "".join(strings[i] for i in sample)

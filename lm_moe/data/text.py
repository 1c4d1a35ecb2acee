"""Language-model data: documents -> tiktoken ids -> packed blocks of `block_size + 1` tokens.

Pipeline (all through Hugging Face `datasets`, so every step is cached on disk):

1. Load documents: the offline default `python-stdlib` (the running interpreter's standard
   library, one .py file = one document), local .txt / .jsonl / .json / .parquet files, or a
   dataset from the Hugging Face Hub.
2. Tokenise once with a batched `map`, appending end-of-text after each document. The cache
   key includes the tokenizer name and vocabulary size.
3. Split by document (seeded), so no document contributes to both train and validation.
4. Pack each split's token stream into non-overlapping blocks of `block_size + 1` tokens:
   inputs are a block's first `block_size` tokens, targets its last `block_size`. Because
   blocks do not overlap, no block's inputs hold another block's targets, which matters for
   layers that mix batch-mates (Mixture of Tokens).

The packed blocks are held in memory (int32), which suits corpora up to a few hundred million
tokens.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lm_moe.argument_checks import require_non_negative_int, require_positive_int, require_proper_fraction
from lm_moe.data.loaders import batches_trained, evaluation_loader, training_loader
from lm_moe.data.tokenizer import load_encoding

STDLIB = "python-stdlib"
STDLIB_TESTS = "python-stdlib-tests"  # a second offline corpus, of another kind: the test suites

# Local file suffix -> `datasets` builder. A .txt file is one document.
_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# Standard-library folders left out of the default corpus: test suites (many distributions
# ship them separately, and they hold deliberately malformed files) and installed packages.
_STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}
_STDLIB_SKIP_DIRS = {*_STDLIB_TEST_DIRS, "site-packages", "dist-packages", "__pycache__"}

# Part of the tokenised cache's key: bump it when `_tokenize` changes what it writes.
_TOKENIZE_VERSION = "1"


def stdlib_files(tests: bool = False) -> list[str]:
    """The standard library's non-empty .py files, sorted: its modules (test suites and installed
    packages left out), or with `tests` its test suites alone, less the few files that are not
    UTF-8 (malformed on purpose)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        in_tests = bool(_STDLIB_TEST_DIRS & set(Path(os.path.relpath(dirpath, root)).parts))
        dirnames[:] = [d for d in dirnames if d not in (_STDLIB_SKIP_DIRS - _STDLIB_TEST_DIRS if tests else _STDLIB_SKIP_DIRS)]
        if in_tests == tests:
            files += [os.path.join(dirpath, name) for name in filenames if name.endswith(".py")]
    files = sorted(path for path in files if os.path.getsize(path) > 0 and (not tests or _is_utf8(path)))
    if not files:
        raise FileNotFoundError(f"no {'test suite ' if tests else ''}.py files found in the standard library at {root!r}")
    return files


def _is_utf8(path: str) -> bool:
    try:
        Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return False
    return True


def resolve_data_files(data_files: str | list[str]) -> list[str]:
    """Expand paths and globs (in the order given, each glob sorted); each must match non-empty files.
    A file that several patterns match is read once: twice, its documents could land in both splits."""
    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    files, seen = [], set()  # seen: the real paths of `files`
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [path for path in matches if os.path.isfile(path)]
        if not matches:
            raise FileNotFoundError(
                f"no data file found at {pattern!r} (for a folder, give a glob such as 'dir/*.txt')"
            )
        for path in matches:
            real_path = os.path.realpath(path)
            if real_path not in seen:
                seen.add(real_path)
                files.append(path)
    for path in files:
        if os.path.getsize(path) == 0:
            raise ValueError(f"data file {path!r} is empty")
    return files


def _builder_for(files: list[str]) -> str:
    """The `datasets` builder reading `files`, chosen from their suffix (one format per run)."""
    suffixes = sorted({Path(path).suffix.lower() for path in files})
    builders = {_BUILDERS.get(suffix) for suffix in suffixes}
    if None in builders or len(builders) != 1:
        raise ValueError(f"data_files must all have one of the formats {sorted(_BUILDERS)}; got {suffixes}")
    return builders.pop()


def _is_string(feature) -> bool:
    """Whether a `datasets` column holds text: Value("string") or Value("large_string")."""
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def unigram_log_probs(train_blocks: Tensor, vocab_size: int) -> Tensor:
    """Log-probabilities [V] of the train split's target-token frequencies (add-one smoothed): the
    model that ignores context, whose cross-entropy is the bar a trained LM must clear."""
    counts = torch.bincount(train_blocks[:, 1:].flatten().long(), minlength=vocab_size).double() + 1  # [V]
    return torch.log(counts / counts.sum())  # [V]


class PackedBlocks(Dataset):
    """Map-style dataset over packed token blocks; item i is one training sequence."""

    def __init__(self, blocks: Tensor):
        self.blocks = blocks  # [N, T + 1] int32

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        block = self.blocks[index].long()  # [T + 1]
        return {"input_ids": block[:-1], "targets": block[1:]}  # [T], [T]


class TextDataModule(pl.LightningDataModule):
    """Tokenised, packed text for next-token prediction.

    Batches are `{"input_ids": LongTensor[B, T], "targets": LongTensor[B, T]}` with `T =
    block_size` and `targets[:, t] == input_ids[:, t + 1]` inside each row.

    Args:
        dataset: `"python-stdlib"` (offline default: the standard library's .py files, test
            suites left out), `"python-stdlib-tests"` (offline: its test suites alone, a corpus of
            another kind for fine-tuning), or a Hugging Face Hub dataset name (needs network or a cache).
        data_files: local .txt / .jsonl / .json / .parquet files or globs, one format per run,
            replacing the default corpus. A .txt file is one document. With a Hub `dataset`,
            they select files inside that dataset instead.
        dataset_config: Hub dataset configuration name.
        text_column: column holding the text (.txt files always give "text").
        tokenizer: tiktoken encoding name; "cl100k_base" works offline.
        vocab_size: keep the first `vocab_size` ids of the encoding; None keeps it whole.
        block_size: tokens per training sequence (T).
        batch_size: sequences per batch (per device).
        val_fraction: fraction of documents held out for validation (and test).
        max_documents: use only the first `max_documents` documents, in corpus order (quick runs).
        seed: seeds the train/validation split, and the training shuffle unless `shuffle_seed` is set.
        shuffle_seed: seeds the training shuffle alone (None: `seed`), so runs of several seeds see
            the batches in other orders while validating on the same documents.
        num_workers: DataLoader worker processes.
        cache_dir: `datasets` cache folder (default: the Hugging Face cache).
    """

    def __init__(
        self,
        dataset: str = STDLIB,
        data_files: str | list[str] | None = None,
        dataset_config: str | None = None,
        text_column: str = "text",
        tokenizer: str = "cl100k_base",
        vocab_size: int | None = 8192,
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        max_documents: int | None = None,
        seed: int = 1234,
        shuffle_seed: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__()
        require_positive_int("block_size", block_size)
        require_positive_int("batch_size", batch_size)
        require_proper_fraction("val_fraction", val_fraction)
        require_non_negative_int("num_workers", num_workers)
        if max_documents is not None and max_documents < 2:
            raise ValueError(f"max_documents must be >= 2 (one train, one validation), got {max_documents}")
        self.dataset = dataset
        self.data_files = data_files
        self.dataset_config = dataset_config
        self.text_column = text_column
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_documents = max_documents
        self.seed = seed
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self.num_workers = num_workers
        self.cache_dir = cache_dir

        # Known before any data is read, so a CLI can link data.vocab_size -> model.vocab_size.
        self.tokenizer = load_encoding(tokenizer, vocab_size)
        self.vocab_size = self.tokenizer.vocab_size
        # vocab_size None (the whole encoding) is left out of the hparams: the model's hold the
        # resolved size, and Lightning refuses to merge the two if they differ. A missing vocab_size
        # reads back as None.
        self.save_hyperparameters(ignore=["vocab_size"] if vocab_size is None else [])
        self.block_size = block_size

        # Local sources are listed now, so a wrong path fails before anything else runs.
        self._local_files: list[str] | None = None  # both stay None for a Hub dataset
        self._builder: str | None = None
        if dataset in (STDLIB, STDLIB_TESTS) and data_files is None:
            self._local_files, self._builder = stdlib_files(tests=dataset == STDLIB_TESTS), "text"
        elif dataset == STDLIB:
            self._local_files = resolve_data_files(data_files)
            self._builder = _builder_for(self._local_files)

        self.train_set: PackedBlocks | None = None
        self.val_set: PackedBlocks | None = None
        self.unigram_log_probs: Tensor | None = None  # [V], set by setup()

    # ---- loading and tokenising (cached by `datasets`) ----

    def _load_documents(self) -> datasets.Dataset:
        """The raw corpus as a `datasets.Dataset`, capped at `max_documents`."""
        if self._local_files is not None:
            options = {"sample_by": "document"} if self._builder == "text" else {}
            try:
                documents = datasets.load_dataset(
                    self._builder,
                    data_files=self._local_files,
                    split="train",
                    cache_dir=self.cache_dir,
                    **options,
                )
            except datasets.exceptions.DatasetGenerationError as err:
                # The builder's own message is generic; the cause says what was wrong.
                raise ValueError(f"could not read {self._source()}: {err.__cause__!r}") from err
        else:
            try:
                documents = datasets.load_dataset(
                    self.dataset,
                    self.dataset_config,
                    data_files=self.data_files,
                    split="train",
                    cache_dir=self.cache_dir,
                )
            except (ConnectionError, FileNotFoundError) as err:
                raise FileNotFoundError(
                    f"could not load dataset {self.dataset!r} (config {self.dataset_config!r}): {err}. "
                    f"Offline, only cached Hub datasets load; the offline default is {STDLIB!r}, "
                    "or give local data_files."
                ) from err
        if self.text_column not in documents.column_names:
            raise ValueError(
                f"text_column {self.text_column!r} is not in the dataset; "
                f"available columns: {documents.column_names}"
            )
        feature = documents.features[self.text_column]
        if not _is_string(feature):
            # Checked here: tiktoken would fail on the first non-string value, deep inside the map.
            strings = [name for name, other in documents.features.items() if _is_string(other)]
            raise ValueError(
                f"text_column {self.text_column!r} holds {feature} values, not strings; "
                f"string columns: {strings}"
            )
        missing = documents.data.column(self.text_column).null_count  # e.g. jsonl rows without the key
        if missing:
            rank_zero_warn(
                f"{missing} of {len(documents)} rows of {self._source()} have no {self.text_column!r} value "
                "and are left out (is text_column the right column?)"
            )
        if self.max_documents is not None and len(documents) > self.max_documents:
            documents = documents.select(range(self.max_documents))
        return documents

    def _tokenize(self, batch: dict[str, list]) -> dict[str, list[list[int]]]:
        """Token ids of each non-empty document, each followed by end-of-text."""
        texts = [text for text in batch[self.text_column] if text]  # empty documents carry nothing
        eot = self.tokenizer.eot_id
        return {"input_ids": [ids + [eot] for ids in self.tokenizer.encode_batch(texts)]}

    def _tokenized(self) -> datasets.Dataset:
        """One row of token ids per document; computed once, then read from the cache."""
        documents = self._load_documents()
        # The tokenizer is part of the cache key; fingerprinting it through the function's
        # pickle would be fragile, so the key is spelled out.
        key = [_TOKENIZE_VERSION, self.tokenizer.name, self.vocab_size, self.text_column]
        fingerprint = datasets.fingerprint.Hasher.hash([documents._fingerprint, *key])
        return documents.map(
            self._tokenize,
            batched=True,
            remove_columns=documents.column_names,
            features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
            new_fingerprint=fingerprint,
            desc=f"Tokenizing ({self.tokenizer.name}, vocab {self.vocab_size})",
        )

    # ---- splitting and packing ----

    def _split_and_pack(self, tokenized: datasets.Dataset) -> tuple[Tensor, Tensor]:
        """Train and validation blocks, [N, T + 1] int32 each, split by document."""
        ids = tokenized.with_format("arrow")[:]["input_ids"]
        lengths = pc.list_value_length(ids).to_numpy()  # [n_docs]
        tokens = pc.list_flatten(ids).to_numpy()  # [n_tokens] int32
        n_docs = len(lengths)
        if n_docs < 2:
            raise ValueError(
                f"the corpus has {n_docs} non-empty document(s) ({self._source()}); "
                "the train/validation split is by document and needs at least 2"
            )
        n_val = min(max(1, round(self.val_fraction * n_docs)), n_docs - 1)
        is_val = np.zeros(n_docs, dtype=bool)
        is_val[np.random.default_rng(self.seed).permutation(n_docs)[:n_val]] = True
        token_is_val = np.repeat(is_val, lengths)  # [n_tokens]
        train = self._pack(tokens[~token_is_val], "train")
        val = self._pack(tokens[token_is_val], "validation")
        self.unigram_log_probs = unigram_log_probs(train, self.vocab_size)
        unigram_cross_entropy = float(-self.unigram_log_probs[val[:, 1:].flatten().long()].mean())
        rank_zero_info(
            f"{self._source()}: {n_docs - n_val} train / {n_val} validation documents, "
            f"{train.shape[0]} / {val.shape[0]} blocks of {self.block_size} + 1 tokens; "
            f"unigram baseline: {unigram_cross_entropy:.3f} nats/token on the whole validation split "
            "(TensorBoard's val/unigram_baseline: on the validation batches val/loss covers, limit_val_batches of them)"
        )
        if train.shape[0] < self.batch_size:
            raise ValueError(
                f"the train split has {train.shape[0]} blocks, fewer than batch_size={self.batch_size}: "
                "no full training batch"
            )
        return train, val

    def _pack(self, tokens: np.ndarray, split: str) -> Tensor:
        """Cut a token stream into whole blocks of `block_size + 1`, dropping the remainder."""
        width = self.block_size + 1
        n_blocks = len(tokens) // width
        if n_blocks == 0:
            raise ValueError(
                f"the {split} split has {len(tokens)} tokens, fewer than block_size + 1 = {width} "
                f"(block_size={self.block_size}); use a smaller block_size or more data"
            )
        return torch.from_numpy(tokens[: n_blocks * width].reshape(n_blocks, width))  # [N, T + 1]

    def _source(self) -> str:
        if self.data_files is not None:
            return f"data_files={self.data_files!r}"
        return f"dataset={self.dataset!r}"

    # ---- LightningDataModule hooks ----

    def prepare_data(self) -> None:
        """Load and tokenise into the `datasets` cache (once per node, before `setup`)."""
        self._tokenized()

    def setup(self, stage: str | None = None) -> None:
        """Read the tokenised corpus from the cache, split it and pack it (on every process)."""
        if self.train_set is None:
            train, val = self._split_and_pack(self._tokenized())
            self.train_set, self.val_set = PackedBlocks(train), PackedBlocks(val)

    def train_dataloader(self) -> DataLoader:
        # A resumed run continues the batch order where its checkpoint stopped.
        return training_loader(self.train_set, self.batch_size, self.shuffle_seed, self.num_workers, batches_trained(self.trainer))

    def val_dataloader(self) -> DataLoader:
        return evaluation_loader(self.val_set, self.batch_size, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The validation split: the corpus has no separate test documents."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The validation blocks, whose beginnings serve as prompts."""
        return self.val_dataloader()

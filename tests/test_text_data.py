"""TextDataModule on small generated corpora (.txt, .jsonl, .parquet) and the python-stdlib default."""

import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lm_moe.data import TextDataModule
from lm_moe.data.text import STDLIB_TESTS, resolve_data_files, stdlib_files

N_DOCS = 30
WORDS = "alpha beta gamma delta expert router token slot causal mixture softmax dispatch combine".split()


def _documents() -> list[str]:
    """Documents tagged `<docN>` throughout, so any stretch of tokens shows which one it is from."""
    rng = random.Random(0)
    docs = []
    for i in range(N_DOCS):
        sentences = [f"<doc{i}> " + " ".join(rng.choices(WORDS, k=8)) for _ in range(10)]
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, dict]:
    """The same documents as .txt files, one .jsonl file and one .parquet file: DataModule kwargs."""
    root = tmp_path_factory.mktemp("corpus")
    docs = _documents()
    (root / "txt").mkdir()
    for i, doc in enumerate(docs):
        (root / "txt" / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(docs))
    pq.write_table(pa.table({"id": list(range(N_DOCS)), "body": docs}), root / "docs.parquet")
    return {
        "txt": {"data_files": str(root / "txt" / "*.txt")},
        "jsonl": {"data_files": str(root / "docs.jsonl")},
        "parquet": {"data_files": [str(root / "docs.parquet")], "text_column": "body"},
    }


def _module(tmp_path, **kwargs) -> TextDataModule:
    defaults = dict(vocab_size=1024, block_size=16, batch_size=4, val_fraction=0.2)
    defaults["cache_dir"] = str(tmp_path / "cache")
    return TextDataModule(**{**defaults, **kwargs})


def _ready(dm: TextDataModule) -> TextDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _doc_tags(dm: TextDataModule, blocks: torch.Tensor) -> set[int]:
    text = "".join(dm.tokenizer.decode(row.tolist()) for row in blocks)
    return {int(n) for n in re.findall(r"<doc(\d+)>", text)}


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_batches_are_shifted_blocks(tmp_path, corpus, fmt):
    dm = _ready(_module(tmp_path, **corpus[fmt]))
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"input_ids", "targets"}
        assert batch["input_ids"].shape == batch["targets"].shape == (4, 16)
        assert batch["input_ids"].dtype == batch["targets"].dtype == torch.long
        assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])
        assert 0 <= batch["input_ids"].min() and batch["targets"].max() < dm.vocab_size
    assert len(dm.train_dataloader()) == len(dm.train_set) // 4  # drop_last


def test_stream_is_documents_joined_by_end_of_text(tmp_path, corpus):
    dm = _ready(_module(tmp_path, **corpus["txt"]))
    stream = dm.train_set.blocks.flatten().tolist()
    assert stream.count(dm.tokenizer.eot_id) >= 2
    pieces = dm.tokenizer.decode(stream).split("<|endoftext|>")[1:-1]  # whole documents only
    assert pieces and all(doc in _documents() for doc in pieces)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_train_and_validation_documents_are_disjoint(tmp_path, corpus, fmt):
    dm = _ready(_module(tmp_path, **corpus[fmt]))
    train, val = _doc_tags(dm, dm.train_set.blocks), _doc_tags(dm, dm.val_set.blocks)
    assert train and val and not train & val
    assert len(val) == round(0.2 * N_DOCS)


def test_split_is_deterministic_and_follows_the_seed(tmp_path, corpus):
    first, second = (_ready(_module(tmp_path, **corpus["jsonl"])) for _ in range(2))
    assert torch.equal(first.train_set.blocks, second.train_set.blocks)
    assert torch.equal(first.val_set.blocks, second.val_set.blocks)
    first_batch, second_batch = next(iter(first.train_dataloader())), next(iter(second.train_dataloader()))
    assert torch.equal(first_batch["input_ids"], second_batch["input_ids"])

    other = _ready(_module(tmp_path, seed=7, **corpus["jsonl"]))
    assert _doc_tags(other, other.val_set.blocks) != _doc_tags(first, first.val_set.blocks)


def test_shuffle_seed_reorders_the_batches_and_keeps_the_split(tmp_path, corpus):
    first = _ready(_module(tmp_path, **corpus["jsonl"]))
    reordered = _ready(_module(tmp_path, shuffle_seed=7, **corpus["jsonl"]))
    assert torch.equal(first.val_set.blocks, reordered.val_set.blocks)
    assert torch.equal(first.train_set.blocks, reordered.train_set.blocks)
    first_order = torch.cat([batch["input_ids"] for batch in first.train_dataloader()])
    other_order = torch.cat([batch["input_ids"] for batch in reordered.train_dataloader()])
    assert not torch.equal(first_order, other_order)
    # blocks of the same training set, in another order (the last, partial batch is dropped)
    blocks = {tuple(block) for block in first.train_set.blocks[:, :-1].tolist()}  # input_ids: all but the last
    assert len(first_order) == len(other_order)
    assert {tuple(row) for row in other_order.tolist()} <= blocks

def test_tokenization_is_cached_per_tokenizer(tmp_path, corpus):
    cache = tmp_path / "cache"
    first = _module(tmp_path, **corpus["jsonl"])
    first.prepare_data()
    files = set(cache.rglob("*.arrow"))
    tokenized = first._tokenized()  # what setup reads
    assert set(cache.rglob("*.arrow")) == files  # nothing recomputed
    assert {f["filename"] for f in tokenized.cache_files} <= {str(f) for f in files}

    _module(tmp_path, **corpus["jsonl"]).prepare_data()  # a new instance reuses the cache too
    assert set(cache.rglob("*.arrow")) == files
    _module(tmp_path, vocab_size=2048, **corpus["jsonl"]).prepare_data()
    assert len(set(cache.rglob("*.arrow")) - files) == 1  # another vocabulary, another cache file


def test_sizes_known_right_after_init(tmp_path, corpus):
    dm = _module(tmp_path, vocab_size=4096, block_size=32, **corpus["txt"])
    assert (dm.vocab_size, dm.block_size, dm.tokenizer.vocab_size) == (4096, 32, 4096)
    assert dm.train_set is None  # no data read yet


def test_trainer_runs_the_module_end_to_end(tmp_path, corpus):
    class Bigram(pl.LightningModule):
        def __init__(self, vocab_size: int):
            super().__init__()
            self.logits = nn.Embedding(vocab_size, vocab_size)

        def training_step(self, batch, batch_idx):
            logits = self.logits(batch["input_ids"])  # [B, T, V]
            return nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

        def validation_step(self, batch, batch_idx):
            self.training_step(batch, batch_idx)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _module(tmp_path, vocab_size=512, **corpus["txt"])
    trainer = pl.Trainer(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(Bigram(dm.vocab_size), datamodule=dm)
    assert trainer.global_step == 2


def test_python_stdlib_default_with_few_documents(tmp_path):
    # The first files in sorted order (__future__.py, __hello__.py, ...) are short: hold out 4.
    dm = TextDataModule(
        max_documents=20, block_size=32, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path)
    )
    batch = next(iter(_ready(dm).train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["targets"].max() < 8192
    assert dm.tokenizer.decode(dm.val_set.blocks[0].tolist())  # real text


# ---- bad inputs: each error names the bad value ----


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        _module(tmp_path, data_files=missing)


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing-here/\*\.jsonl"):
        _module(tmp_path, data_files=str(tmp_path / "nothing-here" / "*.jsonl"))


def test_empty_file(tmp_path, corpus):
    empty = tmp_path / "empty.txt"
    empty.touch()
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ".*empty"):
        _module(tmp_path, data_files=[corpus["txt"]["data_files"], str(empty)])


def test_corpus_without_text(tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": null}\n')
    with pytest.raises(ValueError, match=r"0 non-empty document.*blank\.jsonl"):
        _ready(_module(tmp_path, data_files=str(blank)))


def test_unsupported_or_mixed_formats(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"\.jsonl.*\.txt"):
        _module(tmp_path, data_files=[corpus["txt"]["data_files"], corpus["jsonl"]["data_files"]])


def test_a_file_two_patterns_match_is_read_once(tmp_path, corpus):
    files = [corpus["txt"]["data_files"], str(Path(corpus["txt"]["data_files"]).parent / "00.txt")]
    assert resolve_data_files(files) == resolve_data_files(files[0])


def test_rows_without_the_text_column_are_counted_in_a_warning(tmp_path, corpus):
    rows = [{"text": doc} if i % 4 else {"content": doc} for i, doc in enumerate(_documents())]  # 8 under "content"
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    with pytest.warns(UserWarning, match=f"8 of {N_DOCS} rows of .* have no 'text' value and are left out"):
        dm = _ready(_module(tmp_path, data_files=str(path)))
    assert len(_doc_tags(dm, torch.cat([dm.train_set.blocks, dm.val_set.blocks]))) == N_DOCS - 8


def test_missing_text_column_lists_available_columns(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"'content'.*\['id', 'body'\]"):
        _ready(_module(tmp_path, data_files=corpus["parquet"]["data_files"], text_column="content"))


@pytest.mark.parametrize("fmt, strings", [("jsonl", "['text']"), ("parquet", "['body']")])
def test_text_column_that_is_not_text_names_its_type_and_the_string_columns(tmp_path, corpus, fmt, strings):
    with pytest.raises(ValueError, match=r"text_column 'id' holds Value\('int64'\) values, not strings.*" + re.escape(strings)):
        _ready(_module(tmp_path, data_files=corpus[fmt]["data_files"], text_column="id"))


def test_block_size_larger_than_a_split(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"validation split has \d+ tokens.*block_size=4096"):
        _ready(_module(tmp_path, block_size=4096, **corpus["txt"]))


def test_unknown_dataset_offline(tmp_path):
    dm = _module(tmp_path, dataset="no-such-user/no-such-dataset")
    with pytest.raises(FileNotFoundError, match="no-such-user/no-such-dataset"):
        dm.prepare_data()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"val_fraction": 1.5}, r"val_fraction must be a number in \(0, 1\), got 1.5"),
        ({"val_fraction": 0.0}, r"val_fraction must be a number in \(0, 1\), got 0.0"),
        ({"block_size": 0}, "block_size must be a positive integer, got 0"),
        ({"batch_size": True}, "batch_size must be a positive integer, got True"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0, got -1"),
    ],
)
def test_bad_arguments_name_the_problem(tmp_path, corpus, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _module(tmp_path, **{**corpus["txt"], **kwargs})


def test_the_stdlib_test_suites_are_a_second_corpus_disjoint_from_the_default(tmp_path):
    modules, tests = stdlib_files(), stdlib_files(tests=True)
    assert len(tests) > 100 and not set(modules) & set(tests)
    assert all({"test", "tests", "idle_test"} & set(Path(path).parts) for path in tests)
    assert not any({"test", "tests", "idle_test"} & set(Path(path).parts) for path in modules)
    for path in tests:
        Path(path).read_text(encoding="utf-8")  # the malformed-on-purpose files are left out
    module = TextDataModule(dataset=STDLIB_TESTS, max_documents=20, vocab_size=512, block_size=32,
                            cache_dir=str(tmp_path / "cache"))
    module.setup("fit")
    assert len(module.train_set) > 0 and len(module.val_set) > 0

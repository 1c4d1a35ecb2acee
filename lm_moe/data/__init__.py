"""Data pipelines: tiktoken tokenizers and LightningDataModules on Hugging Face `datasets`."""

from lm_moe.data.text import TextDataModule
from lm_moe.data.tokenizer import Tokenizer, available_encodings, load_encoding

__all__ = ["TextDataModule", "Tokenizer", "available_encodings", "load_encoding"]

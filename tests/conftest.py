"""Shared test setup: everything runs offline and reproducibly on the CPU."""

import os

# Set before any test imports `datasets` or `huggingface_hub`: no test may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import huggingface_hub
import pytest
import torch


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub access even where the environment allows it (the libraries read the flags at import)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

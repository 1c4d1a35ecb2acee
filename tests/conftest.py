"""Shared test setup: everything runs offline and reproducibly on the CPU."""

import os

# Set before any test imports `datasets` or `huggingface_hub`: no test may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

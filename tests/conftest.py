"""Shared test setup: everything runs offline and reproducibly on the CPU."""

import os

# Set before any test imports `datasets` or `huggingface_hub`: no test may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import huggingface_hub
import pytest
import torch


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist, give each worker (and the processes its tests start) its share of the
    cores: every worker's torch takes all of them by default, and N workers would oversubscribe
    them N times over, which slows OpenMP's spinning threads far more than it parallelises."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores_between_workers()


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

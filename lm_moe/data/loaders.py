"""The DataLoaders both data modules hand to Lightning."""

import torch
from torch.utils.data import DataLoader, Dataset


def training_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int) -> DataLoader:
    """Shuffled by a seeded generator (a run's batch order repeats), full batches only."""
    # Under DDP, Lightning swaps this sampler for a DistributedSampler (map-style dataset).
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def evaluation_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """In order, every example (the last batch may be short)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0)

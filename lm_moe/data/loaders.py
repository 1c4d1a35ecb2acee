"""The DataLoaders both data modules hand to Lightning."""

import signal
from collections.abc import Callable

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableShuffle(DistributedSampler):
    """A seeded shuffle with a new permutation every epoch, split among the data-parallel ranks
    (a single rank when not distributed), whose place in the data follows from the batches
    trained so far.

    Each pass starts at batch `b` of epoch `e` for `e, b = divmod(batches_done(), batches per
    epoch)`: a run resumed from a checkpoint continues the batch order where it stopped, instead
    of repeating the first batches of the epoch and never reaching its last ones. (Lightning's
    own epoch count cannot be trusted for this: it counts an epoch that max_steps cut short as
    done, so set_epoch is ignored. Nor can its step count: with gradient accumulation it also
    steps on an epoch's leftover batches.) Being a DistributedSampler, Lightning keeps it under DDP
    rather than swapping in its own, whose shuffle ignores the data module's seed.
    Without `batches_done`, pass k is epoch k from its start.
    """

    def __init__(self, dataset: Dataset, seed: int, batch_size: int, batches_done: Callable[[], int] | None = None):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=None if distributed else 1,
            rank=None if distributed else 0,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        if self.num_samples < batch_size:
            raise ValueError(
                f"each of the {self.num_replicas} data-parallel rank(s) gets {self.num_samples} training examples, "
                f"fewer than batch_size={batch_size}: no full batch"
            )
        self.batch_size = batch_size
        self.batches_done = batches_done
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the epoch follows from the batches trained (see the class docstring)."""

    def __iter__(self):
        batches_per_epoch = self.num_samples // self.batch_size
        done = self._passes * batches_per_epoch if self.batches_done is None else self.batches_done()
        self._passes += 1
        self.epoch, batch = divmod(done, batches_per_epoch)
        indices = list(super().__iter__())  # this rank's share of the epoch's permutation
        return iter(indices[batch * self.batch_size :])


def batches_trained(trainer) -> Callable[[], int] | None:
    """A function giving the training batches `trainer` has run so far, in all epochs (restored
    with the loops from a checkpoint), read when called; None without a trainer."""
    if trainer is None:
        return None
    return lambda: trainer.fit_loop.epoch_loop.batch_progress.total.processed


def ignore_interrupts(worker_id: int) -> None:
    """Worker processes leave Ctrl-C to the main process: a terminal sends SIGINT to the whole
    process group, and a worker it killed mid-validation ended the run without a checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_loader(
    dataset: Dataset, batch_size: int, seed: int, num_workers: int, batches_done: Callable[[], int] | None = None
) -> DataLoader:
    """Shuffled anew each epoch by a seeded permutation, full batches only, each pass starting
    after the `batches_done()` batches already trained on (see ResumableShuffle)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ResumableShuffle(dataset, seed, batch_size, batches_done),
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_interrupts,
    )


def evaluation_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """In order, every example (the last batch may be short)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0,
                      worker_init_fn=ignore_interrupts)

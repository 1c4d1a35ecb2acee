"""The training sampler: a seeded permutation per epoch, entered at the batch training reached."""

import signal

import pytest
import torch
from torch.utils.data import Dataset

from lm_moe.data.loaders import ResumableShuffle, evaluation_loader, training_loader


def test_each_pass_is_the_next_epochs_permutation_of_every_example():
    sampler = ResumableShuffle(range(10), seed=3, batch_size=2)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert first == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()  # epoch 0: seed + 0


def test_a_pass_starts_at_the_batch_the_trained_batches_give():
    uninterrupted = ResumableShuffle(range(10), seed=3, batch_size=2)
    epochs = [list(uninterrupted) for _ in range(2)]
    resumed = ResumableShuffle(range(10), seed=3, batch_size=2, batches_done=lambda: 7)  # epoch 1, batch 2
    assert list(resumed) == epochs[1][4:]


def test_fewer_examples_than_one_batch_is_refused():
    with pytest.raises(ValueError, match="gets 3 training examples, fewer than batch_size=4"):
        ResumableShuffle(range(3), seed=0, batch_size=4)


class SigintHandlers(Dataset):
    """Each item: whether the process that loads it ignores SIGINT."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> bool:
        return signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_loader_workers_leave_ctrl_c_to_the_main_process():
    # Ctrl-C handled as in a terminal: a shell that starts pytest in the background ignores SIGINT,
    # and workers would inherit that whatever the loaders do.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        loaders = [training_loader(SigintHandlers(), 2, seed=0, num_workers=1), evaluation_loader(SigintHandlers(), 2, 1)]
        for loader in loaders:
            assert all(batch.all() for batch in loader)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the main process still hears it
    finally:
        signal.signal(signal.SIGINT, previous)

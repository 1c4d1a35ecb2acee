"""Side-by-side timing: candidates run in turns, so machine noise hits all of them alike."""

import time
from collections.abc import Callable


def time_in_turns(
    candidates: dict[str, Callable[[], object]],
    warmup: int = 3,
    repeats: int = 20,
    on_round: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every candidate, `repeats` samples each.

    Each round calls every candidate once, in turn; `on_round` (e.g. a progress bar's advance)
    runs after each round.
    """
    for _ in range(warmup):
        for run in candidates.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
        if on_round is not None:
            on_round()
    return samples

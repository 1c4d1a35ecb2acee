"""Results over seeds: a value's mean and spread, a curve's mean with its band, and whether the gap
between two variants is larger than the seeds make it wobble.

The gap rule: each seed's gap (variant minus reference, both trained at that seed) is one sample;
the gap is decided when there are at least MIN_SEEDS_TO_DECIDE of them, every one has the same sign
and their mean is larger than their standard deviation. Anything else is a tie (or, with too few
seeds, undecided): a difference that changes sign from seed to seed, or that one seed's wobble
could make, is not a result.
"""

import math
import statistics
from dataclasses import dataclass

MIN_SEEDS_TO_DECIDE = 3


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float | None  # sample standard deviation; None for one value
    n: int

    def text(self, decimals: int = 3) -> str:
        mean = f"{self.mean:.{decimals}f}"
        return mean if self.std is None else f"{mean} ± {self.std:.{decimals}f}"

    def __str__(self) -> str:
        return self.text()


def spread(values: list[float]) -> Spread | None:
    """Mean and sample standard deviation of the values; None for none."""
    if not values:
        return None
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float, float]]:
    """(x, mean y, std y) at every x all the curves have (std 0 for one curve)."""
    if not curves:
        return []
    common = set.intersection(*({x for x, _ in points} for points in curves))
    by_x = [dict(points) for points in curves]
    rows = []
    for x in sorted(common):
        ys = [points[x] for points in by_x]
        rows.append((x, statistics.fmean(ys), statistics.stdev(ys) if len(ys) > 1 else 0.0))
    return rows


def paired_curve_gap(curves: dict[int, list[tuple[float, float]]],
                     reference: dict[int, list[tuple[float, float]]]) -> list[tuple[float, float, float]]:
    """(x, mean gap, std) of the curves (by seed) minus the reference's curve of the same seed, at
    every x all the seeds both have share."""
    gaps = []
    for seed in sorted(curves.keys() & reference.keys()):
        at = dict(reference[seed])
        gaps.append([(x, y - at[x]) for x, y in curves[seed] if x in at])
    return mean_curve(gaps)


@dataclass(frozen=True)
class Gap:
    spread: Spread  # of the per-seed gaps
    verdict: str  # "lower", "higher", "tie" or "undecided (n seeds)"

    def __str__(self) -> str:
        text = f"{self.spread.mean:+.3f}"
        return text if self.spread.std is None else f"{text} ± {self.spread.std:.3f}"


def paired_gap(values: dict[int, float], reference: dict[int, float]) -> Gap | None:
    """The gap of `values` to `reference` (each by seed) over the seeds both have; None if none."""
    seeds = sorted(values.keys() & reference.keys())
    gaps = [values[seed] - reference[seed] for seed in seeds]
    gap_spread = spread(gaps)
    if gap_spread is None:
        return None
    if gap_spread.n < MIN_SEEDS_TO_DECIDE:
        return Gap(gap_spread, f"undecided ({gap_spread.n} seed{'s' if gap_spread.n > 1 else ''})")
    same_sign = all(gap > 0 for gap in gaps) or all(gap < 0 for gap in gaps)
    if same_sign and abs(gap_spread.mean) > gap_spread.std:
        return Gap(gap_spread, "lower" if gap_spread.mean < 0 else "higher")
    return Gap(gap_spread, "tie")


def median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None and not math.isnan(value)]
    return statistics.median(present) if present else None

"""Results over seeds, on hand-made numbers: the mean and spread, the mean curve and its band, the
gap verdict, and a failed seed reported rather than averaged away."""

import pytest

from lm_moe.profiling.comparison_report import variant_rows
from lm_moe.profiling.seed_statistics import mean_curve, paired_curve_gap, paired_gap, spread


def test_spread_is_the_mean_and_sample_standard_deviation():
    result = spread([4.0, 4.2, 4.4])
    assert (result.mean, result.n) == (pytest.approx(4.2), 3)
    assert result.std == pytest.approx(0.2)  # sample (n - 1) deviation: sqrt((0.04 + 0 + 0.04) / 2)
    assert str(result) == "4.200 ± 0.200"
    assert spread([4.0]).std is None and str(spread([4.0])) == "4.000"
    assert spread([]) is None


def test_mean_curve_and_band_at_the_steps_every_seed_has():
    curves = [[(100, 5.0), (200, 4.0), (300, 3.0)], [(100, 6.0), (200, 5.0)], [(100, 7.0), (200, 6.0), (300, 4.0)]]
    assert mean_curve(curves) == [(100, 6.0, pytest.approx(1.0)), (200, 5.0, pytest.approx(1.0))]
    assert mean_curve([[(1, 2.0), (2, 1.0)]]) == [(1, 2.0, 0.0), (2, 1.0, 0.0)]
    assert mean_curve([]) == []


def test_the_gap_curve_pairs_each_seed_with_the_references_seed():
    reference = {1: [(100, 5.0), (200, 4.0)], 2: [(100, 5.2), (200, 4.4)], 3: [(100, 9.0)]}
    curves = {1: [(100, 5.5), (200, 4.1)], 2: [(100, 5.3), (200, 4.7)], 4: [(100, 0.0)]}  # seeds 3, 4 unpaired
    gap = paired_curve_gap(curves, reference)
    assert [(x, round(mean, 6), round(std, 6)) for x, mean, std in gap] == [
        (100, 0.3, round(0.2 * 2 ** 0.5, 6)), (200, 0.2, round(0.1 * 2 ** 0.5, 6))]


@pytest.mark.parametrize("values, verdict", [
    ({1: 4.0, 2: 4.1, 3: 4.2}, "lower"),  # every seed 0.3 lower
    ({1: 4.6, 2: 4.7, 3: 4.8}, "higher"),
    ({1: 4.2, 2: 4.5, 3: 4.4}, "tie"),  # gaps -0.1, +0.1, -0.1: the sign changes
    ({1: 4.29, 2: 4.0, 3: 4.49}, "tie"),  # gaps -0.01, -0.4, -0.01: same sign, mean 0.14 < std 0.23
    ({1: 4.0, 2: 4.1}, "undecided (2 seeds)"),
])
def test_a_gap_is_decided_only_by_three_seeds_that_agree_beyond_their_spread(values, verdict):
    reference = {1: 4.3, 2: 4.4, 3: 4.5}
    gap = paired_gap(values, reference)
    assert gap.verdict == verdict
    assert gap.spread.n == len(values)
    assert gap.spread.mean == pytest.approx(sum(values[seed] - reference[seed] for seed in values) / len(values))


def test_the_gap_pairs_seeds_and_leaves_out_those_one_side_lacks():
    gap = paired_gap({1: 4.0, 2: 4.0, 5: 1.0}, {1: 4.5, 2: 4.6, 3: 4.7})
    assert gap.spread.n == 2 and gap.spread.mean == pytest.approx(-0.55)
    assert str(gap) == "-0.550 ± 0.071"
    assert paired_gap({5: 1.0}, {1: 4.0}) is None


def _run(variant, seed, loss, status="ok", **extra):
    row = {"variant": variant, "seed": seed, "status": status, "val_loss": loss, "learning_rate": 0.002, **extra}
    return row if status == "ok" else {**row, "reason": "killed by signal 9: step 40"}


def test_a_failed_seed_is_named_in_the_status_and_left_out_of_the_mean():
    runs = [_run("dense", 1, 4.5), _run("dense", 2, 4.6), _run("dense", 3, 4.7),
            _run("top2", 1, 4.4, causality="PASS"), _run("top2", 2, None, "FAILED"), _run("top2", 3, 4.6, causality="PASS")]
    dense, top2 = variant_rows(runs, reference="dense")
    assert dense["gap_text"] == "reference" and dense["seeds"] == "3/3" and dense["status"] == "ok"
    assert top2["status"] == "FAILED: seed 2: killed by signal 9: step 40"
    assert top2["seeds"] == "2/3"
    assert top2["val_loss_mean"] == pytest.approx(4.5)  # of seeds 1 and 3 only
    assert top2["gap_seeds"] == 2 and top2["gap_mean"] == pytest.approx(-0.1)
    assert top2["verdict"] == "undecided (2 seeds)"  # two seeds left: the failure costs the verdict
    assert top2["causality"] == "PASS"


def test_causality_verdicts_that_differ_by_seed_are_listed():
    runs = [_run("v", 1, 4.0, causality="PASS"), _run("v", 2, 4.1, causality="LEAK: future (train)")]
    (row,) = variant_rows(runs, reference=None)
    assert row["causality"] == "seed 1: PASS; seed 2: LEAK: future (train)"
    assert "gap_text" not in row

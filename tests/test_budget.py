"""Was each arm's budget enough: the expected best validation result after k trials (Dodge et al. 2019) against a
brute-force enumeration, its bootstrap band, the table a study logs and the line its report prints per arm."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import TINY_STUDY

from orchestrator.config.study import load_study
from orchestrator.record.artifacts import EXPECTED_BEST_SCHEMA
from orchestrator.record.summary import budget_lines
from orchestrator.results import Status
from orchestrator.study.budget import expected_best, expected_best_table, expected_max


def test_the_expected_maximum_of_k_draws_is_the_mean_of_every_draw_of_k():
    values = [0.81, 0.84, 0.79, 0.84, 0.70]
    curve = expected_max(values, 4)
    for k in range(1, 5):
        draws = [max(d) for d in itertools.product(values, repeat=k)]  # with replacement, every order alike
        assert curve[k - 1] == pytest.approx(np.mean(draws), abs=1e-12)
    assert curve[0] == pytest.approx(np.mean(values)) and list(curve) == sorted(curve) and curve[-1] < max(values)
    assert expected_max([0.5, 0.5], 3) == pytest.approx([0.5, 0.5, 0.5])


def test_the_bootstrap_band_holds_the_curve_and_repeats_with_its_seed():
    values = np.random.default_rng(1).normal(0.8, 0.03, 8)
    curve, low, high = expected_best(values, 8, seed=3)
    assert np.all(low <= curve + 1e-12) and np.all(curve <= high + 1e-12) and np.all(high - low > 0)
    again = expected_best(values, 8, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((curve, low, high), again, strict=True))


def rows(arm, values, status=Status.COMPLETE):
    return [{"arm": arm, "status": status, "val/robust_acc": v} for v in values]


def test_the_table_counts_stopped_trials_at_their_rung_and_leaves_failed_ones_out():
    table = expected_best_table(rows("baseline", [0.8, 0.82]) + rows("baseline", [0.6], Status.STOPPED_EARLY)
                                + rows("baseline", [None], Status.FAILED) + rows("sns", [0.9]), "val/robust_acc", "max")
    assert table.schema.equals(EXPECTED_BEST_SCHEMA)
    base = [r for r in table.to_pylist() if r["arm"] == "baseline"]
    assert [r["trials"] for r in base] == [1, 2, 3]
    assert base[0]["expected_best"] == pytest.approx((0.8 + 0.82 + 0.6) / 3)  # one draw: the mean
    (sns,) = [r for r in table.to_pylist() if r["arm"] == "sns"]
    assert sns["expected_best"] == sns["low"] == sns["high"] == 0.9  # one trial: no spread to resample
    smaller = expected_best_table(rows("a", [0.2, 0.1, 0.3]), "val/robust_acc", "min").to_pylist()
    assert smaller[0]["expected_best"] == pytest.approx(0.2) and smaller[-1]["expected_best"] < 0.2


def test_the_report_says_whether_each_arms_curve_still_rises_at_its_budget(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": str(TINY_STUDY), "study": {"trials": 8}, "search_space": {
        "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}}))
    study = load_study(path)
    flat = [0.84] * 7 + [0.80]
    rising = [0.70, 0.72, 0.74, 0.76, 0.78, 0.80, 0.82, 0.86]
    table = expected_best_table(rows("baseline", rising) + rows("sns", flat), "val/robust_acc", "max")
    outcome = SimpleNamespace(expected_best=table, arms=study.arm_list(), objectives=[("val/robust_acc", "max")])
    baseline_line, sns_line = budget_lines(outcome)
    assert baseline_line.startswith("PGD-AT: +") and "from 6 to 8 trials: a larger budget may change the answer" in (
        baseline_line)
    assert sns_line.startswith("SNS: +0.0 points from 6 to 8 trials: flat")

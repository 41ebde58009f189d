"""The results vocabulary and the statistics behind a verdict: paired differences, decisions, the seeds a
sequential confirmation adds, the one verdict sentence, the Pareto mask, NaN-safe numbers."""

import math

import numpy as np
import pytest
import yaml
from conftest import TINY_STUDY

from orchestrator.config.study import load_study
from orchestrator.execution.trial_outcome import TrialOutcome
from orchestrator.execution.trial_settings import Record
from orchestrator.results import (
    Status,
    failure_kind,
    fmt,
    mean_std,
    objective_points,
    pareto_mask,
    pct,
    points,
    rows_table,
    run_status,
    verdict_sentence,
)
from orchestrator.study.confirmation import Configuration, confirmation_rows, next_seeds, plan_round, summarize
from orchestrator.study.decision import Decision, decide, paired_difference, probability_of_improvement, seeds_needed


def diff(*values: float):
    return paired_difference({i: v for i, v in enumerate(values)}, {i: 0.0 for i in range(len(values))})


def test_paired_difference_pairs_by_seed_and_leaves_one_sided_seeds_out():
    d = paired_difference({1: 0.71, 2: 0.69, 3: 0.74, 4: 0.9}, {1: 0.70, 2: 0.70, 3: 0.71})
    assert d.seeds == (1, 2, 3) and d.differences == pytest.approx((0.01, -0.01, 0.03))
    assert d.mean == pytest.approx(0.01) and d.std == pytest.approx(0.02) and d.wins == 2
    low, high = d.ci95  # t(0.975, 2) = 4.303
    assert (high - low) / 2 == pytest.approx(4.3027 * 0.02 / math.sqrt(3), rel=1e-3)


@pytest.mark.parametrize(("values", "decision"), [
    ((0.03, 0.031, 0.029), Decision.BEATS),  # interval above 0
    ((-0.05, -0.04, -0.06), Decision.LOSES),
    ((0.001, -0.001, 0.0), Decision.EQUIVALENT),  # inside ±1 point
    ((0.0, 0.0), Decision.EQUIVALENT),  # identical runs: a zero-width interval at 0
    ((0.02, -0.01, 0.03), Decision.UNDECIDED),  # straddles 0 and reaches past the margin
    ((0.05,), Decision.UNDECIDED),  # one seed: no interval
])
def test_decisions(values, decision):
    assert decide(diff(*values), margin=0.01) == decision


def test_seeds_needed_and_bootstrap_describe_an_undecided_effect():
    d = diff(0.02, -0.01, 0.03)
    needed = seeds_needed(d)
    assert needed is not None and needed > 3
    bigger = diff(*([0.02, -0.01, 0.03] * math.ceil(needed / 3)))  # the same mean and spread over more seeds
    assert decide(bigger, 0.01) == Decision.BEATS
    assert seeds_needed(diff(0.01, -0.01)) is None  # mean 0: no number of seeds separates it
    p = probability_of_improvement(d)
    assert 0.5 < p < 1 and p == probability_of_improvement(d)  # seeded
    assert probability_of_improvement(diff(-0.01, -0.02, -0.03)) == 0.0
    assert math.isnan(probability_of_improvement(diff()))


def test_one_verdict_sentence_names_what_was_compared_and_says_each_decision():
    beats = verdict_sentence("SNS, tuned over 8 trials, vs PGD-AT, tuned over 8 trials", "SNS", "PGD-AT",
                             diff(0.03, 0.031, 0.029), diff(-0.01, -0.02, -0.015), robust_name="AutoAttack",
                             margin=0.01)
    assert beats.startswith("SNS, tuned over 8 trials, vs PGD-AT, tuned over 8 trials: +3.0 ± 0.1 AutoAttack points")
    assert ("(3/3 seeds, 95% CI +2.8 to +3.2, P(SNS better) 1.00; ± = sd over seeds), -1.5 clean: SNS beats PGD-AT "
            "after 3 seeds") in beats  # the spread beside the interval says what it is
    loses = verdict_sentence("a vs b", "A", "B", diff(-0.05, -0.04, -0.06), None, robust_name="r", margin=0.01)
    assert loses.endswith("A loses to B after 3 seeds")
    same = verdict_sentence("a vs b", "A", "B", diff(0.0, 0.0), None, robust_name="r", margin=0.01)
    assert "A is equivalent to B within ±1.0 points after 2 seeds" in same
    open_ = verdict_sentence("a vs b", "A", "B", diff(0.02, -0.01, 0.03), None, robust_name="r", margin=0.01,
                             left_out={4: "the sns run failed (TrainingCollapsed)"})
    more = seeds_needed(diff(0.02, -0.01, 0.03)) - 3
    assert f"undecided after 3 seeds; about {more} more would decide an effect of this size" in open_
    assert open_.endswith("; seed 4 left out: the sns run failed (TrainingCollapsed)")
    one = verdict_sentence("a vs b", "A", "B", diff(0.05), None, robust_name="r", margin=0.01)
    assert one.endswith("(1/1 seeds, P(A better) 1.00): undecided after 1 seed (one seed has no interval)")
    assert "no seed finished for both" in verdict_sentence("a vs b", "A", "B", diff(), None, robust_name="r",
                                                           margin=0.01)


def test_numbers_that_may_be_missing_print_as_a_dash():
    assert (pct(0.9681), points(0.0132), points(-0.004), fmt(0.123456), fmt(3)) == ("96.8", "+1.3", "-0.4", "0.1235",
                                                                                     "3")
    assert (pct(None), pct(float("nan")), points(None), fmt(None), fmt(float("nan"))) == ("-", "-", "n/a", "-", "-")
    assert mean_std(0.963, 0.001) == "96.3 ± 0.1" and mean_std(0.9, float("nan")) == "90.0"
    assert mean_std(float("nan"), 0.1) == "n/a"


def test_statuses_and_failure_classes_have_one_name_each():
    assert failure_kind("TrialFailed: TrainingDiverged: loss became nan in epoch 1") == "TrainingDiverged"
    assert failure_kind("CatastrophicOverfitting: validation PGD fell") == "CatastrophicOverfitting"
    assert failure_kind("OSError: disk full") is None and failure_kind(None) is None
    assert run_status("FINISHED", {}) == Status.COMPLETE and run_status("FAILED", {}) == Status.FAILED
    assert run_status("KILLED", {"stopped_early": "asha after epoch 1"}) == Status.STOPPED_EARLY  # older record
    assert run_status("FINISHED", {"nslab.status": "STOPPED_EARLY"}) == Status.STOPPED_EARLY
    assert run_status("FINISHED", {"nslab.stopped_early": "asha after epoch 4"}) == Status.STOPPED_EARLY
    assert run_status("RUNNING", {}) == Status.INCOMPLETE


def test_rows_table_takes_the_union_of_keys_and_nulls_nan():
    table = rows_table([{"a": 1, "status": "FAILED"}, {"a": 2, "b": float("nan"), "c": 0.5}])
    assert table.column_names == ["a", "status", "b", "c"]
    assert table.column("b").to_pylist() == [None, None] and table.column("c").to_pylist() == [None, 0.5]


def test_pareto_front_keeps_only_complete_undominated_rows():
    objectives = [("robust_acc", "max"), ("clean_acc", "max")]
    rows = [{"robust_acc": 0.5, "clean_acc": 0.9}, {"robust_acc": 0.6, "clean_acc": 0.8},
            {"robust_acc": 0.4, "clean_acc": 0.7}, {"robust_acc": 0.9, "clean_acc": 0.95},
            {"robust_acc": None, "clean_acc": 0.99}]
    eligible = [True, True, True, False, True]  # the 4th was stopped early: never on the front
    assert pareto_mask(objective_points(rows, objectives, eligible)) == [True, True, False, False, False]
    assert pareto_mask(objective_points(rows, [("robust_acc", "min")], eligible)) == [False, False, True, False, False]


# ---- sequential confirmation: which seeds the next round adds ------------------------------------------


def study(tmp_path, **confirm):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": str(TINY_STUDY), "study": {"concurrency": 2},
                                    "confirm": {"seeds": 2, "max_seeds": 5, "margin": 1.0, **confirm},
                                    "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"}}))
    return load_study(path)


def rows_for(robust: dict[int, tuple[float, float]]) -> list[dict]:
    """Confirmation rows: {seed: (baseline robust, sns robust)}; clean accuracy 0.9 for both."""
    return [{"configuration": name, "seed": seed, "status": "COMPLETE", "test_clean_acc": 0.9,
             "test_robust_acc": pair[i]} for seed, pair in robust.items() for i, name in enumerate(("baseline", "sns"))]


def configurations(s):
    baseline, method = s.arm_list()
    return [Configuration("baseline", baseline, {}, "baseline"), Configuration("sns", method, {}, "sns-01")]


def test_an_undecided_pair_gets_fresh_seeds_until_decided(tmp_path):
    s = study(tmp_path)
    first = summarize(s, rows_for({1: (0.50, 0.53), 2: (0.50, 0.50)}), configurations(s), 1)
    assert first.comparisons[0].decision == Decision.UNDECIDED
    assert next_seeds(s, first) == [3]  # concurrency 2 / two configurations = one seed per round, never seed 0
    decided = summarize(s, rows_for({1: (0.50, 0.53), 2: (0.50, 0.52), 3: (0.50, 0.53), 4: (0.5, 0.525)}),
                        configurations(s), 3)
    assert decided.comparisons[0].decision == Decision.BEATS and next_seeds(s, decided) == []


def test_an_undecided_pair_stops_at_max_seeds_and_equal_runs_are_equivalent_at_once(tmp_path):
    s = study(tmp_path, max_seeds=3)
    noisy = summarize(s, rows_for({1: (0.5, 0.53), 2: (0.5, 0.48), 3: (0.5, 0.52)}), configurations(s), 2)
    assert noisy.comparisons[0].decision == Decision.UNDECIDED and next_seeds(s, noisy) == []
    assert "undecided after 3 seeds" in noisy.comparisons[0].verdict()
    same = summarize(s, rows_for({1: (0.5, 0.5), 2: (0.6, 0.6)}), configurations(s), 1)
    assert same.comparisons[0].decision == Decision.EQUIVALENT and next_seeds(s, same) == []


def test_a_failed_seed_is_left_out_and_named(tmp_path):
    s = study(tmp_path)
    rows = rows_for({1: (0.5, 0.53), 2: (0.5, 0.50)})
    rows[3].update(status="FAILED", test_robust_acc=None, test_clean_acc=None, failure="failed (TrainingCollapsed)")
    comparison = summarize(s, rows, configurations(s), 1).comparisons[0]
    assert comparison.robust.seeds == (1,)
    assert comparison.verdict().endswith("seed 2 left out: the sns run failed (TrainingCollapsed)")


# ---- what the interval counts, and who trains next ------------------------------------------------------


def with_examples(rows: list[dict], examples: int = 400) -> dict[str, np.ndarray]:
    """Give each row a run id and per-example outcomes whose mean is its robust accuracy: the examples a model
    gets right are the easiest ones, so a better model wins on the same examples every seed (the test split's
    own variation is real)."""
    outcomes = {}
    for i, row in enumerate(rows):
        row["mlflow_run_id"] = f"run-{i}"
        outcomes[row["mlflow_run_id"]] = np.arange(examples) < round(row["test_robust_acc"] * examples)
    return outcomes


def test_the_interval_counts_the_test_examples_and_names_each_sources_width(tmp_path):
    s = study(tmp_path)
    rows = rows_for({1: (0.50, 0.53), 2: (0.51, 0.545), 3: (0.49, 0.515)})
    examples = with_examples(rows)
    both = summarize(s, rows, configurations(s), 2, examples).comparisons[0]
    seeds_only = summarize(s, rows, configurations(s), 2).comparisons[0]
    assert both.robust.example_variance > 0 and seeds_only.robust.example_variance is None
    assert both.robust.ci95[0] < seeds_only.robust.ci95[0]  # the test split's variation widens it
    widths = both.robust.half_widths()
    assert f"seeds ±{100 * widths['seeds']:.1f}, test examples ±{100 * widths['test examples']:.1f}" in both.verdict()
    assert "at look 2 of 4" in both.verdict()  # the looks at 2, 3, 4, 5 seeds: the interval holds at each
    assert "test examples not recorded (the interval covers the seeds only)" in seeds_only.verdict()
    summary = both.summary()
    assert summary["half_width_test_examples"] == pytest.approx(widths["test examples"])
    assert summary["looks"] == "2,3,4,5" and summary["ci95_low"] == pytest.approx(both.robust.ci95[0])


def record(tmp_path) -> Record:
    return Record(f"sqlite:///{tmp_path / 'm.db'}", "test", "parent", "s")


def finished(trials, robust: dict[tuple[str, int], float]) -> list[TrialOutcome]:
    """The outcomes of a round's trials: robust accuracy by (configuration, train seed); clean 0.9."""
    return [TrialOutcome(t, Status.COMPLETE, 2, None, {"test/robust_acc": robust[t.configuration, t.seed],
                                                      "test/clean_acc": 0.9, "final": 1.0}) for t in trials]


def test_an_a_a_control_trains_on_other_seeds_but_is_paired_by_seed(tmp_path):
    s = study(tmp_path, baseline_seed_offset=100)
    first = plan_round(s, configurations(s), record(tmp_path), [])
    assert sorted((t.configuration, t.seed) for t in first) == [("baseline", 101), ("baseline", 102), ("sns", 1),
                                                              ("sns", 2)]
    outcomes = finished(first, {("baseline", 101): 0.5, ("baseline", 102): 0.5, ("sns", 1): 0.52, ("sns", 2): 0.49})
    rows = confirmation_rows(s, outcomes)
    assert sorted((r["configuration"], r["seed"]) for r in rows) == [("baseline", 1), ("baseline", 2), ("sns", 1),
                                                                     ("sns", 2)]
    assert {r.get("train_seed") for r in rows if r["configuration"] == "baseline"} == {101, 102}
    second = plan_round(s, configurations(s), record(tmp_path), outcomes)
    assert sorted((t.configuration, t.seed) for t in second) == [("baseline", 103), ("sns", 3)]


def test_several_comparisons_are_judged_under_holm_and_a_decided_one_stops_training(tmp_path):
    s = study(tmp_path, top_k=2)
    baseline, method = s.arm_list()
    confs = [Configuration("baseline", baseline, {}, "baseline"), Configuration("sns", method, {}, "sns-01"),
             Configuration("sns-2", method, {}, "sns-02")]
    first = plan_round(s, confs, record(tmp_path), [])  # concurrency 2 over 3 configurations: one seed a round
    robust = {("baseline", 1): 0.5, ("baseline", 2): 0.5, ("sns", 1): 0.53, ("sns", 2): 0.53,
              ("sns-2", 1): 0.52, ("sns-2", 2): 0.49}
    outcomes = finished(first, robust)
    confirmation = summarize(s, confirmation_rows(s, outcomes), confs, 1)
    sure, unsure = confirmation.comparisons
    assert sure.decision == Decision.BEATS and unsure.decision == Decision.UNDECIDED
    assert "Holm over 2 comparisons" in sure.verdict() and sure.robust.share == pytest.approx(1 / 2)
    second = plan_round(s, confs, record(tmp_path), outcomes)
    assert sorted((t.configuration, t.seed) for t in second) == [("baseline", 3), ("sns-2", 3)]  # not sns: decided

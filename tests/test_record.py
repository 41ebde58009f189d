"""The study's record as a researcher reads it in MLflow, from hand-built rows (no Ray, no training): the answer
in the runs table (short verdict, run name, metrics that sort first), one unit per quantity, a report narrow
enough for MLflow's preview, plots labelled with trial names, and trial params named so the compare view leads
with what both arms share."""

from dataclasses import dataclass, field, replace

import pytest
from conftest import TINY_STUDY

from orchestrator.config.study import load_study
from orchestrator.record.figures import confirmation_figure, pareto_figure
from orchestrator.record.summary import parent_run_name, search_table, short_verdict, study_markdown, summary_metrics
from orchestrator.record.tracking import sibling_params
from orchestrator.results import Status, verdict_sentence
from orchestrator.study.confirmation import Configuration
from orchestrator.study.decision import Decision, PairedDifference
from orchestrator.study.outcome import StudyOutcome

OBJECTIVES = [("val/robust_acc", "max"), ("val/clean_acc", "max")]


@dataclass
class Arm:
    """What the record reads of a study's arm (orchestrator/config/study.py)."""

    name: str
    method: str
    space: dict

    @property
    def title(self) -> str:
        return self.method.upper().replace("_", "-")

    def describe(self) -> str:
        return f"{self.title}, tuned over 2 trials"


ARMS = [Arm("baseline", "pgd_at", {"train.lr": None}), Arm("sns", "sns", {"sns.lam": None, "sns.fraction": None,
                                                                         "train.lr": None})]


@dataclass
class Comparison:
    """What the record reads of a confirmation's comparison (orchestrator/study/confirmation.py)."""

    configuration: Configuration
    baseline: Configuration
    robust: PairedDifference
    clean: PairedDifference
    decision: Decision
    margin: float = 0.01

    def what(self) -> str:
        return "SNS vs PGD-AT"

    def verdict(self) -> str:
        return verdict_sentence("SNS vs PGD-AT", "SNS", "PGD-AT", self.robust, self.clean,
                                robust_name="worst-case robust", margin=self.margin)


@dataclass
class Confirmation:
    comparisons: list
    configurations: list
    rows: list = field(default_factory=list)
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    rounds: int = 1


def row(arm: str, number: int, status: Status = Status.COMPLETE, robust: float = 0.8, clean: float = 0.97,
        **params) -> dict:
    return {"arm": arm, "number": number, "label": f"{arm}-{number:02d}", "status": status, "epochs": 10,
            "train_seconds": 30.0, "val/robust_acc": robust, "val/clean_acc": clean,
            **{f"param.{p}": v for p, v in params.items()}}


@pytest.fixture(scope="module")
def study():
    return load_study(TINY_STUDY)


def outcome_of(study, decision: Decision = Decision.BEATS, diffs=(0.021, 0.022, 0.020)) -> StudyOutcome:
    arms = ARMS
    rows = [row("baseline", 1, robust=0.81, **{"train.lr": 0.002}),
            row("baseline", 2, Status.STOPPED_EARLY, robust=0.4, **{"train.lr": 0.0002}),
            row("sns", 1, robust=0.836, **{"train.lr": 0.003, "sns.lam": 0.1, "sns.fraction": 0.2}),
            {**row("sns", 2, Status.FAILED, **{"train.lr": 0.009, "sns.lam": 2.0, "sns.fraction": 0.4}),
             "failure_reason": "TrainingCollapsed: clean accuracy at chance after warm-up"}]
    outcome = StudyOutcome("tiny-20260101-000000", "parent", "/ray/tiny", rows, [True, False, True, False], "mlflow ui",
                           OBJECTIVES, arms, seconds=600.0)
    baseline, method = (Configuration(a.name, a, {}, f"{a.name}-01") for a in arms)
    comparison = Comparison(method, baseline, PairedDifference((1, 2, 3), tuple(diffs)),
                            PairedDifference((1, 2, 3), (-0.004, -0.002, -0.006)), decision)
    outcome.confirmation = Confirmation([comparison], [baseline, method])
    return outcome


def test_the_answer_is_in_the_runs_table_short_name_verdict_tag_and_first_metric_columns(study):
    outcome = outcome_of(study)
    assert short_verdict(outcome) == "SNS beats PGD-AT, +2.1 points (3 seeds)"
    assert parent_run_name(study, outcome) == "tiny: SNS beats PGD-AT" and len(parent_run_name(study, outcome)) < 30
    assert short_verdict(outcome_of(study, Decision.UNDECIDED, (0.02, -0.01, 0.0))) == \
        "SNS vs PGD-AT undecided, +0.3 points (3 seeds)"
    metrics = summary_metrics(study, outcome)
    confirmed = sorted(k for k in metrics if k.startswith("confirmed/"))
    assert confirmed and all(k < "objective/" for k in confirmed)  # before every trial's first metric column
    against_two = outcome_of(study)
    trades = Configuration("trades", Arm("trades", "trades", {}), {}, "trades-01")
    against_two.confirmation.comparisons.append(replace(against_two.confirmation.comparisons[0], baseline=trades))
    assert {"confirmed/sns_vs_baseline_seeds", "confirmed/sns_vs_trades_seeds"} <= set(summary_metrics(study,
                                                                                                      against_two))
    assert metrics["confirmed/sns_robust_diff_points"] == pytest.approx(2.1)
    assert metrics["confirmed/sns_clean_diff_points"] == pytest.approx(-0.4)
    assert metrics["confirmed/sns_ci95_low_points"] < 2.1 < metrics["confirmed/sns_ci95_high_points"]
    assert metrics["confirmed/sns_seeds"] == 3 and metrics["confirmed/sns_p_better"] == 1.0
    outcome.confirmation = None
    assert short_verdict(outcome) == "search only (no confirmation)"


def test_accuracies_are_percent_and_differences_points_named_so(study):
    metrics = summary_metrics(study, outcome_of(study))
    assert metrics["summary/sns_best_val_robust_acc_pct"] == pytest.approx(83.6)  # the completed trial, not the failed
    assert metrics["summary/baseline_best_val_clean_acc_pct"] == pytest.approx(97.0)
    assert metrics["summary/baseline_completed_trials"] == 1
    unitless = [k for k in metrics if ("acc" in k or "diff" in k or "ci95" in k)
                and not k.endswith(("_pct", "_points"))]
    assert not unitless


def test_the_report_says_what_plus_minus_is_and_has_one_narrow_table_per_arm(study):
    outcome = outcome_of(study)
    text = study_markdown(study, outcome)
    assert text.startswith("**SNS vs PGD-AT: +2.1 ± 0.1 worst-case robust points")
    assert "± = sd over seeds" in text.splitlines()[0]  # in the verdict, beside the interval
    assert "± is the standard deviation of the per-seed differences over seeds" in text
    baseline, sns = (search_table(arm, [r for r in outcome.rows if r["arm"] == arm.name], OBJECTIVES)
                     for arm in outcome.arms)
    assert baseline[2] == "| trial | status | lr | robust_acc % | clean_acc % |"  # no SNS knobs, no constant columns
    assert sns[2] == "| trial | status | lam | fraction | lr | robust_acc % | clean_acc % |"
    assert "| sns-01 | COMPLETE | 0.1 | 0.2 | 0.003 | 83.6 | 97.0 |" in sns
    assert "- sns-02: TrainingCollapsed: clean accuracy at chance after warm-up" in sns
    assert "\n".join(baseline) in text and "\n".join(sns) in text
    assert all(len(line.split("|")) - 2 <= 8 for line in baseline + sns if line.startswith("|"))


def test_pareto_points_are_labelled_with_trial_names_in_percent(study):
    outcome = outcome_of(study)
    figure = pareto_figure(outcome.rows, OBJECTIVES, outcome.pareto)
    ax = figure.axes[0]
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == ["baseline-01", "sns-01"]  # the completed trials, by the names their MLflow runs have
    assert ax.get_xlabel() == "val/robust_acc (%) (max)"
    assert {round(t.xy[0], 1) for t in ax.texts} == {81.0, 83.6}


def test_the_confirmation_plot_names_its_margin(study):
    outcome = outcome_of(study)
    outcome.confirmation.rows = [{"configuration": c, "seed": s, "test_robust_acc": 0.8} for c in ("baseline", "sns")
                                 for s in (1, 2, 3)]
    legend = [t.get_text() for t in confirmation_figure(outcome.confirmation).axes[1].get_legend().get_texts()]
    assert "equivalence margin (±1 points)" in legend


def test_trial_params_lead_the_compare_view_with_what_both_arms_share():
    """MLflow's compare view sorts params by name and plots the first three that differ: each of those must
    be a value every arm's run has (no 'unknown' for the baseline on an SNS axis)."""
    baseline = sibling_params({"arm": "baseline", "train.lr": "0.002", "train.eps_ramp_epochs": 2,
                               "train.weight_decay": 0.0})
    sns = sibling_params({"arm": "sns", "train.lr": "0.003", "train.eps_ramp_epochs": 1, "train.weight_decay": 5e-4,
                          "sns.lam": "0.1", "sns.distance": "l1", "sns.fraction": "0.2"})
    assert sorted(sns)[:4] == ["arm", "recipe.eps_ramp_epochs", "recipe.lr", "recipe.weight_decay"]
    assert all(name in baseline for name in sorted(sns)[:4]) and "sns.lam" in sns and "recipe.lam" not in sns
    confirm = sibling_params({"arm": "sns", "train.seed": 2, "train.lr": "0.003", "sns.lam": "0.1"})
    assert sorted(confirm) == ["arm", "recipe.lr", "seed", "sns.lam"]
    shootout = sibling_params({"arm": "sns_trades", "train.lr": "0.003", "sns.lam": "0.1", "trades.beta": 6.0})
    assert sorted(shootout) == ["arm", "recipe.lr", "sns.lam", "trades.beta"]  # an arm named apart from its method


def test_every_arm_cost_per_epoch_is_reported_against_the_control(study):
    from orchestrator.record.summary import compute_words, console_text, summary_metrics

    outcome = outcome_of(study)
    outcome.cost_ratios, outcome.confirmation = {"baseline": 1.0, "sns": 1.094}, None
    words = compute_words(study, outcome)
    assert words == "cost per epoch against PGD-AT: SNS 1.09x (regularized epochs)"
    assert words in console_text(study, outcome) and words in study_markdown(study, outcome)
    assert summary_metrics(study, outcome)["summary/sns_cost_per_epoch_vs_control"] == 1.094
    outcome.cost_ratios = {}
    assert compute_words(study, outcome).startswith("no cost per epoch")

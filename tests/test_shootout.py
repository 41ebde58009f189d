"""Several arms in one study: each arm searches the recipe plus the knobs its method reads, every arm is compared
with the control (and each SNS arm with its own base), and the two-arm study files mean what they meant."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from orchestrator.config import ConfigError
from orchestrator.config.search_space import reads_path
from orchestrator.config.study import load_study
from orchestrator.study.confirmation import Configuration, summarize

REPO = Path(__file__).resolve().parents[1]
SHOOTOUT = REPO / "configs" / "study" / "shootout_quick.yaml"


def test_each_arm_searches_the_recipe_and_only_the_knobs_its_method_reads():
    study = load_study(SHOOTOUT)
    spaces = {arm.name: set(arm.space) for arm in study.arm_list()}
    recipe = {"train.lr", "train.eps_ramp_epochs", "train.weight_decay"}
    assert spaces == {"pgd_at": recipe, "trades": recipe | {"trades.beta"},
                      "sns_pgd_at": recipe | {"sns.lam", "sns.fraction", "sns.warmup_share"},
                      "sns_trades": recipe | {"trades.beta", "sns.lam", "sns.fraction", "sns.warmup_share"},
                      "mart": recipe | {"mart.beta"}, "cas": recipe | {"cas.beta"}}
    assert {arm.trials for arm in study.arm_list()} == {8}  # the same budget for every arm
    methods = {arm.name: (arm.method, arm.experiment.sns.base, arm.title) for arm in study.arm_list()}
    assert methods["sns_trades"] == ("sns", "trades", "SNS on TRADES")
    assert methods["sns_pgd_at"] == ("sns", "pgd_at", "SNS on PGD-AT") and methods["cas"][0] == "cas"
    assert study.control_arm == "pgd_at" and study.baseline is None


def test_every_arm_meets_the_control_and_each_sns_arm_its_own_base():
    study = load_study(SHOOTOUT)
    assert study.comparisons() == [("trades", "pgd_at"), ("sns_pgd_at", "pgd_at"), ("sns_trades", "pgd_at"),
                                   ("mart", "pgd_at"), ("cas", "pgd_at"), ("sns_trades", "trades")]
    every_pair = load_study(SHOOTOUT, {"compare": "all"}).comparisons()
    assert len(every_pair) == 15 and len({frozenset(p) for p in every_pair}) == 15  # 6 choose 2, each once
    lines = study.design_lines()
    assert "Holm over 6 comparisons" in lines[-1] and "sns_trades vs trades" in lines[-1]


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "study" / "*.yaml"))))
def test_every_study_config_still_loads_and_two_arm_files_mean_what_they_meant(path):
    study = load_study(path)
    if study.arms is None:  # baseline + the method: compared the way they always were
        arms = study.arm_list()
        assert [a.name for a in arms] == ["baseline", study.experiment.method]
        assert study.comparisons() == [(study.experiment.method, "baseline")]
        assert not any(p.startswith("sns.") for p in arms[0].space)
        assert set(arms[1].space) == set(study.search_space)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"control": "pgdat"}, "control: 'pgdat' is not an arm (arms: pgd_at, trades, sns_pgd_at, sns_trades, mart, "
                           "cas); did you mean 'pgd_at'?"),
    ({"arms": [{"name": "pgd_at", "method": "pgd_at", "base": "trades"}, {"name": "sns", "method": "sns"}]},
     "arms.0.base: only an sns arm has a base"),
    ({"baseline.method": "pgd_at"}, "not both; move the baseline into `arms:`"),
    ({"arms": [{"name": "a", "method": "pgd_at"}, {"name": "a", "method": "sns"}]}, "each name may appear once"),
    ({"arms": [{"name": "pgd_at", "method": "pgd_at"}, {"name": "mart", "method": "mart"}]},
     "search_space.trades.beta: no arm's method reads it"),
])
def test_a_wrong_shootout_is_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_study(SHOOTOUT, overrides)
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_control_without_arms_says_where_it_belongs():
    with pytest.raises(ConfigError, match="control and compare: only with an `arms:` list"):
        load_study(REPO / "configs" / "study" / "quick.yaml", {"control": "baseline"})


def test_a_path_belongs_to_the_methods_that_read_its_block():
    study = load_study(SHOOTOUT)
    by_name = {arm.name: arm.experiment for arm in study.arm_list()}
    assert reads_path(by_name["cas"], "cas.beta") and not reads_path(by_name["mart"], "cas.beta")
    assert reads_path(by_name["sns_trades"], "trades.beta") and not reads_path(by_name["sns_pgd_at"], "trades.beta")
    assert all(reads_path(e, "train.lr") for e in by_name.values())


def test_the_confirmation_pairs_each_arm_with_its_reference_seed_by_seed():
    study = load_study(SHOOTOUT)
    arms = {arm.name: arm for arm in study.arm_list()}
    configurations = [Configuration(name, arms[name], {}, f"{name}-01") for name in arms]
    robust = {"pgd_at": 0.80, "trades": 0.78, "sns_pgd_at": 0.82, "sns_trades": 0.81, "mart": 0.79, "cas": 0.70}
    rows = [{"configuration": name, "arm": name, "seed": seed, "label": f"{name} s{seed}", "status": "COMPLETE",
             "failure": None, "test_clean_acc": 0.95, "test_robust_acc": value + 0.01 * seed}
            for name, value in robust.items() for seed in (1, 2, 3)]
    confirmation = summarize(study, rows, configurations, 1)
    pairs = {(c.configuration.name, c.baseline.name): c for c in confirmation.comparisons}
    assert list(pairs) == study.comparisons()
    assert pairs["sns_trades", "trades"].robust.differences == pytest.approx((0.03, 0.03, 0.03))
    assert pairs["cas", "pgd_at"].robust.differences == pytest.approx((-0.10, -0.10, -0.10))
    deltas = {(r["configuration"], r["seed"]): r.get("robust_diff") for r in confirmation.rows}
    assert deltas["mart", 2] == pytest.approx(-0.01) and deltas["pgd_at", 1] is None  # Δ against the control


def test_a_cas_arm_is_validated_with_its_adaptive_attack():
    """CAS's argmax masks hide the cross-entropy's gradient: a search validated with plain PGD picks the most
    masked trial (a CAS trial scored 95.6% under PGD-10 where PGD-AT scored 83.6%)."""
    arms = {arm.name: arm.experiment for arm in load_study(SHOOTOUT).arm_list()}
    assert arms["cas"].val_attack().name == "cas_pgd" and arms["cas"].val_attack().steps == 10
    assert {arms[name].val_attack().name for name in arms if name != "cas"} == {"pgd"}


# The shootout's own confirmation (configs/study/shootout_quick.yaml, 2026-12-07, docs/analysis.md): test robust
# and clean accuracy per arm and seed.
MEASURED = {"pgd_at": ((0.818, 0.811, 0.760, 0.836, 0.824), (0.973, 0.973, 0.962, 0.971, 0.970)),
            "trades": ((0.832, 0.833, 0.822, 0.823, 0.824), (0.977, 0.973, 0.973, 0.972, 0.973)),
            "sns_pgd_at": ((0.819, 0.802, 0.763, 0.823, 0.811), (0.971, 0.967, 0.958, 0.971, 0.971)),
            "sns_trades": ((0.827, 0.835, 0.813, 0.811, 0.819), (0.945, 0.948, 0.939, 0.938, 0.939)),
            "mart": ((0.802, 0.833, 0.640, 0.843, 0.799), (0.962, 0.970, 0.936, 0.969, 0.959)),
            "cas": ((0.818, 0.810, 0.715, 0.826, 0.804), (0.970, 0.970, 0.944, 0.970, 0.966))}


def test_a_shootout_ranks_its_arms_with_intervals_and_puts_sns_against_each_base():
    from orchestrator.record.summary import console_text, study_markdown
    from orchestrator.study import ranking
    from orchestrator.study.outcome import StudyOutcome

    study = load_study(SHOOTOUT)
    arms = {arm.name: arm for arm in study.arm_list()}
    configurations = [Configuration(name, arms[name], {}, f"{name}-01") for name in arms]
    rows = [{"configuration": name, "arm": name, "seed": seed, "label": f"confirm-{name}-s{seed}",
             "status": "COMPLETE", "failure": None, "test_robust_acc": robust[seed - 1],
             "test_clean_acc": clean[seed - 1]} for name, (robust, clean) in MEASURED.items() for seed in range(1, 6)]
    confirmation = summarize(study, rows, configurations, 3)
    ranked = ranking.ranking(confirmation, study.control_arm)
    assert [r["configuration"] for r in ranked] == ["trades", "sns_trades", "pgd_at", "sns_pgd_at", "cas", "mart"]
    first, control = ranked[0], ranked[2]
    assert first["rank"] == 1 and first["robust_acc_mean"] == pytest.approx(0.8268)
    assert first["robust_diff_mean"] == pytest.approx(0.017) and first["ci95_low"] < 0 < first["ci95_high"]
    assert first["decision"] == "undecided" and first["vs"] == "pgd_at"
    assert control["decision"] == "control" and control["ci95_low"] is None
    assert ranking.ranking_table(ranked).num_rows == 6
    lines = ranking.base_lines(confirmation)
    assert [line.split(":")[0] for line in lines] == ["SNS on PGD-AT", "SNS on TRADES"]
    assert lines[1].startswith("SNS on TRADES: -0.6 robust points vs TRADES (95% CI ")
    assert lines[1].endswith("undecided after 5 seeds")
    outcome = StudyOutcome("shootout", "parent", "/ray", [], [], "mlflow ui", [("val/robust_acc", "max")],
                           list(arms.values()), confirmation=confirmation)
    report, console = study_markdown(study, outcome), console_text(study, outcome)
    assert "6 arms against the control pgd_at on mnist5k" in report
    assert "## Ranking" in report and "| 1 | trades | TRADES | 5 | 82.7 ± 0.5 | 97.4 | +1.7 vs pgd_at |" in report
    assert "SNS on each base: SNS on PGD-AT: -0.6 robust points vs PGD-AT" in console


def test_a_replicated_two_arm_study_shows_each_search_verdict_not_a_ranking_across_searches():
    from dataclasses import replace

    from orchestrator.study import ranking
    from orchestrator.study.replicates import across_searches

    study = load_study(REPO / "configs" / "study" / "quick.yaml", {"study.replicates": 3})
    arms = {arm.name: arm for arm in study.arm_list()}
    configurations = [Configuration(f"r{r}-{name}", arms[name], {}, f"r{r}-{name}-01", r)
                      for r in (1, 2, 3) for name in arms]
    rows = [{"configuration": c.name, "arm": c.arm.name, "replicate": c.replicate, "seed": seed, "label": c.name,
             "status": "COMPLETE", "failure": None, "test_clean_acc": 0.97,
             "test_robust_acc": 0.80 + (0.02 if c.arm.name == "sns" else 0.0) + 0.001 * seed * c.replicate}
            for c in configurations for seed in (1, 2, 3)]
    confirmation = summarize(study, rows, configurations, 1)
    assert not ranking.shown(confirmation)  # two configurations per search: each search's verdict says it all
    over_searches = replace(confirmation, per_search=confirmation.comparisons,
                            comparisons=across_searches(study, confirmation.comparisons))  # as run_confirmation
    (line,) = ranking.base_lines(over_searches)
    assert line.startswith("SNS: +2.0 robust points vs PGD-AT") and line.endswith("after 3 searches")

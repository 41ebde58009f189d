"""One shape for a trial (TrialSettings across the Ray boundary), the arms' searchers, and the one warm-up rule."""

import pytest
import yaml
from conftest import TINY_STUDY

from ns_core.attacks import Attack
from orchestrator.config.study import load_study
from orchestrator.execution.trial_settings import Record, Role, TrialSettings
from orchestrator.execution.warmup import attach, fork_point, plan_warmups, shapes_trajectory, trajectory_key

RECORD = Record("sqlite:////tmp/x.db", "exp", "parent", "study")


def tiny(tmp_path, **blocks):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": str(TINY_STUDY), "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"},
                                    **blocks}))
    return load_study(path)


def settings(study, **changes) -> TrialSettings:
    fields = {"role": Role.CONFIRM, "label": "confirm-sns-s1", "experiment": study.experiment.model_dump(mode="json"),
              "record": RECORD, **changes}
    return TrialSettings(**fields)


def test_settings_cross_the_ray_boundary_as_plain_values_and_come_back_equal(tmp_path):
    study = tiny(tmp_path)
    original = settings(study, overrides={"sns.lambda": 0.3, "train.seed": 4}, arm="sns", forks={1: "/w/ckpt1"},
                        keep_epochs=(1, 2), number=3,
                        final_suite=(Attack("feature_pgd", 0.2, steps=3, layers=("relu3",)),))
    config = original.tune_config()
    assert set(config) == {"trial"}

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str | int) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, str | int | float | bool)

    assert plain(config)  # Tune swaps anything else for a placeholder it resolves only inside the trial
    back = TrialSettings.of(config)
    assert back == original and back.role is Role.CONFIRM and back.forks == {1: "/w/ckpt1"}
    experiment = back.experiment_config()  # validated here, once
    assert experiment.sns.lam == 0.3 and experiment.train.seed == 4 and back.seed == 4
    assert repr(back) == "TrialSettings(confirm-sns-s1)"  # Tune prints trials with it: no experiment dump


def test_arms_search_the_same_way_the_baseline_arm_never_samples_sns_paths(tmp_path):
    from ray.tune.search import Searcher

    from orchestrator.execution.search import ArmsSearcher, PerArm, arm_sampler, make_searcher

    study = tiny(tmp_path, study={"trials": 3, "scheduler": "asha", "grace_period": 1},
                 search_space={"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
                               "sns.layers": {"type": "categorical", "choices": [["relu3"], ["relu3", "relu4"]]},
                               "sns.lam": {"type": "float", "low": 0.01, "high": 1.0, "log": True}})
    baseline, method = study.arm_list()
    assert (baseline.name, baseline.method, baseline.trials, baseline.tuned) == ("baseline", "pgd_at", 3, True)
    assert set(baseline.space) == {"train.lr"} and set(method.space) == {"train.lr", "sns.layers", "sns.lam",
                                                                          "sns.fraction"}  # + tiny.yaml's
    samplers = [arm_sampler(study, arm, TrialSettings(role=Role.SEARCH, label=arm.name, arm=arm.name, record=RECORD,
                                                      experiment=arm.experiment.model_dump(mode="json")))
                for arm in (baseline, method)]
    limiter = make_searcher(study, samplers)
    searcher = limiter.searcher
    assert isinstance(searcher, ArmsSearcher) and limiter.max_concurrent == study.study.concurrency
    suggested = [TrialSettings.of(searcher.suggest(f"t{i}")) for i in range(6)]
    assert searcher.suggest("t6") == Searcher.FINISHED  # each arm got exactly its trials
    assert [s.label for s in suggested] == ["baseline-01", "sns-01", "baseline-02", "sns-02", "baseline-03", "sns-03"]
    for s in suggested:
        arm = baseline if s.arm == "baseline" else method
        assert set(s.overrides) == set(arm.space)  # decoded on the driver; the baseline's never holds sns.*
        assert s.experiment_config().method == arm.method
    assert all(s.overrides["sns.layers"] in (["relu3"], ["relu3", "relu4"]) for s in suggested if s.arm == "sns")
    searcher.on_trial_complete("t1", {"val/robust_acc": 0.5, "val/clean_acc": 0.9})  # an sns trial
    assert [len(sampler.optuna._ot_study.trials) for sampler in samplers] == [3, 3]
    assert [t.state.name for t in samplers[1].optuna._ot_study.trials].count("COMPLETE") == 1  # its own arm's
    assert [t.state.name for t in samplers[0].optuna._ot_study.trials].count("COMPLETE") == 0
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    restored = make_searcher(study, [arm_sampler(study, arm, samplers[0].template) for arm in (baseline, method)])
    restored.searcher.restore(str(path))
    assert [s.created for s in restored.searcher.samplers] == [3, 3]  # the numbers continue after a resume
    scheduler = PerArm(study)
    assert scheduler.settings["max_t"] == study.max_epochs() and scheduler.settings["metric"] == "val/robust_acc"


def test_an_untuned_baseline_is_one_trial_and_so_is_a_baseline_with_nothing_shared_to_search(tmp_path):
    assert tiny(tmp_path).arm_list()[0].describe() == "an untuned PGD-AT baseline"  # tiny searches sns.* only
    study = tiny(tmp_path, baseline={"tune": False},
                 search_space={"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}})
    baseline, method = study.arm_list()
    assert not baseline.tuned and baseline.trials == 1 and baseline.space == {}
    assert method.describe() == "SNS, tuned over 3 trials"


def test_one_warmup_rule_groups_trials_by_their_base_trajectory(tmp_path):
    study = tiny(tmp_path, experiment={"train": {"epochs": 3}, "sns": {"warmup_epochs": 2}})
    trials = [settings(study, label=f"sns-s{s}-w{w}", overrides={"train.seed": s, "sns.warmup_epochs": w})
              for s in (1, 2) for w in (1, 2)]
    trials += [settings(study, label=f"pgd-s{s}", overrides={"train.seed": s, "method": "pgd_at"}) for s in (1, 2)]
    trials.append(settings(study, label="sns-lr", overrides={"train.seed": 1, "train.lr": 0.01}))  # its own recipe
    warmups = plan_warmups(trials, RECORD)
    assert sorted(w.label for w in warmups.values()) == ["warmup-pgd_at-s1", "warmup-pgd_at-s2"]
    assert all(w.until == 2 and w.keep_epochs == (1, 2) and w.role is Role.WARMUP for w in warmups.values())
    checkpoints = {w.label: {1: f"/{w.label}/1", 2: f"/{w.label}/2"} for w in warmups.values()}
    attached = {t.label: t for t in attach(trials, warmups, checkpoints)}
    assert attached["sns-lr"].forks == {}  # a learning rate of its own does not share
    points = {label: fork_point(t.experiment_config(), t.forks) for label, t in attached.items()}
    assert points["pgd-s1"] == (2, "/warmup-pgd_at-s1/2")  # the base method continues the longest warm-up
    assert points["sns-s1-w1"] == (1, "/warmup-pgd_at-s1/1") and points["sns-s2-w2"] == (2, "/warmup-pgd_at-s2/2")
    first = trials[0].experiment_config()
    with pytest.raises(ValueError, match=r"no shared warm-up after epoch 1; the warm-up kept \[2\]"):
        fork_point(first, {2: "/x"})
    assert shapes_trajectory("train.lr") and shapes_trajectory("attack.eps") and not shapes_trajectory("sns.lam")
    assert trajectory_key(first) == trajectory_key(trials[4].experiment_config())  # SNS's base = PGD-AT's run
    assert trajectory_key(first) != trajectory_key(trials[-1].experiment_config())

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


SPACE = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
         "sns.layers": {"type": "categorical", "choices": [["relu3"], ["relu3", "relu4"]]},
         "sns.lam": {"type": "float", "low": 0.01, "high": 1.0, "log": True}}


def searcher_for(study, replicates=(None,)):
    from orchestrator.execution.search import arm_sampler, make_searcher, trial_label

    return make_searcher(study, [[arm_sampler(study, arm, TrialSettings(
        role=Role.SEARCH, label=trial_label(arm.name, None, r), arm=arm.name, record=RECORD, replicate=r,
        experiment=arm.experiment.model_dump(mode="json"))) for arm in study.arm_list(r)] for r in replicates])


def test_arms_search_the_same_way_the_baseline_arm_never_samples_sns_paths(tmp_path):
    from ray.tune.search import Searcher

    study = tiny(tmp_path, study={"trials": 3, "scheduler": "asha", "grace_period": 1, "reproducible": False},
                 search_space=SPACE, storage={"optuna": f"sqlite:///{tmp_path / 'optuna.db'}"})
    baseline, method = study.arm_list()
    assert (baseline.name, baseline.method, baseline.trials, baseline.tuned) == ("baseline", "pgd_at", 3, True)
    assert set(baseline.space) == {"train.lr"} and set(method.space) == {"train.lr", "sns.layers", "sns.lam",
                                                                          "sns.fraction"}  # + tiny.yaml's
    searcher = searcher_for(study)
    suggested = [TrialSettings.of(searcher.suggest(f"t{i}")) for i in range(2)]
    assert searcher.suggest("t2") is None  # asynchronous: study.concurrency (2) at a time
    for i in range(2, 6):
        searcher.on_trial_complete(f"t{i - 2}", {"val/robust_acc": 0.5, "val/clean_acc": 0.9})
        suggested.append(TrialSettings.of(searcher.suggest(f"t{i}")))
    assert searcher.suggest("t6") == Searcher.FINISHED  # each arm got exactly its trials
    assert [s.label for s in suggested] == ["baseline-01", "sns-01", "baseline-02", "sns-02", "baseline-03", "sns-03"]
    assert [s.sequence for s in suggested] == [1, 2, 3, 4, 5, 6] and [s.number for s in suggested] == [1, 1, 2, 2, 3, 3]
    for s in suggested:
        arm = baseline if s.arm == "baseline" else method
        assert set(s.overrides) == set(arm.space)  # decoded on the driver; the baseline's never holds sns.*
        assert s.experiment_config().method == arm.method
    assert all(s.overrides["sns.layers"] in (["relu3"], ["relu3", "relu4"]) for s in suggested if s.arm == "sns")
    import optuna  # each arm's Optuna study, read back from its storage through Optuna's public API

    storage = study.storage.optuna
    states = [[t.state.name for t in optuna.load_study(study_name=f"{RECORD.study}-{arm}", storage=storage).trials]
              for arm in ("baseline", "sns")]
    assert [row.count("COMPLETE") for row in states] == [2, 2]  # each arm told its own trials only
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    restored = searcher_for(study)
    restored.restore(str(path))
    assert [s.created for s in restored.searches[0].samplers] == [3, 3]  # the numbers continue after a resume


def run_searcher(study, order):
    """Suggest a study's trials, ending the running ones in `order` (a key on (sequence, trial id)) whenever the
    searcher waits; each trial's result is a function of its suggested values. The suggested labels and values."""
    searcher, running, out = searcher_for(study), {}, []
    while True:
        trial_id = f"t{len(out)}"
        config = searcher.suggest(trial_id)
        if config == "FINISHED":
            return out
        if config is None:
            sequence, ended = min((s.sequence, t) for t, s in running.items()) if order == "in order" else max(
                (s.sequence, t) for t, s in running.items())
            settings = running.pop(ended)
            value = settings.overrides["train.lr"] * 10 + len(settings.overrides) / 100
            searcher.on_trial_complete(ended, {"val/robust_acc": value, "val/clean_acc": 0.9})
            continue
        settings = TrialSettings.of(config)
        running[trial_id] = settings
        out.append((settings.label, settings.sequence, dict(settings.overrides)))


def test_a_reproducible_search_suggests_the_same_trials_whatever_order_they_end_in(tmp_path):
    study = tiny(tmp_path, study={"trials": 6, "concurrency": 2}, search_space=SPACE)
    assert study.study.reproducible  # the default
    first, second = run_searcher(study, "in order"), run_searcher(study, "last first")
    assert first == second and len(first) == 12
    asynchronous = tiny(tmp_path, study={"trials": 6, "concurrency": 2, "reproducible": False}, search_space=SPACE)
    assert run_searcher(asynchronous, "in order") != run_searcher(asynchronous, "last first")  # what it fixes
    searcher = searcher_for(study)
    ids = [f"t{i}" for i in range(3)]
    assert searcher.suggest(ids[0]) and searcher.suggest(ids[1]) and searcher.suggest(ids[2]) is None
    searcher.on_trial_complete(ids[1], {"val/robust_acc": 0.5, "val/clean_acc": 0.9})
    assert searcher.suggest(ids[2]) is None  # trial 3 waits for trial 1, however many others ended
    searcher.on_trial_complete(ids[0], {"val/robust_acc": 0.5, "val/clean_acc": 0.9})
    assert TrialSettings.of(searcher.suggest(ids[2])).sequence == 3
    assert searcher.searches[0].told == {1}  # trial 2's result waits for trial 4's suggestion


def test_replicates_search_side_by_side_with_their_own_seeds_and_validation_splits(tmp_path):
    study = tiny(tmp_path, study={"trials": 2, "replicates": 2, "replicate_data": True}, search_space=SPACE)
    searcher = searcher_for(study, (1, 2))
    suggested = [TrialSettings.of(searcher.suggest(f"t{i}")) for i in range(4)]
    assert [(s.replicate, s.label) for s in suggested] == [(1, "r1-baseline-01"), (2, "r2-baseline-01"),
                                                           (1, "r1-sns-01"), (2, "r2-sns-01")]
    assert suggested[0].overrides != suggested[1].overrides  # another searcher seed
    assert [s.experiment_config().data.data_seed for s in suggested] == [0, 1, 0, 1]


def test_rungs_are_shares_of_each_trials_own_schedule_and_a_trial_meets_only_settled_peers(tmp_path):
    from orchestrator.execution.search import PerArm, rung_epoch, rungs

    study = tiny(tmp_path, study={"trials": 6, "scheduler": "asha", "grace_period": 2, "reduction_factor": 2},
                 experiment={"train": {"epochs": 8}}, search_space={**SPACE, "train.epochs": {
                     "type": "int", "low": 4, "high": 8}})
    assert rungs(study) == [0.25, 0.5] and [rung_epoch(m, 4) for m in (0.25, 0.5)] == [1, 2]
    assert [rung_epoch(m, 8) for m in (0.25, 0.5)] == [2, 4] and rung_epoch(1 / 3, 6) == 2
    scheduler = PerArm(study)  # reproducible, concurrency 2: trial n meets trials 1..n-2
    ladder = {m: {} for m in scheduler.milestones}
    assert scheduler.decide(ladder, 1, 0.25, 0.8) == "CONTINUE"  # nothing to compare with
    assert scheduler.decide(ladder, 2, 0.25, 0.1) == "CONTINUE"  # trial 1 may not have reached the rung yet
    assert scheduler.decide(ladder, 3, 0.25, 0.5) == "STOP"  # below trial 1's 0.8
    assert scheduler.decide(ladder, 3, 0.25, 0.5) == "CONTINUE"  # a rung decides once
    assert scheduler.decide(ladder, 4, 0.5, 0.1) == "CONTINUE"  # alone at the second rung
    assert scheduler.decide(ladder, 5, 0.375, 0.9) == "CONTINUE" and 5 in ladder[0.25]  # epoch 3 of 8: rung 1
    study.study.reproducible = False
    assert PerArm(study).decide({m: {1: 0.8, 2: 0.9} for m in scheduler.milestones}, 3, 0.25, 0.85) == "STOP"


def test_an_untuned_baseline_is_one_trial_and_so_is_a_baseline_with_nothing_shared_to_search(tmp_path):
    assert tiny(tmp_path).arm_list()[0].describe() == "an untuned PGD-AT baseline"  # tiny searches sns.* only
    study = tiny(tmp_path, baseline={"tune": False},
                 search_space={"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}})
    baseline, method = study.arm_list()
    assert not baseline.tuned and baseline.trials == 1 and baseline.space == {}
    assert method.describe() == "SNS, tuned over 3 trials"


def two_a_round(study, outcomes):  # the confirmation's plan, in miniature: two trials a round, three rounds
    PLANNED.append(len(outcomes))
    return [] if len(outcomes) >= 6 else [settings(study, label=f"r{len(outcomes) // 2}-{i}") for i in (1, 2)]


PLANNED: list[int] = []


def test_rounds_run_at_the_studys_concurrency_and_a_round_waits_for_the_last(tmp_path):
    """The confirmation's searcher: at most `concurrency` trials out at once (a worker more would start only to be
    thrown away), the next round planned from every outcome once the round has ended, the cap kept on --resume."""
    import functools

    from orchestrator.execution.search import Rounds

    plan = functools.partial(two_a_round, tiny(tmp_path))
    for concurrency, at_once in ((1, 1), (2, 2), (None, 2)):
        PLANNED.clear()
        rounds, issued = Rounds(plan, concurrency), []
        while True:
            out = []
            while (config := rounds.suggest(f"t{len(issued)}")) not in (None, Rounds.FINISHED):
                issued.append(f"t{len(issued)}")
                out.append(TrialSettings.of(config).label)
            if config == Rounds.FINISHED:
                break
            assert 1 <= len(out) <= at_once, (concurrency, out)
            for trial_id in issued[-len(out):]:
                rounds.on_trial_complete(trial_id, {"val/robust_acc": 0.5})
        assert len(issued) == 6 and PLANNED == [0, 2, 4, 6]  # a round only after the last one ended
    Rounds(plan, 1).save(str(tmp_path / "rounds.pkl"))
    restored = Rounds(plan)
    restored.restore(str(tmp_path / "rounds.pkl"))
    assert restored.concurrency == 1 and restored.suggest("a") is not None and restored.suggest("b") is None
    older = Rounds.__new__(Rounds)  # a searcher pickled before the cap existed resumes as the cluster allows
    older.__dict__.update({k: v for k, v in Rounds(plan, 1).__dict__.items() if k != "concurrency"})
    assert older.concurrency is None and older.suggest("a") is not None and older.suggest("b") is not None


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

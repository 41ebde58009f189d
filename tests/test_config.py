"""The one config system: every shipped config (experiments, studies, analyses) loads through one loader;
paths, overrides, attacks and search spaces are checked; a bad config is one line on stderr and exit code 2
from the real CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ns_core.attacks import Attack
from ns_core.objectives import OBJECTIVES
from orchestrator.config import ConfigError
from orchestrator.config.analysis import load_methods_config
from orchestrator.config.experiment import ExperimentConfig, smoke_experiment
from orchestrator.config.loader import apply_overrides, load_config, parse_set
from orchestrator.config.paths import canonical_path
from orchestrator.config.search_space import ParamSpec
from orchestrator.config.study import load_study, smoke_study

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPO / "configs" / "experiment").glob("*.yaml"))
STUDIES = sorted((REPO / "configs" / "study").glob("*.yaml"))
ANALYSES = sorted((REPO / "configs" / "analysis").glob("*.yaml"))
TINY = REPO / "configs" / "study" / "tiny.yaml"
QUICK = REPO / "configs" / "experiment" / "quick.yaml"


def load_experiment(path, overrides=None):
    return load_config(path, ExperimentConfig, overrides)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_configs_load_and_build_their_objective(path):
    experiment = load_experiment(path)
    assert experiment.objective().name == experiment.method
    assert experiment.train_config().epochs == experiment.train.epochs
    assert all(isinstance(a, Attack) for a in experiment.final_suite())
    assert experiment.val_attack().threat_model == experiment.attack.threat_model


@pytest.mark.parametrize("path", ANALYSES, ids=lambda p: p.stem)
def test_analysis_configs_are_built_from_the_experiments_blocks(path):
    config = load_methods_config(path)
    for entry in config.methods:
        experiment = config.experiment_for(entry, seed=7)
        assert experiment.method == entry.method and experiment.train.seed == 7
        assert experiment.train == config.experiment.train.model_copy(update={"seed": 7})  # one budget for all


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_study_configs_load_with_absolute_locations(path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = load_study(path)
    assert study.search_space and all("." in p for p in study.search_space)
    if study.tracking.uri.startswith("sqlite:///"):
        assert Path(study.tracking.uri.removeprefix("sqlite:///")).is_absolute()
    assert "://" in study.storage.ray or Path(study.storage.ray).is_absolute()


@pytest.mark.parametrize("method", OBJECTIVES.names())
def test_every_registered_method_takes_its_parameters_from_the_blocks(method):
    experiment = ExperimentConfig(method=method)
    assert experiment.objective().name == method
    assert set(experiment.objective_params()) <= {"attack", "beta", "eps_ramp_epochs", *experiment.sns.model_dump()}


def test_lambda_alias_and_canonical_paths():
    assert canonical_path(ExperimentConfig, "sns.lambda") == "sns.lam"
    assert canonical_path(ExperimentConfig, "attack.eps") == "attack.eps"  # into the Attack dataclass
    assert ExperimentConfig.model_validate({"sns": {"lambda": 0.5}}).sns.lam == 0.5
    with pytest.raises(ValueError, match="sns has: lam.*did you mean 'sns.lam'"):
        canonical_path(ExperimentConfig, "sns.lamda")
    with pytest.raises(ValueError, match="is a block"):
        canonical_path(ExperimentConfig, "train")
    with pytest.raises(ValueError, match="has no sub-fields"):
        canonical_path(ExperimentConfig, "dataset.name")


def test_overrides_are_validated_again():
    base = ExperimentConfig()
    assert apply_overrides(base, {"sns.lambda": 0.3, "train.epochs": 2}).sns.lam == 0.3
    assert apply_overrides(base, parse_set(["attack.eps=0.1", "attack.steps=7"])).attack == Attack("pgd", 0.1, steps=7)
    with pytest.raises(ConfigError, match="sns.fraction: must be <= 1"):
        apply_overrides(base, {"sns.fraction": 1.5})
    with pytest.raises(ConfigError, match=r"attack: .*did you mean 8/255"):
        apply_overrides(base, {"attack.eps": 8})
    with pytest.raises(ConfigError, match="write PATH=VALUE"):
        parse_set(["sns.lam"])


def test_a_field_named_base_is_a_field_and_a_yaml_base_is_a_file(tmp_path):
    path = _write(tmp_path, "e.yaml", {"base": str(REPO / "configs/experiment/quick.yaml"), "sns": {"base": "trades"}})
    experiment = load_experiment(path)
    assert experiment.sns.base == "trades" and experiment.dataset == "mnist5k" and experiment.base_method == "trades"


def test_custom_models_and_datasets_by_import_path():
    experiment = ExperimentConfig(model="user_models:tiny_mlp", dataset="user_models:blobs", method="pgd_at")
    assert experiment.model == "user_models:tiny_mlp"
    with pytest.raises(ValueError, match="has no function 'tiny_mpl'; did you mean user_models:tiny_mlp"):
        ExperimentConfig(model="user_models:tiny_mpl")


def test_categorical_list_choices_round_trip_through_optuna_values():
    spec = ParamSpec(type="categorical", choices=[["relu3", "relu4"], ["relu4"]])
    encoded = spec.optuna_choices()
    assert all(isinstance(c, str) for c in encoded)
    assert [spec.decode(c) for c in encoded] == spec.choices
    assert ParamSpec(type="int", low=1, high=4).decode(3.0) == 3


@pytest.mark.parametrize("bad, message", [
    ({"type": "float", "low": 1.0, "high": 0.5}, "low must be < high"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "log scale needs low > 0"),
    ({"type": "categorical", "choices": []}, "non-empty"),
    ({"type": "int", "low": 0.5, "high": 3}, "integer bounds"),
])
def test_bad_parameter_specs(bad, message):
    with pytest.raises(ValueError, match=message):
        ParamSpec(**bad)


def _write(tmp_path, name, data) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_search_space_values_are_checked_against_the_experiment(tmp_path):
    path = _write(tmp_path, "s.yaml", {"base": str(TINY), "search_space": {
        "sns.fraction": {"type": "float", "low": 0.1, "high": 1.5}}})
    with pytest.raises(ConfigError, match=r"search_space\.sns\.fraction: sns\.fraction=1\.5 is not valid: .*<= 1"):
        load_study(path)


def test_points_to_evaluate_need_every_searched_path(tmp_path):
    path = _write(tmp_path, "p.yaml", {"base": str(TINY), "study": {"points_to_evaluate": [{"sns.lam": 0.1}]}})
    with pytest.raises(ConfigError, match="give a value for each searched path"):
        load_study(path)


def test_smoke_budgets_are_tiny():
    study = smoke_study(load_study(REPO / "configs" / "study" / "quick.yaml"))
    assert study.study.trials == 2 and study.study.scheduler == "none" and len(study.confirm_seeds()) == 2
    assert study.experiment.data.train_limit <= 256 and study.experiment.train.epochs <= 2
    experiment = smoke_experiment(load_experiment(REPO / "configs" / "experiment" / "cifar10.yaml"))
    assert experiment.eval.examples == 64 and all(a.steps_used <= 3 for a in experiment.final_suite())
    assert "autoattack" not in [a.name for a in experiment.final_suite()]


def test_a_study_has_a_baseline_arm_and_fresh_confirmation_seeds(tmp_path):
    study = load_study(TINY)
    assert study.baseline_method() == "pgd_at" and study.confirm_seeds() == [1, 2]
    assert study.confirm_seeds(4) == [1, 2, 3, 4]  # the listed seeds, then fresh ones, never the search seed
    assert study.baseline_experiment().method == "pgd_at"
    path = _write(tmp_path, "seed.yaml", {"base": str(TINY), "confirm": {"seeds": [0, 1]}})
    with pytest.raises(ConfigError, match="must be distinct and fresh"):
        load_study(path)
    path = _write(tmp_path, "max.yaml", {"base": str(TINY), "confirm": {"seeds": 3, "max_seeds": 2}})
    with pytest.raises(ConfigError, match=r"confirm.max_seeds \(2\) must be >= the first seeds \(3\)"):
        load_study(path)


def test_every_combination_of_the_search_space_is_checked_before_anything_trains(tmp_path):
    """Each value is fine alone; together (a 4-epoch budget with a 4-epoch eps ramp) the run never trains at the
    full eps, so the study is refused at load time, naming the combination."""
    path = _write(tmp_path, "combo.yaml", {"base": str(TINY), "experiment": {"train": {"epochs": 8}}, "search_space": {
        "train.epochs": {"type": "int", "low": 3, "high": 8},
        "train.eps_ramp_epochs": {"type": "categorical", "choices": [0, 3]}}})
    with pytest.raises(ConfigError, match=r"train.epochs=3, train.eps_ramp_epochs=3 is not valid: "
                                          r".*eps_ramp_epochs \(3\) must be < train.epochs \(3\)"):
        load_study(path)
    share = _write(tmp_path, "share.yaml", {"base": str(TINY), "search_space": {
        "train.epochs": {"type": "int", "low": 2, "high": 6},
        "sns.warmup_share": {"type": "float", "low": 0.2, "high": 0.5}}})
    study = load_study(share)  # a share keeps the warm-up below the epochs at every edge
    assert apply_overrides(study.experiment, {"train.epochs": 6, "sns.warmup_share": 0.5}).sns.warmup_epochs == 3
    assert study.max_epochs() == 6


BAD_CONFIGS = {
    "unknown_field": ({"study": {"trails": 3}}, "config error: study.trails: unknown key 'trails'; valid keys: name"),
    "wrong_type": ({"experiment": {"train": {"epochs": "two"}}}, "config error: experiment.train.epochs: must be"),
    "negative_trials": ({"study": {"trials": -3}}, "config error: study.trials: must be >= 1 (got -3)"),
    "unknown_dataset": ({"experiment": {"dataset": "cifar"}}, "unknown dataset 'cifar'; choose one of: cifar10,"),
    "unknown_model": ({"experiment": {"model": "lenet"}}, "unknown model 'lenet'; choose one of: lenet5,"),
    "unknown_method": ({"experiment": {"method": "snss"}}, "unknown method 'snss'; choose one of: cas, fast_at,"),
    "unknown_path": ({"search_space": {"sns.lamda": {"type": "float", "low": 0.1, "high": 1}}},
                     "config error: search_space.sns.lamda: 'sns.lamda' is not a field"),
    "test_metric": ({"study": {"objectives": [{"metric": "robust_acc"}]}},
                    "unknown metric 'robust_acc'; a study chooses on validation metrics"),
    "eps_scale": ({"experiment": {"attack": {"name": "pgd", "eps": 8}}}, "did you mean 8/255 = 0.03137?"),
    "attack_key": ({"experiment": {"eval": {"attacks": [{"name": "pgd", "eps": 0.1, "step": 3}]}}},
                   "experiment.eval.attacks.0.step: unknown key 'step'; valid keys: name, eps"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_study_config_is_one_line_and_exit_2(case, tmp_path, capsys):
    from pipelines import study

    override, expected = BAD_CONFIGS[case]
    path = _write(tmp_path, f"{case}.yaml", {"base": str(TINY), **override})
    assert study.main(["--config", str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error:") and expected in lines[0], captured.err
    assert not captured.out


@pytest.mark.slow
@pytest.mark.parametrize("module, config, start", [
    ("pipelines.study", {"base": str(TINY), "study": {"trials": -3}},
     "config error: study.trials: must be >= 1 (got -3)"),
    ("pipelines.train", {"base": str(REPO / "configs/experiment/quick.yaml"), "model": "lenet"},
     "config error: model: unknown model 'lenet'; choose one of: lenet5,"),
    ("pipelines.train", None, "config error: config file"),
    ("pipelines.train", {"base": str(TINY)}, "config error: {path} is a study config, not an experiment config; run "
                                             "it with python -m pipelines.study"),  # not an unknown key per block
])
def test_cli_subprocess_prints_one_line_and_exits_2(module, config, start, tmp_path):
    path = _write(tmp_path, "bad.yaml", config) if config else tmp_path / "missing.yaml"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-m", module, "--config", str(path), "--dry-run"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(start.format(path=path)), result.stderr


def test_a_search_space_entry_is_set_like_any_other_path(tmp_path):
    """`--set search_space.sns.lam.high=0.5`: the key of a search-space entry is an experiment path (aliases
    and all), followed by a field of the entry; a whole entry is one value, and null removes it."""
    study = load_study(TINY, parse_set(["search_space.sns.lam.high=0.5", "search_space.sns.lambda.log=false"]))
    assert (study.search_space["sns.lam"].high, study.search_space["sns.lam"].log) == (0.5, False)
    assert study.search_space["sns.lam"].low == 0.001  # the rest of the entry is the file's
    study = load_study(TINY, parse_set(["search_space.train.lr={type: float, low: 0.001, high: 0.01}",
                                        "search_space.sns.fraction=null"]))
    assert set(study.search_space) == {"sns.lam", "train.lr"} and study.search_space["train.lr"].high == 0.01
    data = yaml.safe_load(TINY.read_text())
    data["experiment"]["base"] = str(QUICK)
    data["search_space"] = {"sns.lambda": {"type": "float", "low": 0.01, "high": 1.0}}
    aliased = _write(tmp_path, "alias.yaml", data)
    study = load_study(aliased, parse_set(["search_space.sns.lam.high=0.2"]))  # the file's alias, the same entry
    assert study.search_space["sns.lam"].high == 0.2 and study.search_space["sns.lam"].low == 0.01
    assert canonical_path(type(study), "search_space.sns.lambda.high") == "search_space.sns.lam.high"
    with pytest.raises(ConfigError) as err:
        load_study(TINY, {"search_space.sns.lam.high": 0.0001}, {"search_space.sns.lam.high": "--set X"})
    assert str(err.value).endswith("(from --set X)")


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("study:\n  trials: [1, 2\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+"):
        load_study(path)


# ---- small things that were wrong at the config boundary ------------------------------------------------


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused_everywhere(value, tmp_path):
    with pytest.raises(ConfigError, match=r"sns.lam: must be a finite number"):
        load_experiment(QUICK, parse_set([f"sns.lam={value}"]))
    with pytest.raises(ConfigError, match=r"train.lr: must be a finite number"):
        load_experiment(QUICK, parse_set([f"train.lr={value}"]))
    path = _write(tmp_path, "s.yaml", {"base": str(TINY), "search_space": {"sns.lam": {
        "type": "float", "low": 0.1, "high": float(value.replace(".inf", "inf").replace(".nan", "nan"))}}})
    with pytest.raises(ConfigError, match="finite"):
        load_study(path)


def test_eps_as_the_fraction_the_guard_suggests_is_accepted(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 8/255 = 0.03137"):
        load_experiment(QUICK, parse_set(["attack.eps=8"]))
    experiment = load_experiment(QUICK, parse_set(["attack.eps=8/255", "eval.attacks=[{name: pgd, eps: 4/255}]"]))
    assert experiment.attack.eps == pytest.approx(8 / 255) and experiment.eval.attacks[0].eps == pytest.approx(4 / 255)
    path = _write(tmp_path, "e.yaml", {"base": str(QUICK), "attack": {"name": "pgd", "eps": "8/255"}})
    assert load_experiment(path).attack.eps == pytest.approx(8 / 255)
    with pytest.raises(ConfigError, match="EPS must be a number or a fraction like 8/255"):
        load_experiment(QUICK, parse_set(["attack.eps=8/zero"]))


# ---- the threat model: evaluation attacks follow the training attack unless a config sets theirs on purpose ----


@pytest.mark.parametrize("path", EXPERIMENTS + STUDIES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_config_evaluates_at_the_training_eps_it_is_given(path):
    """--set attack.eps=8/255 moves the validation attack, the final suite and a study's confirmation attacks."""
    if path.parent.name == "study":
        study = load_study(path, {"experiment.attack.eps": "8/255"})
        experiment, notes = study.experiment, study.threat_model_notes()
        confirm = [a.resolve(experiment.attack) for a in (study.confirm.attacks if study.confirm else None) or []]
    else:
        experiment = load_experiment(path, parse_set(["attack.eps=8/255"]))
        notes, confirm = experiment.threat_model_notes(), []
    attacks = [experiment.val_attack(), *experiment.final_suite(), *confirm]
    assert notes == [] and all(a.eps == pytest.approx(8 / 255) for a in attacks), notes
    assert {a.norm for a in attacks} == {experiment.attack.norm}


def test_a_study_confirms_each_configuration_at_its_own_training_eps():
    from orchestrator.study.confirmation import Configuration, confirm_suite

    study = load_study(REPO / "configs" / "study" / "quick.yaml", {"experiment.attack.eps": "8/255"})
    arm = study.arm_list()[1]
    suite = confirm_suite(study, Configuration("sns", arm, {}, "sns-01"))
    assert [a.name for a in suite] == ["fgsm", "pgd", "feature_pgd", "apgd_ce"]
    assert all(a.eps == pytest.approx(8 / 255) for a in suite)
    searched = confirm_suite(study, Configuration("sns", arm, {"attack.eps": 0.1}, "sns-02"))  # a searched eps
    assert {a.eps for a in searched} == {0.1}


def test_an_evaluation_eps_set_on_purpose_is_kept_and_said_in_the_dry_run_and_first_lines(tmp_path, capsys):
    from pipelines import study as study_pipeline
    from pipelines import train

    flags = ["--set", "train.val_attack={name: pgd, eps: 0.1, steps: 2}", "--set",
             "eval.attacks=[{name: fgsm}, {name: pgd, norm: l2, eps: 1.5, steps: 3}]"]
    experiment = load_experiment(QUICK, parse_set(flags[1::2]))
    assert [a.eps for a in (experiment.val_attack(), *experiment.final_suite())] == [0.1, 0.2, 1.5]
    notes = ["validation attack pgd at eps 0.1 differs from the training attack's eps 0.2 (set on purpose in "
             "train.val_attack)", "final-suite attack pgd at l2 eps 1.5 differs from the training attack's linf eps "
             "0.2 (set on purpose in eval.attacks[1])"]
    assert experiment.threat_model_notes() == notes
    assert train.main(["--config", str(QUICK), "--dry-run", "--runs-dir", str(tmp_path), *flags]) == 0
    out = capsys.readouterr().out
    assert [line.removeprefix("# note: ") for line in out.splitlines() if line.startswith("# note:")] == notes
    assert ("# attacks: training pgd-linf-eps0.2-s10-r1; validation pgd-linf-eps0.1-s2-r1; final suite "
            "fgsm-linf-eps0.2-s1-r1, pgd-l2-eps1.5-s3-r1") in out
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a runs folder that cannot be made: the run stops after its first lines
    assert train.main(["--config", str(QUICK), "--runs-dir", str(blocked), *flags]) == 2
    assert [line.removeprefix("note: ") for line in capsys.readouterr().out.splitlines()] == notes

    confirm = ["--set", "confirm.attacks=[{name: fgsm}, {name: pgd, eps: 0.3, steps: 3}]", "--set",
               "experiment.attack.eps=0.1"]
    assert study_pipeline.main(["--config", str(TINY), "--dry-run", *confirm]) == 0
    out = capsys.readouterr().out
    assert "; confirmation fgsm-linf-eps0.1-s1-r1, pgd-linf-eps0.3-s3-r1" in out
    assert [line for line in out.splitlines() if line.startswith("# note:")] == [
        "# note: confirmation attack pgd at eps 0.3 differs from the training attack's eps 0.1 (set on purpose in "
        "confirm.attacks[1])"]


def test_an_evaluation_attack_that_cannot_follow_the_training_norm_is_one_line():
    with pytest.raises(ConfigError) as err:
        load_experiment(QUICK, parse_set(["attack.norm=l2", "attack.eps=1.0"]))
    assert str(err.value).startswith("config error: eval.attacks.0: fgsm attacks in linf only, the training attack in "
                                     "l2: give it its own eps (and norm: linf) or leave it out")
    experiment = load_experiment(QUICK, parse_set(["attack.norm=l2", "attack.eps=1.0", "eval.attacks=null"]))
    assert {(a.norm, a.eps) for a in experiment.final_suite()} == {("l2", 1.0)}


def test_an_error_from_a_flag_names_the_flag_not_the_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_experiment(QUICK, parse_set(["sns.fraction=1.5"]))
    assert str(err.value).endswith("(from --set sns.fraction=1.5)") and "quick.yaml" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_study(TINY, {"study.trials": 0}, {"study.trials": "--trials 0"})
    assert str(err.value) == "config error: study.trials: must be >= 1 (got 0) (from --trials 0)"
    bad = _write(tmp_path, "bad.yaml", {"base": str(QUICK), "train": {"epochs": 0}})
    with pytest.raises(ConfigError, match=r"train.epochs: must be >= 1 \(got 0\) \(in .*bad.yaml\)$"):  # not the flag
        load_experiment(bad, parse_set(["sns.lam=0.3"]))


def test_a_config_of_another_kind_is_one_line_saying_so():
    with pytest.raises(ConfigError) as err:
        load_study(QUICK)
    assert str(err.value) == (f"config error: {QUICK} is an experiment config, not a study config; run it with python "
                              "-m pipelines.train, or give python -m pipelines.study a study config (see configs/)")
    with pytest.raises(ConfigError, match="is a study config, not an experiment config; run it with python -m "
                                          "pipelines.study"):
        load_experiment(TINY)

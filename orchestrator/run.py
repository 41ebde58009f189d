"""The one run path: build, resume, train, evaluate and record one experiment in its MLflow run.

    result = run_experiment(config, tracker, run_id, state=None, on_epoch=save_or_report)

A study trial, `pipelines.train` and the methods analysis all call `run_experiment`; they differ only in
where the MLflow run comes from and what `on_epoch` does with each epoch (a Tune report, a checkpoint
file). The run path:

1. builds data, model and objective through the registries (seeded);
2. resumes from `state` (a Trainer state_dict: a checkpoint, or a shared warm-up to fork from) and logs
   only the epochs its MLflow run does not hold yet, so a resumed or forked run has one complete,
   duplicate-free history;
3. trains; every epoch logs its metrics and a sensitivity table, then hands them to `on_epoch`;
4. after the last epoch, evaluates the final model on the test split with the final attack suite
   (eval/robust_accuracy.parquet, eval/checks.parquet, test/* metrics, the masking flags as a tag),
   measures its sensitivity on test pairs (sensitivity/final_test.parquet) and ends the run FINISHED,
   before `on_epoch` sees that last epoch (Tune may stop a trial at its last report); a confirmation run also
   logs what the evaluation found per test example (confirm/examples.parquet, `per_example`);
5. on any failure, `record_failure` tags the reason and ends the run FAILED (KILLED for Ctrl+C).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
import yaml
from torch import nn

from ns_core.attacks import Attack
from ns_core.cas import cas_heads, cas_layers
from ns_core.data import DatasetSplits, load_dataset
from ns_core.evaluation import RobustnessReport, evaluate_robustness
from ns_core.models import create_model, studied_layers
from ns_core.sensitivity import SensitivityMap, measure_sensitivity
from ns_core.training import Trainer
from ns_core.utils import make_generator, seed_everything
from orchestrator.config.experiment import ExperimentConfig
from orchestrator.record import tags
from orchestrator.record.figures import sensitivity_figure
from orchestrator.record.tracking import Tracker, sibling_params

log = logging.getLogger(__name__)
EXAMPLES_ARTIFACT = "confirm/examples.parquet"  # configuration, seed, example, clean_correct, robust_correct, broken_by
EpochHook = Callable[[dict, Trainer, bool], None]  # (metrics, trainer, final) -> None


@dataclass
class RunResult:
    trainer: Trainer
    report: RobustnessReport | None
    run_id: str


def load_data(config: ExperimentConfig) -> DatasetSplits:
    """The experiment's train / validation / test splits (decoded once per process: warm Ray workers keep them)."""
    d = config.data
    return _load_data(config.dataset, d.root, d.download, d.val_size, d.data_seed, d.train_limit, d.test_limit)


@functools.lru_cache(maxsize=4)
def _load_data(name, root, download, val_size, data_seed, train_limit, test_limit) -> DatasetSplits:
    return load_dataset(name, root=root, download=download, val_size=val_size, data_seed=data_seed,
                        train_limit=train_limit, test_limit=test_limit)


@dataclass
class Preflight:
    """What a run will use, found before it starts: its data, the layers it studies (proposed or given), and a
    CAS run's CAS layers."""

    data: DatasetSplits
    layers: list[str]
    source: str  # "the config's", "the model's" (its default_layers) or "proposed"
    cas_layers: list[str] | None = None  # a CAS run's: the config's cas.layers, else the last studied layer
    cas_source: str | None = None  # "the config's" or "the last studied layer; ..."

    @property
    def proposed(self) -> bool:
        return self.source == "proposed"

    def describe(self) -> str:
        how = "proposed by nslab (set sns.layers to choose)" if self.proposed else self.source
        cas = f"; CAS on {self.cas_layers} ({self.cas_source})" if self.cas_layers is not None else ""
        return (f"data {len(self.data.train)} train / {len(self.data.val)} validation / {len(self.data.test)} test, "
                f"input {tuple(self.data.input_shape)}, {self.data.num_classes} classes; layers {self.layers} ({how})"
                + cas)


def preflight(config: ExperimentConfig) -> Preflight:
    """Everything that can fail before a run starts, each a one-line error before any MLflow run exists: the
    dataset files, the model factory (built and run on a dummy batch), and the layers the objective watches and
    feature_pgd attacks (they exist and run once per forward; proposed when the config and model name none),
    and CAS's layers (cas.layers, else the last studied layer)."""
    data = load_data(config)
    model = create_model(config.model, input_shape=data.input_shape, num_classes=data.num_classes)
    layers = config.objective().watched_layers(model)
    for attack in config.eval.attacks or []:
        if attack.layers:
            studied_layers(model, list(attack.layers))
    source = ("the config's" if config.method == "sns" and config.sns.layers
              else "the model's" if getattr(model, "default_layers", None) else "proposed")
    if config.method != "cas":
        return Preflight(data, list(layers), source)
    cas_source = "the config's" if config.cas.layers else "the last studied layer; set cas.layers to choose"
    return Preflight(data, list(layers), source, cas_layers(model, config.cas.layers), cas_source)


def build_trainer(config: ExperimentConfig, data: DatasetSplits | None = None) -> Trainer:
    """Seed, build the model and objective by name, and return a ready Trainer (its metadata rebuilds the
    model and the experiment from a checkpoint alone)."""
    data = data or load_data(config)
    seed_everything(config.train.seed)  # model initialization draws from the global RNG
    model = create_model(config.model, input_shape=data.input_shape, num_classes=data.num_classes)
    objective = config.objective()
    metadata = {"model": config.model, "dataset": config.dataset, "method": config.method,
                "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                "config": config.model_dump(mode="json")}
    return Trainer(model, objective, data, config.train_config(), metadata=metadata)


def resolved_params(config: ExperimentConfig, trainer: Trainer) -> dict[str, Any]:
    """What this run actually used, and only what applies to it: the objective's own settings (the real
    layers, the base method's parameters only), the optimizer's, the data's and the device's."""
    t = config.train
    params = {"dataset": config.dataset, "model": config.model, **trainer.objective.params(trainer.model),
              "train.epochs": t.epochs, "train.batch_size": t.batch_size, "train.optimizer": t.optimizer,
              "train.lr": t.lr, "train.weight_decay": t.weight_decay, "train.schedule": t.schedule,
              "train.seed": t.seed, "train.device": str(trainer.device), "val_attack": trainer.config.val_attack.label,
              "data.train_size": len(trainer.train_split), "data.val_size": len(trainer.val),
              "data.data_seed": config.data.data_seed, "data.augment": trainer.augment}
    if t.optimizer == "sgd":
        params["train.momentum"] = t.momentum
    if t.schedule == "piecewise":
        params.update({"train.milestones": list(t.milestones), "train.gamma": t.gamma})
    if trainer.amp:
        params["train.amp"] = "bf16"
    return params


def final_suite(config: ExperimentConfig, model: nn.Module, attacks: Sequence[Attack] | None = None) -> list[Attack]:
    """The final attacks (`attacks`, else the experiment's), feature_pgd aimed at the layers the experiment's
    objective watches in `model` (SNS: its sns.layers; other methods: the studied layers), and on a CAS model
    its adaptive attack cas_pgd at every threat model, whatever the suite lists (`with_cas_pgd`). The one place
    feature_pgd's layers are chosen and cas_pgd is added."""
    suite = list(attacks) if attacks is not None else config.final_suite()
    if cas_heads(model) is not None:
        suite = with_cas_pgd(suite)
    if not any(a.name == "feature_pgd" and a.layers is None for a in suite):
        return suite
    watched = tuple(config.objective().watched_layers(model))
    return [a.replace(layers=watched) if a.name == "feature_pgd" and a.layers is None else a for a in suite]


def with_cas_pgd(suite: Sequence[Attack]) -> list[Attack]:
    """`suite` with cas_pgd at each threat model that has none: right after its first pgd with pgd's budget, else
    at the end with 20 steps. CAS's test-time masks hide the cross-entropy's gradient (docs/evaluation.md), so a
    CAS model is not evaluated without the attack on its own loss."""
    covered = {a.threat_model for a in suite if a.name == "cas_pgd"}
    out: list[Attack] = []
    for attack in suite:
        out.append(attack)
        if attack.name == "pgd" and attack.threat_model not in covered:
            out.append(Attack("cas_pgd", attack.eps, norm=attack.norm, steps=attack.steps_used, alpha=attack.alpha,
                              restarts=attack.restarts))
            covered.add(attack.threat_model)
    for norm, eps in dict.fromkeys(a.threat_model for a in suite):
        if (norm, eps) not in covered:
            out.append(Attack("cas_pgd", eps, norm=norm, steps=20))
    if len(out) > len(suite):
        log.info("CAS model: its adaptive attack joins the final suite: %s",
                 ", ".join(a.label for a in out if a.name == "cas_pgd" and a not in suite))
    return out


def evaluate_final(config: ExperimentConfig, trainer: Trainer, data: DatasetSplits, attacks: list[Attack] | None = None,
                   examples: int | None = None) -> RobustnessReport:
    """The final evaluation on the test split (the only place a training run reads it)."""
    suite = final_suite(config, trainer.model, attacks)
    return evaluate_robustness(trainer.model, data.test, suite, seed=config.train.seed,
                               max_examples=examples or config.eval.examples, cascade=config.eval.cascade,
                               check_examples=config.eval.check_examples, num_classes=data.num_classes,
                               progress=bool(config.train.progress))


def final_sensitivity(config: ExperimentConfig, trainer: Trainer, data: DatasetSplits) -> SensitivityMap:
    """The final model's neuron sensitivity on the first test images against the validation attack."""
    x, y = data.test.take(config.eval.sensitivity_examples)
    x, y = x.to(trainer.device), y.to(trainer.device)
    attack, generator = trainer.config.val_attack, make_generator(config.train.seed, trainer.device)
    x_adv = torch.cat([attack(trainer.model, x[s:s + 500], y[s:s + 500], generator) for s in range(0, len(y), 500)])
    return measure_sensitivity(trainer.model, [(x, x_adv)], trainer.layers, metadata=trainer.metadata_for_map())


def sensitivity_metrics(smap: SensitivityMap, prefix: str = "test/") -> dict[str, float]:
    return {f"{prefix}sensitivity_all": smap.mean(), f"{prefix}relative_sensitivity_all": smap.mean(relative=True),
            **{f"{prefix}sensitivity.{k}": v for k, v in smap.layer_means().items()},
            **{f"{prefix}relative_sensitivity.{k}": v for k, v in smap.layer_means(relative=True).items()}}


def record_report(tracker: Tracker, run_id: str, report: RobustnessReport, step: int, prefix: str = "eval") -> None:
    tracker.log_table(run_id, report.to_arrow(), f"{prefix}/robust_accuracy.parquet")
    tracker.log_table(run_id, report.checks_arrow(), f"{prefix}/checks.parquet")
    tracker.log_metrics(run_id, report.metrics(), step=step)
    tracker.set_tags(run_id, {tags.EVAL_FLAGS: ",".join(report.flags) or "none"})


def example_record(examples: pa.Table, labels: Mapping[str, Any]) -> pa.Table:
    """The evaluation's per-example table with the columns that name the run in front (configuration, seed)."""
    for i, (name, value) in enumerate(labels.items()):
        kind = pa.int32() if isinstance(value, int) else pa.string()
        examples = examples.add_column(i, name, pa.array([value] * examples.num_rows, kind))
    return examples


def record_failure(tracker: Tracker, run_id: str, err: BaseException) -> str:
    """Tag why the run failed and end it FAILED (KILLED when the user interrupted it); returns the reason."""
    reason = f"{type(err).__name__}: {' '.join(str(err).split())}"[:5000]
    try:
        tracker.set_tags(run_id, {tags.FAILURE: reason, tags.STATUS: "FAILED"})
        tracker.end_run(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
    except Exception as tracking_error:  # the failure must still reach the caller
        log.warning("could not record the failure of run %s: %s", run_id, tracking_error)
    return reason


def epoch_metrics(metrics: Mapping[str, Any], objective: str | None = None) -> dict[str, float]:
    """An epoch's numbers for MLflow; the epoch itself is the step (an `epoch` metric would be the same for
    every run and crowd the compare view). A study's primary objective is also logged as `objective/<name>`,
    first: MLflow's compare view lists metrics by name and plots the first one a run logged (docs/design.md)."""
    out = {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "epoch"}
    if objective is not None and objective in out:  # first: the compare view plots a run's first-logged metric
        out = {f"objective/{objective.replace('/', '_')}": out[objective], **out}
    return out


def log_epoch(tracker: Tracker, run_id: str, metrics: Mapping[str, Any], trainer: Trainer,
              objective: str | None = None) -> None:
    epoch = int(metrics["epoch"])
    tracker.log_metrics(run_id, epoch_metrics(metrics, objective), step=epoch)
    if trainer.last_sensitivity is not None and epoch == trainer.epoch:
        table = trainer.last_sensitivity.to_arrow(selected=trainer.last_selection)
        meta = {**(table.schema.metadata or {}), b"epoch": str(epoch).encode()}
        tracker.log_table(run_id, table.replace_schema_metadata(meta), f"sensitivity/epoch_{epoch:03d}.parquet")


def run_experiment(config: ExperimentConfig, tracker: Tracker, run_id: str, *, state: dict | None = None,
                   on_epoch: EpochHook | None = None, evaluate: bool = True, until: int | None = None,
                   params: Mapping[str, Any] | None = None, attacks: list[Attack] | None = None,
                   examples: int | None = None, objective: str | None = None,
                   per_example: Mapping[str, Any] | None = None) -> RunResult:
    """Build, resume from `state`, train to `until` (default: every epoch), evaluate on test (when
    `evaluate`), and record it all in `run_id`. Raises what training raises, after recording it.

    `params`: what tells the run apart from its siblings (a study's trials: its arm, searched values and seed;
    the constants are on the parent), logged under compare-view names (record/tracking.py sibling_params: the
    recipe first); None: every resolved setting. The resolved settings always go to config/resolved.yaml.
    `objective`: a metric also logged as objective/<name> every epoch (a study's primary objective).
    `per_example`: the columns that name this run in its per-example table ({"configuration": "sns", "seed": 2}),
    logged as EXAMPLES_ARTIFACT after the final evaluation (a confirmation's); None: no table."""
    try:
        data = load_data(config)
        trainer = build_trainer(config, data)
        if state is not None:
            trainer.load_state_dict(state)
        resolved = resolved_params(config, trainer)
        tracker.log_params(run_id, resolved if params is None else sibling_params(params))
        tracker.log_text(run_id, yaml.safe_dump(resolved, sort_keys=False), "config/resolved.yaml")
        logged = tracker.last_step(run_id)
        for metrics in trainer.history:  # epochs a fork or a resume carries, not yet in this run's record
            if metrics["epoch"] > logged:
                tracker.log_metrics(run_id, epoch_metrics(metrics, objective), step=int(metrics["epoch"]))
        result = RunResult(trainer, None, run_id)

        def each_epoch(metrics: dict, trainer: Trainer) -> None:
            if metrics["epoch"] > logged:
                log_epoch(tracker, run_id, metrics, trainer, objective)
            final = trainer.epoch >= config.train.epochs
            if final and evaluate:
                result.report = evaluate_final(config, trainer, data, attacks, examples)
                record_report(tracker, run_id, result.report, step=trainer.epoch)
                if per_example is not None and result.report.examples is not None:
                    tracker.log_table(run_id, example_record(result.report.examples, per_example), EXAMPLES_ARTIFACT)
                smap = final_sensitivity(config, trainer, data)
                tracker.log_table(run_id, smap.to_arrow(selected=trainer.last_selection),
                                  "sensitivity/final_test.parquet")
                tracker.log_metrics(run_id, sensitivity_metrics(smap), step=trainer.epoch)
                metrics = {**metrics, **result.report.metrics(), **sensitivity_metrics(smap)}
            if final:
                _final_plot(tracker, run_id, trainer)
                tracker.end_run(run_id, "FINISHED")
            if on_epoch is not None:
                on_epoch(metrics, trainer, final)

        trainer.callbacks.append(each_epoch)
        trainer.fit(until)
        return result
    except SystemExit as err:  # Ray Tune ends a trial it stops (ASHA, or after its last report) this way
        if err.code not in (0, None):
            record_failure(tracker, run_id, err)
        raise
    except BaseException as err:
        record_failure(tracker, run_id, err)
        raise


def _final_plot(tracker: Tracker, run_id: str, trainer: Trainer) -> None:
    """The last epoch's sensitivity per layer; the stabilized neurons marked only for a method that selects them
    (SNS): for other methods the table's `selected` column is a probe-set top fraction, not a choice of theirs."""
    if trainer.last_sensitivity is not None:
        figure = sensitivity_figure(trainer.last_sensitivity, trainer.objective.selected_neurons(),
                                    title=f"neuron sensitivity after epoch {trainer.epoch} (validation pairs)")
        tracker.log_figure(run_id, figure, "sensitivity/sensitivity_per_layer.png")

"""Sequential confirmation: each arm's best configuration retrained on fresh seeds, judged on the test split,
with seeds added until the answer is decided.

    confirmation = run_confirmation(study, rows, record, study_dir, resources)
    print(confirmation.text())          # the per-seed table, then one verdict line per comparison

The search chose on validation; this stage is the only one of a study that reads the test split. The method
arm's best configuration (its top `confirm.top_k` by the primary objective, or its Pareto front) and the
baseline arm's best each train again on the first `confirm.seeds` fresh seeds (never the search seed), as Tune
trials nested under the study's parent run, and are evaluated on the whole test split with the final suite.
Per comparison: the paired differences seed by seed (robust and clean), their mean ± std, a 95% interval that
holds wherever the rounds stop and counts the test examples' own variation, a paired-bootstrap probability of
improvement, and a decision, judged look by look (orchestrator/study/sequential.py, decision.py; with several
comparisons, Holm's step-down over them). While a comparison is undecided and fewer than `confirm.max_seeds` seeds
ran, the next round adds fresh seeds, for the configurations of the comparisons still open. The rounds run in one
Tune experiment (`confirm`, warm workers throughout) whose searcher plans each round from the finished ones
(orchestrator/execution/search.py `Rounds`) and is saved with it, so a driver killed between seeds resumes with every
seed it finished and trains none of them twice: the decisions replay from the same results.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ns_core.attacks import Attack
from orchestrator.config.arms import Arm
from orchestrator.config.loader import apply_overrides
from orchestrator.config.study import StudyFile
from orchestrator.execution.phases import TrialLog, exists, phase_trials, run_rounds
from orchestrator.execution.trial_outcome import TrialOutcome
from orchestrator.execution.trial_settings import Record, Role, TrialSettings
from orchestrator.results import Status, count, failure_kind, finite, fmt, pct, points, rows_table, verdict_sentence
from orchestrator.study.decision import Decision, PairedDifference, paired_difference, probability_of_improvement
from orchestrator.study.power import design_line, study_family
from orchestrator.study.sequential import Pairs, confirmation_design, judge, read_examples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Configuration:
    """One configuration the confirmation retrains: an arm's chosen search trial."""

    name: str  # "baseline", "sns", "sns-2" (the method arm's second best), ...
    arm: Arm
    overrides: dict[str, Any]  # the chosen trial's searched values
    search_label: str  # the search trial it came from, e.g. "sns-07"
    replicate: int | None = None  # the search it was chosen by (a replicated study: "r2-sns" of search 2)

    def describe(self) -> str:
        """'sns-07: lam=1.62 fraction=0.483 lr=0.002 schedule=cosine' (the searched values, short names)."""
        values = " ".join(f"{_short(k)}={fmt(v, 3)}" for k, v in self.overrides.items())
        return f"{self.search_label}: {values}" if values else self.search_label


def _short(path: str) -> str:
    return path.removeprefix("sns.").removeprefix("train.").replace("warmup_epochs", "warmup")


@dataclass
class Comparison:
    configuration: Configuration
    baseline: Configuration
    robust: PairedDifference
    clean: PairedDifference
    robust_name: str
    margin: float
    left_out: dict[int, str] = field(default_factory=dict)  # seed -> why it is not in the comparison
    decision: Decision = Decision.UNDECIDED  # judged at each look (sequential.judge); kept from the deciding one
    unit: str = "seed"  # what the differences pair: "search" for a replicated study's verdict (replicates.py)
    searches: int = 1  # how many searches chose the configurations it compares

    def what(self) -> str:
        """'SNS, tuned over 8 trials, vs PGD-AT, tuned over 8 trials' (an untuned baseline says so)."""
        rank = "" if self.configuration.name == self.configuration.arm.name else f" ({self.configuration.name})"
        return f"{self.configuration.arm.describe()}{rank}, vs {self.baseline.arm.describe()}"

    def verdict(self) -> str:
        """The verdict sentence, and what it rests on: one search (the choice a rerun of the search might not
        make again), or every replicate's choices confirmed, one difference per search."""
        if self.unit == "search":
            basis = f"rests on {count(self.searches, 'search')}, each one's choices confirmed on its seeds"
        else:
            basis = "rests on one search (variation between searches not measured)" if self.searches == 1 else ""
        return verdict_sentence(self.what(), self.configuration.arm.title, self.baseline.arm.title, self.robust,
                                self.clean, robust_name=self.robust_name, margin=self.margin, left_out=self.left_out,
                                decision=self.decision, sources=self.unit == "seed", unit=self.unit, basis=basis)

    def summary(self) -> dict[str, Any]:
        low, high = self.robust.ci95
        widths, design = self.robust.half_widths(), self.robust.design
        return {"configuration": self.configuration.name, "baseline": self.baseline.name, "seeds": self.robust.n,
                "robust_diff_mean": self.robust.mean, "robust_diff_std": self.robust.std, "ci95_low": low,
                "ci95_high": high, "half_width_seeds": widths["seeds"],
                "half_width_test_examples": widths.get("test examples"),
                "looks": ",".join(str(n) for n in design.looks) if design else None,
                "boundary": design.boundary if design else None, "holm_family": self.robust.family,
                "alpha_share": self.robust.share, "clean_diff_mean": self.clean.mean, "wins": self.robust.wins,
                "p_improvement": probability_of_improvement(self.robust), "decision": str(self.decision),
                "verdict": self.verdict()}


@dataclass
class Confirmation:
    rows: list[dict[str, Any]]  # one per (configuration, seed)
    comparisons: list[Comparison]
    configurations: list[Configuration]
    seeds: list[int]
    rounds: int
    per_search: list[Comparison] = field(default_factory=list)  # a replicated study: each search's comparisons

    def table(self) -> pa.Table:
        return rows_table(self.rows)

    def decided(self) -> bool:
        return all(c.decision != Decision.UNDECIDED for c in self.comparisons)

    def text(self) -> str:
        """The per-seed table (absolute accuracies and paired differences) and the chosen configurations."""
        lines = [f"{'configuration':<14}{'seed':>5}{'clean %':>9}{'robust %':>10}{'Δ robust':>10}{'Δ clean':>9}"
                 "  status"]
        for r in self.rows:
            lines.append(f"{r['configuration']:<14}{r['seed']:>5}{pct(r.get('test_clean_acc')):>9}"
                         f"{pct(r.get('test_robust_acc')):>10}{_pts(r.get('robust_diff')):>10}"
                         f"{_pts(r.get('clean_diff')):>9}  {r['status']}{_note(r)}")
        lines += ["", "configurations (chosen on validation):"]
        lines += [f"  {c.name:<12} {c.arm.describe()}; {c.describe()}" for c in self.configurations]
        return "\n".join(lines)


def _pts(value) -> str:
    return points(value) if finite(value) else "-"


def _note(row: dict) -> str:
    notes = [n for n in (row.get("failure"), row.get("flags")) if n and n != "none"]
    return f" ({'; '.join(notes)})" if notes else ""


def choose(study: StudyFile, rows: list[dict], pareto: list[bool]) -> list[Configuration]:
    """The control arm's best and every other arm's top_k (or Pareto front), completed trials only, by the
    primary objective on validation; in a replicated study, each search's own (named "r2-sns", ...)."""
    metric, mode = study.study.objectives[0].metric, study.study.objectives[0].mode
    chosen = []
    for replicate in sorted({r.get("replicate") or 1 for r in rows}) if study.study.replicates > 1 else [None]:
        mine = [r for r in rows if replicate is None or r.get("replicate") == replicate]
        front = [on for r, on in zip(rows, pareto, strict=True) if replicate is None or r.get("replicate") == replicate]
        prefix = f"r{replicate}-" if replicate is not None else ""
        for arm in study.arm_list(replicate):
            done = [r for r in mine if r["arm"] == arm.name and r["status"] == Status.COMPLETE
                    and finite(r.get(metric))]
            ranked = sorted(done, key=lambda r: r[metric], reverse=mode == "max")
            is_method = arm.name != study.control_arm
            if is_method and study.confirm.pareto:
                ranked = [r for r, on in zip(mine, front, strict=True) if on and r["arm"] == arm.name]
            for i, row in enumerate(ranked[:study.confirm.top_k if is_method else 1], start=1):
                overrides = {p: row[f"param.{p}"] for p in arm.space if row.get(f"param.{p}") is not None}
                name = f"{prefix}{arm.name}" if i == 1 else f"{prefix}{arm.name}-{i}"
                chosen.append(Configuration(name, arm, overrides, row["label"], replicate))
    return chosen


def run_confirmation(study: StudyFile, rows: list[dict], pareto: list[bool], record: Record, path: str,
                     resources: dict[str, float]) -> Confirmation | None:
    configurations = choose(study, rows, pareto)
    if not any(c.arm.name != study.control_arm for c in configurations):
        log.warning("confirmation skipped: no search trial of the arms compared with %s completed every epoch",
                    study.control_arm)
        return None
    log.info("confirmation of %s on seeds %s (up to %d seeds until decided; test split)",
             ", ".join(f"{c.name} ({c.describe()})" for c in configurations), study.confirm_seeds(),
             study.confirm.max_seeds)
    plan = functools.partial(plan_round, study, configurations, record)
    grid = run_rounds(plan, path, "confirm", resources, limit=study.confirm.max_seeds * len(configurations),
                      concurrency=study.study.concurrency * study.study.replicates,  # as in the search
                      max_failures=study.study.max_failures,
                      callbacks=[TrialLog(record.tracking_uri, record.mlflow_experiment,
                                          ["test/clean_acc", "test/robust_acc"], phase="confirm")])
    results = confirmation_rows(study, [TrialOutcome.of_result(result) for result in grid])
    confirmation = summarize(study, results, configurations, rounds_of(study, len({r["seed"] for r in results}),
                                                                       len(configurations)),
                             read_examples(record, results))
    if study.study.replicates > 1:  # the verdict's unit becomes the search; each search's own comparisons kept
        from orchestrator.study.replicates import across_searches

        confirmation.per_search = confirmation.comparisons
        confirmation.comparisons = across_searches(study, confirmation.per_search)
    return confirmation


def design_summary(study: StudyFile, path: str) -> str:
    """The line a study prints when it starts (power.design_line): what its confirmation design risks and finds,
    at confirm.assumed_spread, or at the spread of the paired differences a resumed study already confirmed."""
    configurations, family = study_family(study)
    spread, where = study.confirm.assumed_spread, "confirm.assumed_spread"
    if exists(path, "confirm"):
        trials, _ = phase_trials(path, "confirm")
        spread, where = observed_spread(study, confirmation_rows(study, [TrialOutcome.of_trial(t) for t in trials])
                                        ) or (spread, where)
    return design_line(confirmation_design(study, configurations), spread, study.confirm.margin, family=family,
                       where=where)


def observed_spread(study: StudyFile, rows: list[dict]) -> tuple[float, str] | None:
    """(the largest standard deviation over seeds of a configuration's robust difference from the control, in
    points; where it came from), or None before two seeds of a comparison finished."""
    control = {(r.get("replicate"), r["seed"]): r["test_robust_acc"] for r in rows
               if r["arm"] == study.control_arm and r["test_robust_acc"] is not None}
    differences: dict[str, list[float]] = {}
    for r in rows:
        key = (r.get("replicate"), r["seed"])  # paired within its search
        if r["arm"] != study.control_arm and r["test_robust_acc"] is not None and key in control:
            differences.setdefault(r["configuration"], []).append(r["test_robust_acc"] - control[key])
    spreads = [(statistics.stdev(d), len(d)) for d in differences.values() if len(d) > 1]
    if not spreads:
        return None
    spread, seeds = max(spreads)
    return 100 * spread, f"the {seeds} seeds already confirmed"


def plan_round(study: StudyFile, configurations: list[Configuration], record: Record,
               outcomes: list[TrialOutcome]) -> list[TrialSettings]:
    """The next round's trials: the first seeds; then, while a comparison is undecided, fresh seeds."""
    running = configurations
    if outcomes:
        rows = confirmation_rows(study, outcomes)
        confirmation = summarize(study, rows, configurations, 0, read_examples(record, rows))
        seeds = next_seeds(study, confirmation)
        open_ = [c for c in confirmation.comparisons if c.decision == Decision.UNDECIDED]
        needed = {c.configuration.name for c in open_} | {c.baseline.name for c in open_}
        running = [conf for conf in configurations if conf.name in needed]  # a decided comparison stays decided
        if seeds:
            log.info("undecided after %s (%s): adding seed(s) %s", count(len(confirmation.seeds), "seed"),
                     "; ".join(f"{c.configuration.name} {points(c.robust.mean)}, " + (
                         f"95% CI {points(c.robust.ci95[0])} to {points(c.robust.ci95[1])}" if c.robust.n > 1
                         else "one seed has no interval")
                         for c in confirmation.comparisons if c.decision == Decision.UNDECIDED), seeds)
    else:
        seeds = study.confirm_seeds()
    suites = {conf.name: confirm_suite(study, conf) for conf in configurations}
    shift = {conf.name: study.confirm.baseline_seed_offset if conf.arm.name == study.control_arm else 0
             for conf in configurations}
    return [TrialSettings(role=Role.CONFIRM, label=f"confirm-{conf.name}-s{seed}", experiment=_experiment(conf),
                          record=record, overrides={**conf.overrides, "train.seed": seed + shift[conf.name]},
                          arm=conf.arm.name, evaluate=True, final_suite=suites[conf.name],
                          examples=study.confirm.examples, configuration=conf.name,
                          objective=study.study.objectives[0].metric, replicate=conf.replicate)
            for seed in seeds for conf in running]


def confirm_suite(study: StudyFile, configuration: Configuration) -> tuple[Attack, ...] | None:
    """The confirmation attacks at the configuration's threat model (the training attack's eps and norm, searched
    or not, wherever an attack sets none of its own); None: the experiment's final suite."""
    if not study.confirm.attacks:
        return None
    experiment = apply_overrides(configuration.arm.experiment, dict(configuration.overrides))
    return tuple(spec.resolve(experiment.attack) for spec in study.confirm.attacks)


def rounds_of(study: StudyFile, seeds: int, configurations: int) -> int:
    """How many rounds ran `seeds` seeds: the first seeds, then the same number added per round."""
    first, per_round = len(study.confirm_seeds()), max(1, study.study.concurrency // configurations)
    return 1 + max(0, math.ceil((seeds - first) / per_round))


def next_seeds(study: StudyFile, confirmation: Confirmation) -> list[int]:
    """The seeds of the next round: none when every comparison is decided, there is nothing to compare, or
    confirm.max_seeds ran; else the next fresh seeds, as many as keep the cluster busy (concurrency over the
    configurations per seed), up to max_seeds."""
    done = len(confirmation.seeds)
    if not confirmation.comparisons or confirmation.decided() or done >= study.confirm.max_seeds:
        return []
    per_round = max(1, study.study.concurrency // len(confirmation.configurations))  # = rounds_of's
    return study.confirm_seeds(min(study.confirm.max_seeds, done + per_round))[done:]


def _experiment(configuration: Configuration) -> dict:
    return configuration.arm.experiment.model_dump(mode="json")


def confirmation_rows(study: StudyFile, outcomes: list[TrialOutcome]) -> list[dict[str, Any]]:
    """The rows of finished trials, each under the seed it is paired by: a control that trained on seed +
    confirm.baseline_seed_offset (an A/A study) stands for seed, its training seed kept as train_seed."""
    rows = [confirmation_row(o) for o in outcomes]
    offset = study.confirm.baseline_seed_offset
    for row in rows:
        if offset and row["arm"] == study.control_arm:
            row["train_seed"], row["seed"] = row["seed"], row["seed"] - offset
    return rows


def confirmation_row(outcome: TrialOutcome) -> dict[str, Any]:
    """One (configuration, seed) of a finished round: the one row the rounds' plan and the summary both read."""
    settings, ok = outcome.settings, outcome.ok
    kind = failure_kind(outcome.error) if outcome.error else None
    flags = outcome.metric("test/flags")
    return {"configuration": settings.configuration, "replicate": settings.replicate or 1, "arm": settings.arm,
            "seed": settings.seed, "label": settings.label, "status": str(outcome.status),
            "failure": (f"failed ({kind})" if kind else "failed") if outcome.error else None,
            "mlflow_run_id": outcome.mlflow_run_id,
            "test_clean_acc": outcome.metric("test/clean_acc"),
            "test_robust_acc": outcome.metric("test/robust_acc"),
            "flags": (f"{int(flags)} masking flag(s)" if flags else "none") if ok else None,
            **outcome.test_metrics()}


def compared_pairs(study: StudyFile, configurations: list[Configuration]) -> list[tuple[Configuration, Configuration]]:
    """(configuration, reference) of every comparison, one family per search: each of an arm's configurations
    against the best configuration of the arm it is compared with (study.comparisons()), chosen by the same
    search."""
    best: dict[tuple, Configuration] = {}  # (search, arm) -> its best configuration (its comparisons' reference)
    for conf in configurations:
        best.setdefault((conf.replicate, conf.arm.name), conf)
    return [(conf, best[(conf.replicate, reference)]) for arm, reference in study.comparisons()
            for conf in configurations if conf.arm.name == arm and (conf.replicate, reference) in best]


def summarize(study: StudyFile, results: list[dict], configurations: list[Configuration], rounds: int,
              examples: dict[str, Any] | None = None) -> Confirmation:
    """The per-seed rows (configuration minus the control, same seed) and each comparison, judged look by look
    from the rounds so far. `examples`: MLflow run id -> its per-example outcomes (sequential.read_examples);
    without them, the intervals cover the seeds only."""
    rows = [dict(r) for r in results]
    order = {conf.name: i for i, conf in enumerate(configurations)}
    rows.sort(key=lambda r: (order.get(r["configuration"], 99), r["seed"]))
    controls: dict[int | None, Configuration] = {}  # search -> its control arm's best configuration
    for conf in configurations:
        if conf.arm.name == study.control_arm:
            controls.setdefault(conf.replicate, conf)
    search_of = {conf.name: conf.replicate for conf in configurations}
    by_seed = {c.name: {r["seed"]: r for r in rows if r["configuration"] == c.name and r["test_robust_acc"] is not None}
               for c in configurations}
    for r in rows:  # the table's Δ columns: each row against its search's control on the same seed
        control = controls.get(search_of.get(r["configuration"]))
        base = by_seed[control.name].get(r["seed"]) if control is not None else None
        if r["configuration"] != getattr(control, "name", None) and base and r["test_robust_acc"] is not None:
            r["robust_diff"] = r["test_robust_acc"] - base["test_robust_acc"]
            r["clean_diff"] = r["test_clean_acc"] - base["test_clean_acc"]
    suite = study.confirm.attacks or study.experiment.final_suite()
    robust_name = "AutoAttack" if any(a.name == "autoattack" for a in suite) else "worst-case robust"
    examples, margin = examples or {}, study.confirm.margin / 100
    outcomes = {c.name: {s: examples.get(r.get("mlflow_run_id")) for s, r in by_seed[c.name].items()}
                for c in configurations}
    compared = compared_pairs(study, configurations)  # one family per search, judged together (Holm over it)
    pairs = [Pairs({s: r["test_robust_acc"] for s, r in by_seed[conf.name].items()},
                   {s: r["test_robust_acc"] for s, r in by_seed[ref.name].items()}, outcomes[conf.name],
                   outcomes[ref.name]) for conf, ref in compared]
    design, planned = confirmation_design(study, len(configurations)), study.confirm_seeds(study.confirm.max_seeds)
    judged: list = [None] * len(compared)
    for search in dict.fromkeys(conf.replicate for conf, _ in compared):
        index = [i for i, (conf, _) in enumerate(compared) if conf.replicate == search]
        for i, verdict in zip(index, judge(design, planned, {r["seed"] for r in rows}, [pairs[i] for i in index],
                                           margin), strict=True):
            judged[i] = verdict
    comparisons = []
    for (conf, ref), (robust, decision) in zip(compared, judged, strict=True):
        mine, theirs = by_seed[conf.name], by_seed[ref.name]
        failed = {r["seed"]: f"the {r['configuration']} run {r['failure'] or 'did not finish'}" for r in rows
                  if r["configuration"] in (ref.name, conf.name) and r["test_robust_acc"] is None}
        clean = paired_difference({s: r["test_clean_acc"] for s, r in mine.items() if s in robust.seeds},
                                  {s: r["test_clean_acc"] for s, r in theirs.items()})  # over the decision's seeds
        comparisons.append(Comparison(conf, ref, robust, clean, robust_name, margin, failed, decision,
                                      searches=study.study.replicates))
    return Confirmation(rows, comparisons, configurations, sorted({r["seed"] for r in rows}), rounds)

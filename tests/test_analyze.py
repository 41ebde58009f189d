"""pipelines.analyze end to end on tiny data: every subcommand's --smoke-test writes Parquet and PNG
files (read back with pyarrow and PIL) and MLflow parent/child runs; bad input is one line, exit 2."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from analyses.methods import paired_differences, summarize
from ns_core.sensitivity import SensitivityMap
from orchestrator.record.tracking import Tracker
from orchestrator.results import rows_table
from pipelines.analyze import main


def uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def run(tmp_path, *argv: str) -> int:
    extra = ["--storage", str(tmp_path / "ray")] if argv[0] == "methods" else []
    return main([*argv, "--out", str(tmp_path / "out"), "--tracking-uri", uri(tmp_path), *extra])


def read_back(out, tables: list[str], plots: list[str]) -> dict[str, pa.Table]:
    for plot in plots:
        with Image.open(out / plot) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 200
    return {name: pq.read_table(out / name) for name in tables}


def report_runs(tmp_path, kind: str):
    tracker = Tracker(uri(tmp_path), "nslab-analysis")
    parents = tracker.find_runs(f"tags.`nslab.analysis` = '{kind}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    return tracker, parents[0], tracker.children(parents[0].info.run_id)


@pytest.mark.slow
def test_methods_smoke_trains_every_method_and_seed_as_tune_trials(local_ray, tmp_path):
    assert run(tmp_path, "methods", "--smoke-test") == 0
    out = tmp_path / "out"
    tables = read_back(out, ["methods/per_seed.parquet", "methods/summary.parquet", "methods/paired_summary.parquet"],
                       ["plots/methods_accuracy.png"])
    per_seed = tables["methods/per_seed.parquet"].to_pylist()
    assert {(r["method"], r["seed"]) for r in per_seed} == {(m, s) for m in ("standard", "pgd_at", "trades", "sns")
                                                           for s in (0, 1)}
    assert all(r["status"] == "COMPLETE" and 0 <= r["robust_acc"] <= r["clean_acc"] <= 1 for r in per_seed)
    paired = tables["methods/paired_summary.parquet"].to_pylist()
    assert {(p["a"], p["b"]) for p in paired} == {("sns", "pgd_at"), ("trades", "pgd_at")}
    tracker, parent, children = report_runs(tmp_path, "methods")
    trainings = [c for c in children if c.data.tags["nslab.role"] == "method"]
    warmups = [c for c in children if c.data.tags["nslab.role"] == "warmup"]
    assert len(trainings) == 8 and all(c.info.status == "FINISHED" for c in children)
    assert len(warmups) == 2  # one shared PGD-AT warm-up per seed, forked by sns and continued by pgd_at
    forked = [c for c in trainings if "nslab.forked_from" in c.data.tags]
    assert sorted(c.data.tags["nslab.label"].split("-")[0] for c in forked) == ["pgd_at", "pgd_at", "sns", "sns"]
    child = trainings[0]
    assert {"eval/robust_accuracy.parquet", "eval/checks.parquet"} <= set(tracker.list_artifacts(child.info.run_id,
                                                                                                 "eval"))
    assert "sensitivity/final_test.parquet" in tracker.list_artifacts(child.info.run_id, "sensitivity")
    assert "plots/methods_accuracy.png" in tracker.list_artifacts(parent.info.run_id, "plots")
    checkpoints = list((out / "checkpoints").rglob("*.pt"))
    assert len(checkpoints) == 8 and all(p.is_absolute() for p in checkpoints)
    assert main(["compare", "--checkpoints", *map(str, sorted(checkpoints)[:2]), "--dry-run"]) == 0


@pytest.mark.slow
def test_compare_smoke_writes_stats_verdict_and_plots(tmp_path):
    assert run(tmp_path, "compare", "--smoke-test") == 0
    out = tmp_path / "out"
    tables = read_back(out, ["compare/layer_stats.parquet", "compare/verdict.parquet", "compare/accuracy.parquet",
                             "standard/sensitivity/own.parquet"],
                       ["plots/sensitivity_distribution_own.png", "plots/sensitivity_means.png"])
    verdict = tables["compare/verdict.parquet"].to_pylist()
    assert {r["layer"] for r in verdict} == {"relu1", "relu2", "relu3", "relu4", "(all)"}
    assert {r["verdict"] for r in verdict if r["model"] == "standard"} == {"reference"}
    assert SensitivityMap.from_arrow(tables["standard/sensitivity/own.parquet"]).layers == [
        "relu1", "relu2", "relu3", "relu4"]
    tracker, parent, children = report_runs(tmp_path, "compare")
    assert sorted(c.info.run_name for c in children) == ["pgd_at", "standard"]


@pytest.mark.slow
def test_stabilize_smoke_writes_curves_and_plots(tmp_path):
    assert run(tmp_path, "stabilize", "--smoke-test", "--layer", "relu3") == 0
    out = tmp_path / "out"
    tables = read_back(out, ["stabilize/curve.parquet", "stabilize/claim2.parquet", "pgd_at/stabilize/summary.parquet"],
                       ["plots/stabilize.png", "pgd_at/plots/stabilize.png"])
    curve = tables["stabilize/curve.parquet"].to_pylist()
    assert {r["selection"] for r in curve} == {"sensitive", "random_all", "random_alive"}
    assert {r["layer"] for r in curve} == {"relu3"}
    full = [r for r in curve if r["fraction"] == 1.0]
    assert full and all(r["accuracy"] == r["clean_accuracy"] for r in full)  # a whole patched layer = benign
    _, _, children = report_runs(tmp_path, "stabilize")
    assert len(children) == 2


def make_study(tmp_path, name: str = "tiny-20260101-000000", trials: int = 6) -> list[str]:
    """A finished study in the orchestrator's MLflow layout, written with Tracker (real MLflow runs):
    parent tagged nslab.study, children with per-epoch metrics and sensitivity/epoch_NNN.parquet."""
    tracker = Tracker(uri(tmp_path), "nslab-tiny")
    parent = tracker.start_run(name, tags={"nslab.study": name, "nslab.kind": "study"})
    names = []
    for i in range(trials):
        child = tracker.start_run(f"trial-{i:05d}", parent_run_id=parent,
                                  tags={"nslab.study": name, "nslab.kind": "trial", "nslab.role": "search"})
        names.append(f"trial-{i:05d}")
        if i == trials - 1:  # collapsed: zero sensitivity, chance accuracy, FAILED
            tracker.log_metrics(child, {"val/clean_acc": 0.1, "val/robust_acc": 0.1, "val/sensitivity_all": 0.0,
                                        "val/relative_sensitivity_all": 0.0}, step=1)
            tracker.set_tags(child, {"nslab.failure_reason": "TrainingCollapsed: clean accuracy sat at chance"})
            tracker.end_run(child, "FAILED")
            continue
        for epoch in (1, 2):
            sigma = 0.1 * (i + 1) / epoch
            tracker.log_metrics(child, {"val/clean_acc": 0.9 - 0.05 * i,
                                        "val/robust_acc": 0.2 + 0.1 * (trials - i) / epoch,
                                        "val/sensitivity_all": sigma, "val/relative_sensitivity_all": sigma * 2},
                                step=epoch)
            g = torch.Generator().manual_seed(i * 10 + epoch)
            values = {"relu1": torch.rand(6, generator=g, dtype=torch.float64) * sigma,
                      "relu3": torch.rand(12, generator=g, dtype=torch.float64) * sigma}
            smap = SensitivityMap(values, {k: v * 2 for k, v in values.items()},
                                  {k: torch.ones_like(v) for k, v in values.items()}, 64)
            tracker.log_table(child, smap.to_arrow(smap.top(0.25)), f"sensitivity/epoch_{epoch:03d}.parquet")
        tracker.end_run(child)
    tracker.end_run(parent)
    return names


def test_study_report_reads_a_study_by_name_prefix(tmp_path, capsys):
    """The worst trial with a map is trial 4: the collapsed trial 5 logged none (its robust accuracy is lowest)."""
    names = make_study(tmp_path)
    assert run(tmp_path, "study", "--name", "tiny", "--study-experiment", "nslab-tiny", "--smoke-test") == 0
    out = tmp_path / "out"
    tables = read_back(out, ["study_report/trials.parquet", "study_report/correlation.parquet"],
                       ["plots/robust_vs_sensitivity.png", "plots/pareto.png", "plots/best_worst_sensitivity.png"])
    trials = tables["study_report/trials.parquet"].to_pylist()
    assert sorted(r["trial"] for r in trials) == names
    rho = {(r["sensitivity"], r["trials"]): r["spearman_rho"]
           for r in tables["study_report/correlation.parquet"].to_pylist()}
    # finished trials: more sensitive -> less robust; the collapsed one (least sensitive, least robust)
    # breaks the pattern: ranks d^2 = 16+4+0+4+16 over n = 6 -> rho = 1 - 6*40/(6*35) = -1/7
    assert rho["sensitivity_all", "finished"] == pytest.approx(-1.0)
    assert rho["sensitivity_all", "all"] == pytest.approx(-1 / 7)
    front = [r["trial"] for r in trials if r["on_front"]]
    assert front and names[-1] not in front
    _, parent, children = report_runs(tmp_path, "study")
    assert sorted(c.info.run_name for c in children) == ["best-trial-00000", "worst-trial-00004"]
    assert "Spearman" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["compare", "--checkpoints", "/nope/a.pt"], "does not exist"),
    (["stabilize", "--checkpoint", "/nope/a.pt"], "does not exist"),
    (["methods", "--config", "/nope/x.yaml"], "does not exist"),
    (["compare", "--checkpoints", "{tmp}"], "is a directory"),
    (["study", "--name", "no-such-study"], "no study named 'no-such-study'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert run(tmp_path, *[a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "error:" in err and "\n" not in err and message in err and "Traceback" not in err


def test_bad_config_key_and_unknown_layer_name_the_valid_choices(tmp_path, capsys, checkpoint):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethods: [{label: a, method: standard}]\nexperiment: {train: {epochz: 3}}\n")
    assert run(tmp_path, "methods", "--config", str(bad), "--dry-run") == 2
    err = capsys.readouterr().err.strip()
    assert "experiment.train.epochz: unknown key" in err and "did you mean 'epochs'" in err and "\n" not in err
    bad.write_text("name: x\nmethods: [{label: a, method: sns, sns: {lamda: 3}}]\n")
    assert run(tmp_path, "methods", "--config", str(bad), "--dry-run") == 2
    err = capsys.readouterr().err.strip()
    assert "methods.0.sns.lamda: unknown key" in err and "lambda" in err
    capsys.readouterr()
    assert run(tmp_path, "stabilize", "--checkpoint", str(checkpoint), "--layer", "relu9", "--dry-run") == 2
    err = capsys.readouterr().err.strip()
    assert "unknown layer 'relu9'" in err and "relu3" in err and "\n" not in err


def test_dry_runs_check_inputs_and_start_nothing(tmp_path, capsys):
    assert run(tmp_path, "methods", "--dry-run") == 0
    assert "12 trainings" in capsys.readouterr().out
    assert run(tmp_path, "study", "--name", "x", "--dry-run") == 0
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()


def test_paired_differences_and_summary_leave_failed_seeds_out():
    rows = [{"method": m, "seed": s, "status": "COMPLETE", "clean_acc": c, "robust_acc": r, "sensitivity_all": 1.0,
             "relative_sensitivity_all": 1.0}
            for m, s, c, r in (("a", 0, 0.9, 0.5), ("a", 1, 0.8, 0.6), ("b", 0, 0.95, 0.4), ("b", 1, 0.9, 0.5))]
    rows.append({"method": "a", "seed": 2, "status": "FAILED", "error": "TrainingCollapsed"})
    per_seed, summary = paired_differences(rows, [("a", "b")])
    robust = next(p for p in summary if p["metric"] == "robust_acc")
    assert robust["seeds"] == 2 and robust["mean"] == pytest.approx(0.1) and robust["std"] == pytest.approx(0.0)
    assert robust["a_higher"] == 2 and len([p for p in per_seed if p["metric"] == "robust_acc"]) == 2
    means = {r["method"]: r for r in summarize(rows, ["a", "b"])}
    assert means["a"]["seeds_ok"] == 2 and means["a"]["seeds_failed"] == 1
    assert means["a"]["clean_acc_mean"] == pytest.approx(0.85)
    assert math.isclose(means["b"]["robust_acc_std"], 0.0707, abs_tol=1e-4)
    table = rows_table(rows[::-1])  # a failed seed first keeps every metric column
    assert {"clean_acc", "robust_acc", "error"} <= set(table.column_names) and table.num_rows == 5

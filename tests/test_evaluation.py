"""evaluate_robustness: rows, worst case, Arrow schema, sanity checks; AttackSpec validation."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ns_core.evaluation import (
    DEFAULT_SUITE_MNIST,
    AttackSpec,
    clean_accuracy,
    default_suite,
    evaluate_robustness,
    parse_attack_suite,
    sanity_large_eps,
)

EXPECTED_SCHEMA = pa.schema([
    ("attack", pa.string()), ("norm", pa.string()), ("eps", pa.float64()), ("steps", pa.int32()),
    ("restarts", pa.int32()), ("n", pa.int64()), ("correct", pa.int64()), ("accuracy", pa.float64()),
    ("seconds", pa.float64()),
])


@pytest.fixture(scope="module")
def digits():
    """(trained MLP in eval mode, test loader of 397 8x8 digits in batches of 128)."""
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.int64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(100):
            optimizer.zero_grad()
            F.cross_entropy(model(x[:1400]), y[:1400]).backward()
            optimizer.step()
    return model.eval(), DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=128)


SUITE = [AttackSpec("fgsm", 0.1), AttackSpec("pgd", 0.1), AttackSpec("pgd", 0.0), AttackSpec("mim", 0.1),
         AttackSpec("cw_linf", 0.1, steps=10), AttackSpec("pgd", 1.0, norm="l2", restarts=2)]


@pytest.fixture(scope="module")
def report(digits):
    model, loader = digits
    return evaluate_robustness(model, loader, SUITE, "cpu", seed=0)


def test_rows_clean_first_worst_case_last(digits, report):
    model, loader = digits
    rows = report.rows
    assert [r["attack"] for r in rows] == ["clean", "fgsm", "pgd", "pgd", "mim", "cw_linf", "pgd", "worst_case"]
    assert all(r["n"] == 397 and r["accuracy"] == r["correct"] / 397 for r in rows)
    assert report.clean_accuracy == pytest.approx(clean_accuracy(model, loader, "cpu"))
    assert report.clean_accuracy > 0.85
    assert rows[3]["correct"] == rows[0]["correct"]  # pgd at eps 0 is the clean accuracy
    attacked = [r["correct"] for r in rows[1:-1] if r["eps"] > 0]
    assert rows[-1]["correct"] <= min(attacked) < rows[0]["correct"]
    assert rows[-1]["norm"] == "mixed" and rows[-1]["eps"] == 1.0
    assert rows[6]["steps"] == 10 and rows[6]["restarts"] == 2 and rows[1]["steps"] == 1


def test_sanity_checks_pass_on_a_sound_suite(report):
    assert report.sanity == {"eps0_equals_clean": True, "robust_le_clean": True, "pgd_le_fgsm": True}
    assert report.sanity_passed and "worst_case" in report.summary()


def test_arrow_table_has_the_design_schema(report, tmp_path):
    table = report.to_arrow()
    assert table.schema.equals(EXPECTED_SCHEMA, check_metadata=False)
    assert table.num_rows == len(report.rows)
    assert json.loads(table.schema.metadata[b"sanity"])["checks"] == report.sanity
    pq.write_table(table, tmp_path / "robust_accuracy.parquet")
    back = pq.read_table(tmp_path / "robust_accuracy.parquet")
    assert back.schema.equals(EXPECTED_SCHEMA, check_metadata=False)
    assert back.column("accuracy").to_pylist() == [r["accuracy"] for r in report.rows]


def test_eps0_check_runs_without_an_eps0_attack_and_max_examples(digits):
    model, loader = digits
    report = evaluate_robustness(model, loader, [AttackSpec("fgsm", 0.1)], "cpu", max_examples=150)
    assert [r["n"] for r in report.rows] == [150, 150, 150]
    assert report.sanity["eps0_equals_clean"] is True and "pgd_le_fgsm" not in report.sanity


def test_a_weak_pgd_fails_the_pgd_le_fgsm_check(digits):
    model, loader = digits
    weak = AttackSpec("pgd", 0.1, steps=1, alpha=1e-4)  # a random start and no real step: ~noise
    report = evaluate_robustness(model, loader, [AttackSpec("fgsm", 0.1), weak], "cpu")
    assert report.sanity["pgd_le_fgsm"] is False and not report.sanity_passed
    assert "pgd-linf-eps0.1-s1-r1" in report.messages["pgd_le_fgsm"]


def test_sanity_large_eps(digits):
    model, loader = digits
    passed, message = sanity_large_eps(model, loader, "cpu", max_examples=200)
    assert passed, message

    class GradientMasked(nn.Module):  # same predictions, zero input gradient: PGD only gets its random start
        def forward(self, x):
            return model(x.detach().round() + 0 * x)

    passed, message = sanity_large_eps(GradientMasked(), loader, "cpu", eps=0.2, max_examples=200)
    assert not passed, message


def test_attack_spec_validation_and_labels():
    assert AttackSpec("pgd", 0.3, steps=20).label == "pgd-linf-eps0.3-s20-r1"
    assert AttackSpec("fgsm", 0.3).steps == 1 and AttackSpec("pgd", 0.3).steps == 10
    assert AttackSpec("cw_linf", 0.3).params() == {"eps": 0.3, "steps": 30, "restarts": 1}
    assert default_suite(0.3) == DEFAULT_SUITE_MNIST
    assert [s.name for s in DEFAULT_SUITE_MNIST] == ["fgsm", "pgd", "mim", "cw_linf"]
    assert parse_attack_suite([{"name": "pgd", "eps": 0.2, "norm": "l2"}]) == [AttackSpec("pgd", 0.2, norm="l2")]
    with pytest.raises(ValueError, match="unknown attack 'pgdd'.*Did you mean 'pgd'"):
        AttackSpec("pgdd", 0.3)
    for bad in ({"name": "fgsm", "eps": 0.3, "norm": "l2"}, {"name": "fgsm", "eps": 0.3, "restarts": 2},
                {"name": "mim", "eps": -1.0}, {"name": "pgd", "eps": 0.3, "norm": "l1"},
                {"name": "pgd", "eps": 0.3, "epsilon": 0.3}):
        with pytest.raises(ValueError):
            parse_attack_suite([bad])

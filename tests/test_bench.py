"""bench/: the harness runs a benchmark in its tiny mode and writes the documented JSON (behaviour, not speed)."""

import json

import pytest
import torch

from bench.__main__ import main
from bench.harness import (
    CASE_KEYS,
    RATIO_KEYS,
    RESULT_KEYS,
    VARIANT_KEYS,
    Context,
    format_table,
    interleave,
    make_case,
    result,
)


def test_interleave_warms_up_then_rotates_the_order():
    calls = []
    variants = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = interleave(variants, reps=3, warmup=1, device=torch.device("cpu"))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_ratio_is_the_median_of_paired_ratios_and_checks_its_target():
    times = {"ours": [1.0, 2.0, 9.0], "base": [1.0, 2.0, 3.0]}  # paired ratios 1, 1, 3
    case = make_case("c", times, ratios={"ours/base": ("ours", "base", 1.05), "ref": ("base", "ours", None)})
    assert case["ratios"]["ours/base"]["value"] == 1.0 and case["ratios"]["ours/base"]["passed"] is True
    assert case["ratios"]["ref"]["passed"] is None
    assert case["variants"]["ours"]["median_s"] == 2.0
    doc = result(Context(torch.device("cpu"), "tiny"), "x", "d", [case])
    assert doc["passed"] is True
    failing = make_case("c", times, ratios={"ours/base": ("ours", "base", 0.5)})
    assert result(Context(torch.device("cpu"), "tiny"), "x", "d", [failing])["passed"] is False


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="quick"):
        Context(torch.device("cpu"), "fast")


@pytest.mark.slow
def test_tiny_run_writes_valid_json_with_the_documented_keys(tmp_path, capsys):
    pytest.importorskip("torchattacks")
    assert main(["--tiny", "--only", "attack_throughput", "--device", "cpu", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "attack_throughput.json").read_text())
    assert set(RESULT_KEYS) <= set(doc)
    assert doc["name"] == "attack_throughput" and doc["device"] == "cpu" and doc["threads"] == 1
    assert doc["mode"] == "tiny" and doc["reps"] >= 2
    assert {"cpu", "cores", "torch", "cuda_build", "git_commit"} <= set(doc["machine"])
    assert [c["params"]["model"] for c in doc["cases"]] == ["lenet5", "resnet18"]
    for case in doc["cases"]:
        assert set(CASE_KEYS) <= set(case)
        assert {"ours", "torchattacks", "bare"} <= set(case["variants"])
        for variant in case["variants"].values():
            assert set(VARIANT_KEYS) <= set(variant)
            assert len(variant["times_s"]) == doc["reps"] and variant["median_s"] > 0
        for ratio in case["ratios"].values():
            assert set(RATIO_KEYS) <= set(ratio) and ratio["value"] > 0
        assert case["ratios"]["ours/bare"]["target"] == 1.05
        assert isinstance(case["ratios"]["ours/bare"]["passed"], bool)
    targets = [r["passed"] for c in doc["cases"] for r in c["ratios"].values() if r["target"] is not None]
    assert doc["passed"] is all(targets)  # the document's verdict is its ratios' verdicts
    printed = capsys.readouterr().out
    assert format_table([doc]).splitlines()[2] in printed  # the table printed is the one in the file

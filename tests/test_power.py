"""`nslab power`: a study design's operating characteristics from its config, as a table or JSON, before
anything trains; the numbers come from playing the design through the confirmation's decision."""

import json

import pytest
from conftest import REPO

from pipelines import cli, power

QUICK = str(REPO / "configs" / "study" / "quick.yaml")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = power.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_gives_each_verdict_and_the_expected_seeds_for_one_effect(capsys):
    code, out, _ = run(capsys, "--config", QUICK, "--effect", "0", "--spread", "1.2", "--json", "--smoke-test")
    result = json.loads(out)
    assert code == 0 and {"beats", "loses", "equivalent", "undecided", "expected_seeds"} <= set(result)
    assert result["beats"] + result["loses"] + result["equivalent"] + result["undecided"] == pytest.approx(1.0)
    assert result["beats"] <= 0.025 + 0.011 and result["loses"] <= 0.025 + 0.011  # 2,000 paths: 3 errors
    assert result["looks"] == [3, 4, 5, 6] and 3 <= result["expected_seeds"] <= 6
    code, out, _ = run(capsys, "--config", QUICK, "--effect", "3", "--spread", "1.2", "--json", "--smoke-test")
    assert json.loads(out)["beats"] >= 0.8


def test_the_default_table_covers_effects_0_to_3_and_says_what_effect_0_means(capsys):
    code, out, _ = run(capsys, "--config", QUICK, "--smoke-test", "--set", "confirm.max_seeds=8")
    assert code == 0 and "looks at 3, 4, 5, 6, 7, 8 seeds" in out and "confirm.assumed_spread" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:3] in ("0.0", "0.5", "1.0", "2.0", "3.0")]
    assert [float(r[0]) for r in rows] == [0.0, 0.5, 1.0, 2.0, 3.0]
    beats = [float(r[1]) for r in rows]
    assert beats == sorted(beats)  # power grows with the effect
    assert "effect 0 gives the false-verdict rates" in out


def test_dry_run_help_and_mistakes_are_one_line(capsys):
    code, out, _ = run(capsys, "--config", QUICK, "--dry-run")
    assert code == 0 and "dry run" in out and "O'Brien-Fleming" in out
    with pytest.raises(SystemExit) as bad:
        power.main(["--config", QUICK, "--spread", "-1"])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and err.count("\n") == 1 and "--spread" in err
    code, _, err = run(capsys, "--config", QUICK, "--set", "confirm.boundary=wald")
    assert code == 2 and "confirm.boundary" in err and err.count("\n") == 1
    assert "power" in cli.COMMANDS
    with pytest.raises(SystemExit) as done:
        power.main(["--help"])
    assert done.value.code == 0 and "Holm" in capsys.readouterr().out

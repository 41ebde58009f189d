"""The sequential rule's error rates, measured by playing designs through the decision the confirmation calls:
false "beats" and "loses" at most 2.5% each wherever it stops and at any spread (with the test examples' own
variation in the interval too), the demo's power, Holm's step-down over a family, the test-example variance
component, and the interval the verdict prints agreeing with the decision. Seeded and vectorized: seconds."""

import json
import math

import numpy as np
import pytest
from conftest import REPO

from orchestrator.config.study import load_study
from orchestrator.study.decision import (
    Decision,
    decide,
    example_variance,
    holm,
    paired_difference,
    rule,
    seeds_needed,
)
from orchestrator.study.design import Design
from orchestrator.study.power import simulate
from orchestrator.study.sequential import Pairs, confirmation_design, judge

PATHS = 20_000
ALPHA = 0.025
TOLERANCE = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / PATHS)  # 2.5% plus three Monte Carlo standard errors


@pytest.fixture(scope="module")
def demo():
    study = load_study(REPO / "configs" / "study" / "quick.yaml")
    return study, confirmation_design(study, configurations=2)


def test_the_demo_design_is_its_schedule(demo):
    study, design = demo
    assert design.looks == (3, 4, 5, 6) and design.boundary == study.confirm.boundary
    levels = design.levels()
    assert all(0 < a < ALPHA for a in levels) and list(levels) == sorted(levels)  # OBF: strict early looks
    assert design.critical(3, look=0) > design.critical(6, look=3) > Design.fixed(6).critical(6)


@pytest.mark.parametrize("spread", [0.5, 1.2, 3.0])
def test_no_effect_gives_false_beats_and_loses_at_most_alpha_at_any_spread(demo, spread):
    study, design = demo
    oc = simulate(design, 0.0, spread, study.confirm.margin, paths=PATHS, seed=11)
    assert oc.beats <= TOLERANCE and oc.loses <= TOLERANCE, oc
    assert oc.expected_seeds <= design.looks[-1]


def test_the_old_rule_stopping_at_the_first_student_t_interval_that_excludes_0_does_not(demo):
    study, design = demo
    naive = [Design.fixed(n) for n in design.looks]  # a 95% t interval at every look: optional stopping
    rng = np.random.default_rng(0)
    d = rng.standard_normal((PATHS, design.looks[-1]))
    beats = np.zeros(PATHS, dtype=bool)
    for one in naive:
        n = one.looks[0]
        x = d[:, :n]
        beats |= rule(x.mean(1), x.std(1, ddof=1) / math.sqrt(n), one.critical(n), 1e-9) == 0
    assert beats.mean() > 0.045  # about 5.6% (docs/design.md): what the sequential boundary prevents


@pytest.mark.parametrize("test_se", [0.1, 0.3, 0.6, 1.5])
def test_the_test_examples_variation_inside_the_interval_keeps_the_seed_calibrated_boundary_valid(demo, test_se):
    study, design = demo
    for boundary in ("obrien_fleming", "pocock"):
        shaped = Design(design.looks, boundary=boundary)
        oc = simulate(shaped, 0.0, 1.0, 1e-9, test_se=test_se, paths=PATHS, seed=5)
        assert oc.beats <= TOLERANCE and oc.loses <= TOLERANCE, (boundary, oc)


def test_the_demo_finds_a_3_point_effect_at_a_1_2_point_spread_within_its_max_seeds(demo):
    study, design = demo
    oc = simulate(design, 3.0, 1.2, study.confirm.margin, paths=PATHS, seed=3)
    assert oc.beats >= 0.8 and oc.loses == 0 and oc.expected_seeds <= study.confirm.max_seeds, oc


def test_equivalence_is_two_one_sided_tests_at_the_same_boundary(demo):
    study, design = demo
    at_margin = simulate(design, study.confirm.margin, 0.3, study.confirm.margin, paths=PATHS, seed=7)
    assert at_margin.equivalent <= TOLERANCE  # a true difference of one margin: "equivalent" is a false verdict
    inside = simulate(design, 0.0, 0.3, study.confirm.margin, paths=PATHS, seed=7)
    assert inside.equivalent > 0.5


def test_the_printed_interval_excludes_0_exactly_when_the_verdict_says_beats_or_loses():
    rng = np.random.default_rng(1)
    design = Design((3, 4, 5, 6))
    for _ in range(200):
        n = int(rng.integers(2, 7))
        values = rng.normal(rng.normal(0, 0.02), 0.015, n)
        diff = paired_difference(dict(enumerate(values)), dict.fromkeys(range(n), 0.0)).with_(
            design=design, example_variance=float(rng.uniform(0, 2e-5)), examples=1000)
        low, high = diff.ci95
        assert (decide(diff, 0.01) in (Decision.BEATS, Decision.LOSES)) == (low > 0 or high < 0)
        assert holm([diff], 0.01)[0][0] == decide(diff, 0.01)  # one comparison: Holm is the rule itself


def test_the_interval_adds_each_source_and_names_its_width():
    diff = paired_difference({1: 0.03, 2: 0.01, 3: 0.02}, {1: 0.0, 2: 0.0, 3: 0.0})
    seeds_only = diff.with_(design=Design((3, 4, 5, 6)))
    both = seeds_only.with_(example_variance=0.004 ** 2, examples=1000)
    widths = both.half_widths()
    assert set(seeds_only.half_widths()) == {"seeds"} and set(widths) == {"seeds", "test examples"}
    half = (both.ci95[1] - both.ci95[0]) / 2
    assert math.hypot(widths["seeds"], widths["test examples"]) == pytest.approx(half)
    assert both.se > seeds_only.se and both.df > seeds_only.df  # the examples' part is nearly known


def test_example_variance_finds_the_test_examples_component_and_not_the_seeds():
    rng = np.random.default_rng(0)
    seeds, examples = 6, 4000
    per_example = rng.normal(0, 0.3, examples)  # a_i: the examples where the two models differ for real
    d = per_example[None, :] + rng.normal(0, 0.05, (seeds, 1)) + rng.normal(0, 0.5, (seeds, examples))
    assert example_variance(d) == pytest.approx(0.3 ** 2 / examples, rel=0.15)
    same = rng.normal(0, 0.05, (seeds, 1)) + rng.normal(0, 0.5, (seeds, examples))  # no example effect
    assert example_variance(same) < 0.3 * 0.3 ** 2 / examples
    assert example_variance(d[:1]) is None


def test_holm_steps_down_over_a_family_and_keeps_earlier_decisions():
    design = Design((3, 4, 5, 6))

    def comparison(mean, spread=0.01):  # six seeds, at the last look: se = 0.29 x spread
        values = mean + spread * np.array([-1, -0.5, 0, 0, 0.5, 1])
        return paired_difference(dict(enumerate(values)), dict.fromkeys(range(6), 0.0)).with_(design=design, look=3)

    strong, middling, none = comparison(0.05), comparison(0.0127), comparison(0.0, 0.02)  # t = 17, 4.4, 0
    judged = holm([strong, middling, none], margin=0.001)
    assert [d for d, _ in judged] == [Decision.BEATS, Decision.BEATS, Decision.UNDECIDED]
    assert judged[0][1] == pytest.approx(1 / 3) and judged[1][1] == pytest.approx(1 / 2)  # alpha/3, then alpha/2
    alone_at_a_third = middling.with_(share=1 / 3, family=3)
    assert decide(alone_at_a_third, 0.001) == Decision.UNDECIDED  # Bonferroni alone would not have decided it
    kept = holm([strong, middling, none], margin=0.001, settled=[Decision.BEATS, None, None])
    assert kept[0][0] == Decision.BEATS and kept[1] == (Decision.BEATS, pytest.approx(1 / 2))


def test_a_decision_is_kept_from_the_look_that_took_it():
    design = Design((2, 3, 4))
    pairs = Pairs({1: 0.55, 2: 0.55, 3: 0.40, 4: 0.40}, {1: 0.50, 2: 0.50, 3: 0.50, 4: 0.50})
    pairs.mine[2] = 0.5501  # two near-identical seeds decide at the first look
    ((diff, decision),) = judge(design, [1, 2, 3, 4], {1, 2, 3, 4}, [pairs], margin=0.001)
    assert decision == Decision.BEATS and diff.seeds == (1, 2) and diff.look == 0  # later seeds never reopen it
    ((early, undecided),) = judge(design, [1, 2, 3, 4], {1}, [pairs], margin=0.001)
    assert undecided == Decision.UNDECIDED and early.n == 1  # before the first look: nothing decided


def test_seeds_needed_continues_the_design():
    d = paired_difference({1: 0.02, 2: -0.01, 3: 0.03}, {1: 0.0, 2: 0.0, 3: 0.0})
    fixed, sequential = seeds_needed(d), seeds_needed(d.with_(design=Design((3, 4, 5, 6))))
    assert fixed is not None and sequential is not None and sequential >= fixed  # repeated looks cost seeds
    floor = d.with_(design=Design((3, 4, 5, 6)), example_variance=0.02 ** 2, examples=1000)
    assert seeds_needed(floor) is None  # the test split's own variation alone covers the effect


def test_a_design_calibrated_once_is_read_back_from_disk_and_a_corrupt_cache_is_recomputed(tmp_path, monkeypatch):
    from orchestrator.study import design as design_module

    monkeypatch.setenv("NSLAB_CACHE", str(tmp_path))
    args = ((2, 3, 4), 0.0125, "obrien_fleming", 20_000, 7)
    design_module.nominal_levels.cache_clear()
    computed = design_module.nominal_levels(*args)
    (saved,) = (tmp_path / "designs").glob("*.json")
    design_module.nominal_levels.cache_clear()
    monkeypatch.setattr(design_module, "_calibrate", lambda *a: pytest.fail("calibrated again despite the cache"))
    assert design_module.nominal_levels(*args) == computed  # from disk, bit for bit
    monkeypatch.undo()
    monkeypatch.setenv("NSLAB_CACHE", str(tmp_path))
    saved.write_text("{not json")
    design_module.nominal_levels.cache_clear()
    assert design_module.nominal_levels(*args) == computed  # recomputed, and the file rewritten whole
    assert json.loads(saved.read_text())["levels"] == list(computed)
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    monkeypatch.setenv("NSLAB_CACHE", str(tmp_path / "blocked"))
    design_module.nominal_levels.cache_clear()
    assert design_module.nominal_levels(*args) == computed  # an unwritable cache is only slower
    design_module.nominal_levels.cache_clear()

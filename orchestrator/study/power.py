"""A confirmation design's operating characteristics before anything trains: how often each verdict comes out,
and after how many seeds, for a true effect and a seed-to-seed spread (`nslab power`).

    design = confirmation_design(study, 2)                       # the study's looks (orchestrator/study/sequential.py)
    oc = simulate(design, effect=2.0, spread=1.2, margin=1.0)    # points; seeded Monte Carlo
    oc.beats, oc.loses, oc.equivalent, oc.undecided, oc.expected_seeds
    table(design, spread=1.2, margin=1.0)                        # effects 0, 0.5, 1, 2, 3 (0: the false-verdict rates)

Each simulated confirmation draws its seeds' paired differences from a normal distribution (mean: the effect,
standard deviation: the spread), plus, with `test_se`, one test-split error shared by all its seeds (the test
examples' variation, which the seeds' spread cannot see; its variance estimated from `examples` examples), and
plays the design's looks through `rule`, the decision the confirmation calls (orchestrator/study/decision.py):
it stops at the first look that decides, or is undecided after the last. In a family of comparisons (top_k > 1,
a Pareto front) each is judged at Holm's first share, alpha / comparisons: a lower bound on its power.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from orchestrator.study.decision import DECISIONS, UNDECIDED, Decision, effective_df, rule
from orchestrator.study.design import Design

EFFECTS = (0.0, 0.5, 1.0, 2.0, 3.0)  # points: the default table (0 gives the false-verdict rates)
PATHS = 20_000  # simulated confirmations per effect: a rate near 2.5% has a Monte Carlo error of about 0.1%


@dataclass(frozen=True)
class OperatingCharacteristics:
    effect: float  # points
    spread: float  # points: the standard deviation of one seed's paired difference
    beats: float  # fractions of the simulated confirmations
    loses: float
    equivalent: float
    undecided: float
    expected_seeds: float
    paths: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def error(self, rate: float) -> float:
        """The Monte Carlo standard error of a rate estimated from this many paths."""
        return float(np.sqrt(rate * (1 - rate) / self.paths))


def simulate(design: Design, effect: float, spread: float, margin: float, *, test_se: float = 0.0,
             examples: int = 1000, family: int = 1, paths: int = PATHS, seed: int = 0) -> OperatingCharacteristics:
    """Play `paths` confirmations of `design` through the decision rule (effect, spread, margin, test_se in points)."""
    if spread <= 0 or test_se < 0 or paths < 1:
        raise ValueError(f"need spread > 0, test_se >= 0 and paths >= 1 (got {spread}, {test_se}, {paths})")
    rng = np.random.default_rng(seed)
    most = design.looks[-1]
    d = effect + spread * rng.standard_normal((paths, most))  # each path's seeds, in points
    variance = np.zeros(paths)
    if test_se > 0:  # one test split per confirmation: its error is shared by every seed; its variance estimated
        d += test_se * rng.standard_normal(paths)[:, None]
        variance = test_se ** 2 * rng.chisquare(max(examples - 1, 1), paths) / max(examples - 1, 1)
    total, squares = np.cumsum(d, axis=1), np.cumsum(d * d, axis=1)
    outcome = np.full(paths, UNDECIDED)
    seeds = np.full(paths, float(most))
    open_ = np.ones(paths, dtype=bool)
    for k, n in enumerate(design.looks):
        if n < 2:
            continue
        mean = total[:, n - 1] / n
        var = np.maximum(squares[:, n - 1] - n * mean * mean, 0.0) / (n - 1)
        df = effective_df(n, var / n, variance, examples)
        codes = rule(mean, np.sqrt(var / n + variance), design.critical(n, look=k, share=1 / family, df=df), margin)
        now = open_ & (codes != UNDECIDED)
        outcome[now], seeds[now] = codes[now], n
        open_ &= ~now
    share = {d: float(np.mean(outcome == i)) for i, d in enumerate(DECISIONS)}
    return OperatingCharacteristics(effect, spread, share[Decision.BEATS], share[Decision.LOSES],
                                    share[Decision.EQUIVALENT], share[Decision.UNDECIDED], float(seeds.mean()), paths)


def study_family(study) -> tuple[int, int]:
    """(configurations a study's confirmation retrains, comparisons it judges together), known before its search:
    each compared arm's top_k (a Pareto front counted as top_k) and the control's best."""
    per_arm = {arm.name: 1 if arm.name == study.control_arm else study.confirm.top_k for arm in study.arm_list()}
    return sum(per_arm.values()), max(1, sum(per_arm[arm] for arm, _ in study.comparisons()))


def table(design: Design, spread: float, margin: float, effects: tuple[float, ...] = EFFECTS,
          **kwargs) -> list[OperatingCharacteristics]:
    """simulate() at each effect (the same seed, so the rows differ only by the effect)."""
    return [simulate(design, effect, spread, margin, **kwargs) for effect in effects]


def text(rows: list[OperatingCharacteristics]) -> str:
    """The operating characteristics as an aligned table (the rates as fractions)."""
    lines = [f"{'effect':>7}{'beats':>8}{'loses':>8}{'equivalent':>12}{'undecided':>11}{'seeds':>7}"]
    lines += [f"{r.effect:>7.1f}{r.beats:>8.3f}{r.loses:>8.3f}{r.equivalent:>12.3f}{r.undecided:>11.3f}"
              f"{r.expected_seeds:>7.1f}" for r in rows]
    return "\n".join(lines)


def design_line(design: Design, spread: float, margin: float, effect: float = 2.0, family: int = 1,
                where: str = "confirm.assumed_spread") -> str:
    """The one line a study prints when it starts: 'this design: false "beats" at most 2.5%; a 2-point effect at
    a 1.2-point spread is found with 0.89 power after about 4.5 seeds (spread from confirm.assumed_spread)'."""
    oc = simulate(design, effect, spread, margin, family=family, paths=5_000)
    shape = "O'Brien-Fleming-type" if design.boundary == "obrien_fleming" else "Pocock"
    looks = ", ".join(str(n) for n in design.looks)
    return (f"this design (looks at {looks} seeds, {shape} boundary): false 'beats' at most {100 * design.alpha:g}%"
            f"{f' (Holm over {family} comparisons)' if family > 1 else ''}; a {effect:g}-point effect at a "
            f"{spread:.1f}-point spread is found with {oc.beats:.2f} power after about {oc.expected_seeds:.1f} seeds "
            f"(spread from {where})")

"""A study's search space: one searched parameter (`ParamSpec`: a number range or a categorical choice, as Optuna
takes it), which paths an arm reads (a method's own block belongs to the methods that take it, the recipe to all),
and the check that validates an experiment at every combination of the space's edges before anything trains.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.config import ConfigError
from orchestrator.config.experiment import ExperimentConfig
from orchestrator.config.loader import Strict, apply_overrides

MAX_COMBINATIONS = 256  # edge combinations checked at load time (a seeded sample beyond this)


class ParamSpec(Strict):
    """One searched parameter: float/int in [low, high] (optionally log-scaled) or a categorical choice."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter needs a non-empty `choices` list and no low/high")
            return self
        if self.low is None or self.high is None or self.choices is not None:
            raise ValueError(f"a {self.type} parameter needs `low` and `high` (and no choices)")
        if not self.low < self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError(f"log scale needs low > 0 and no step (got low={self.low})")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"an int parameter needs integer bounds (got {self.low}, {self.high})")
        return self

    def optuna_choices(self) -> list:
        """Choices as Optuna takes them (None/bool/int/float/str): lists and dicts become JSON strings."""
        return [self.encode(c) for c in self.choices or []]

    def encode(self, value: Any) -> Any:
        return json.dumps(value) if isinstance(value, list | dict) else value

    def decode(self, value: Any) -> Any:
        """An Optuna value back to the config value (a JSON-encoded choice back to its list)."""
        if self.type == "categorical":
            encoded = self.optuna_choices()
            return self.choices[encoded.index(value)] if value in encoded else value
        return int(value) if self.type == "int" else float(value)

    def values(self) -> list:
        """Every value an int or categorical parameter can take; the edges of a float one."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        return [self.low, self.high]

    def edges(self) -> list:
        """The values that test a combination: a categorical's choices, the bounds of a number."""
        return list(self.choices) if self.type == "categorical" else [self.decode(self.low), self.decode(self.high)]


METHOD_BLOCKS = ("sns", "trades", "mart", "cas")  # a method's own knobs; every other block is the shared recipe


def reads_path(experiment: ExperimentConfig, path: str) -> bool:
    """Whether training `experiment` reads the search-space `path`: the recipe always, a method's own block only
    for the methods that take it (SNS reads its base's block: `trades.beta` for SNS on TRADES)."""
    block = path.split(".", 1)[0]
    if block not in METHOD_BLOCKS:
        return True
    if experiment.method == "sns":
        return block == "sns" or block == experiment.sns.base
    return block == experiment.method


def check_combinations(experiment: ExperimentConfig, space: dict[str, ParamSpec], where: str) -> int:
    """Validate the experiment at every combination of the space's edges (float and int bounds, every
    categorical choice); beyond MAX_COMBINATIONS a seeded sample of them. Returns how many were checked."""
    paths = list(space)
    grid = [space[p].edges() for p in paths]
    total = 1
    for values in grid:
        total *= len(values)
    combos = itertools.product(*grid)
    if total > MAX_COMBINATIONS:
        rng = random.Random(0)
        combos = [tuple(rng.choice(values) for values in grid) for _ in range(MAX_COMBINATIONS)]
    checked = 0
    for combo in combos:
        check_override(experiment, dict(zip(paths, combo, strict=True)), where)
        checked += 1
    return checked


def check_override(experiment: ExperimentConfig, values: dict[str, Any], where: str) -> None:
    """Raise a one-line ValueError naming `where` when `values` ({path: value}) make `experiment` invalid."""
    try:
        apply_overrides(experiment, values)
    except ConfigError as err:
        shown = ", ".join(f"{p}={v!r}" for p, v in values.items())
        raise ValueError(f"{where}: {shown} is not valid: {str(err).removeprefix('config error: ')}") from None

"""The arms of a study: `ArmSpec` as a study file writes one (`arms:` entries), `Arm` as a study runs one (its
method, experiment, searched paths and trial count), and the titles tables and verdicts call them by.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from orchestrator.config.experiment import ExperimentConfig
from orchestrator.config.loader import Strict
from orchestrator.config.search_space import ParamSpec
from orchestrator.results import count


class ArmSpec(Strict):
    """One arm of a shootout: its name (a column, a tag, a colour), its method and, for SNS, its base."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    method: str
    base: str | None = None  # sns only: the base loss it regularizes (pgd_at, fast_at, trades)
    tune: bool = True  # false: one untuned trial of the experiment's recipe (verdicts say so)


@dataclass(frozen=True)
class Arm:
    """One side of the comparison: a method, the paths it searches and its trial count (`tuned` False: one
    fixed trial of the experiment's recipe)."""

    name: str  # "baseline", or the study's method ("sns"), or an `arms:` entry's name
    method: str
    experiment: ExperimentConfig
    space: dict[str, ParamSpec]
    trials: int
    tuned: bool
    name_base: bool = False  # an SNS arm's title names its base even when it is PGD-AT (a shootout's arms)

    @property
    def title(self) -> str:
        """'PGD-AT', 'SNS', 'SNS on TRADES' (an SNS arm names its base when it is not PGD-AT, or in a shootout)."""
        name = method_title(self.method)
        base = self.experiment.sns.base
        named = self.method == "sns" and (base != "pgd_at" or self.name_base)
        return f"{name} on {method_title(base)}" if named else name

    def describe(self) -> str:
        """'SNS, tuned over 16 trials' / 'an untuned PGD-AT baseline'."""
        return (f"{self.title}, tuned over {count(self.trials, 'trial')}" if self.tuned
                else f"an untuned {self.title} baseline")


def method_title(method: str) -> str:
    """'pgd_at' -> 'PGD-AT', 'sns' -> 'SNS', 'trades' -> 'TRADES'."""
    return method.upper().replace("_", "-")

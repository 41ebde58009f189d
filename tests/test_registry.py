"""Registries: every bad name is a one-line ValueError listing the valid names and the closest match."""

import pytest

from ns_core.attacks import ATTACKS, run_attack
from ns_core.data import DATASETS, load_dataset
from ns_core.models import MODELS, create_model
from ns_core.objectives import OBJECTIVES, create_objective
from ns_core.registry import Registry

BAD_NAMES = [
    (lambda: load_dataset("mnist5"), DATASETS, "mnist5k"),
    (lambda: create_model("lenet", (1, 28, 28), 10), MODELS, "lenet5"),
    (lambda: run_attack("pgdd", None, None, None), ATTACKS, "pgd"),
    (lambda: create_objective("trade"), OBJECTIVES, "trades"),
]


@pytest.mark.parametrize(("call", "registry", "closest"), BAD_NAMES, ids=["dataset", "model", "attack", "method"])
def test_unknown_name_is_one_line_with_choices_and_closest_match(call, registry, closest):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    assert f"unknown {registry.kind}" in message
    assert all(name in message for name in registry.names())
    assert f"Did you mean {closest!r}" in message


def test_duplicate_registration_is_refused():
    registry = Registry("thing")
    registry.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(lambda: 2)
    assert registry.names() == ["a"] and registry.create("a") == 1 and "a" in registry

"""Registries: every bad name is a one-line ValueError listing the valid names and the closest match;
models and datasets may be named by import path (a researcher's own code, tests/user_models.py)."""

import pytest

from ns_core.attacks import ATTACKS, Attack
from ns_core.data import DATASETS, load_dataset
from ns_core.models import MODELS, create_model
from ns_core.objectives import OBJECTIVES, create_objective
from ns_core.registry import Registry

BAD_NAMES = [
    (lambda: load_dataset("mnist5"), DATASETS, "mnist5k"),
    (lambda: create_model("lenet", (1, 28, 28), 10), MODELS, "lenet5"),
    (lambda: Attack("pgdd", 0.1), ATTACKS, "pgd"),
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


def test_models_and_datasets_by_import_path():
    model = create_model("user_models:tiny_mlp", (1, 4, 4), 4)
    assert type(model).__name__ == "TinyMLP" and model.default_layers == ["act1"]
    data = load_dataset("user_models:blobs")
    assert data.input_shape == (1, 4, 4) and data.num_classes == 4
    assert (len(data.train), len(data.val), len(data.test)) == (320, 80, 200)


@pytest.mark.parametrize(("path", "match"), [
    ("user_models:tiny_mpl", "has no function 'tiny_mpl'; did you mean user_models:tiny_mlp"),
    ("no_such_package.nets:build", "cannot import module 'no_such_package.nets'"),
    ("torch.nn:Flatten", "the factory must take \\(input_shape, num_classes\\)"),
    ("torch.nn:Identity", r"returned \(2, 1, 4, 4\) for a batch of 2 inputs .* must return \(batch, num_classes\)"),
])
def test_a_wrong_import_path_is_one_line(path, match):
    with pytest.raises(ValueError, match=match) as info:
        create_model(path, (1, 4, 4), 4)
    assert "\n" not in str(info.value)

"""Name -> factory registries for datasets, models, attacks and objectives.

Configs name things ("lenet5", "pgd", "sns"); a registry turns a name into the function that builds
it, and a wrong name into a one-line error that lists the known names and the closest match.

    MODELS = Registry("model")

    @MODELS.register("lenet5")
    def lenet5(input_shape, num_classes): ...

    model = MODELS.create("lenet5", input_shape=(1, 28, 28), num_classes=10)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """A mapping from names to factories of one kind (dataset, model, attack, objective)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator recording `name -> factory`; a duplicate name is a programming error."""

        def decorator(factory: F) -> F:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered under `name`; a ValueError naming the valid choices otherwise."""
        try:
            return self._factories[name]
        except KeyError:
            raise ValueError(self.unknown_message(name)) from None

    def create(self, name: str, **params: Any) -> Any:
        """Call the factory registered under `name` with `params`."""
        return self.get(name)(**params)

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}.{hint}"

    def __contains__(self, name: object) -> bool:
        return name in self._factories

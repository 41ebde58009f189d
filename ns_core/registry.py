"""Name -> factory registries for datasets, models, attacks and objectives; import paths too.

Configs name things ("lenet5", "pgd", "sns"); a registry turns a name into the function that builds
it, and a wrong name into a one-line error that lists the known names and the closest match. Models
and datasets may also be named by import path, `package.module:function`, so researchers study
their own networks and data without editing nslab (the factory takes the built-ins' arguments):

    MODELS = Registry("model", import_paths=True)

    @MODELS.register("lenet5")
    def lenet5(input_shape, num_classes): ...

    model = MODELS.create("lenet5", input_shape=(1, 28, 28), num_classes=10)
    model = MODELS.create("mypkg.nets:build_net", input_shape=(1, 28, 28), num_classes=10)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def is_import_path(name: str) -> bool:
    """'pkg.module:function' (a colon between a dotted module and an attribute)."""
    module, sep, attribute = str(name).partition(":")
    return bool(sep and module and attribute)


class Registry:
    """A mapping from names to factories of one kind (dataset, model, attack, objective)."""

    def __init__(self, kind: str, import_paths: bool = False) -> None:
        self.kind = kind
        self.import_paths = import_paths
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
        """The factory registered under `name` (or found at its import path); a one-line ValueError naming
        the valid choices otherwise."""
        if name in self._factories:
            return self._factories[name]
        if self.import_paths and is_import_path(name):
            return self._import(name)
        raise ValueError(self.unknown_message(name))

    def create(self, name: str, **params: Any) -> Any:
        """Call the factory registered under `name` with `params`; a factory that does not take them is a
        one-line error naming the contract."""
        factory = self.get(name)
        try:
            inspect.signature(factory).bind(**params)
        except TypeError as err:
            raise ValueError(f"{self.kind} {name!r}: the factory must take ({', '.join(params)}) as keyword arguments "
                             f"({err})") from None
        except ValueError:  # a builtin without a signature: let the call itself decide
            pass
        return factory(**params)

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        path = " or an import path package.module:function" if self.import_paths else ""
        return f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}{path}.{hint}"

    def _import(self, path: str) -> Callable[..., Any]:
        module_name, _, attribute = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"{self.kind} {path!r}: cannot import module {module_name!r} ({err}); check the "
                             "spelling and that its folder is on PYTHONPATH") from None
        factory = getattr(module, attribute, None)
        if not callable(factory):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            close = difflib.get_close_matches(attribute, public, n=1)
            hint = f"; did you mean {module_name}:{close[0]}?" if close else ""
            raise ValueError(f"{self.kind} {path!r}: module {module_name!r} has no function {attribute!r}{hint}")
        return factory

    def __contains__(self, name: object) -> bool:
        return name in self._factories

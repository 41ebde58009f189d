"""The one config system: a strict pydantic base, one YAML loader (`base:` inheritance, `--set` overrides),
one error style. Every YAML nslab reads (experiments, studies, analyses) goes through here.

    config = load_config("configs/experiment/quick.yaml", ExperimentConfig, {"sns.lam": 0.3})
    config = apply_overrides(config, parse_set(["train.epochs=2"]))

A file may start from another with `base: other.yaml` (a path relative to it; the file's own keys are
deep-merged over the base's); any nested mapping may do the same (a study's `experiment: {base: ...}`).
A `base` whose value is not a .yaml/.yml path is an ordinary field (`sns: {base: pgd_at}`).
Every mistake is a `ConfigError`, a ValueError whose message is one line naming the field path and the
fix, e.g. `config error: study.trials: must be >= 1 (got -3) (in configs/study/x.yaml)`. Dotted paths
(`sns.lam`, alias `sns.lambda`; `train.lr`) name leaf fields and are checked against the model (paths.py).
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ns_core.registry import Registry
from orchestrator.config import ConfigError
from orchestrator.config.paths import block_fields, nested_block, path_parts, set_parts

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """The base of every config model: unknown keys are errors, fields answer to their name and alias."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, allow_inf_nan=False)


def registered(registry: Registry, name: str) -> str:
    """`name` if the registry knows it (or can import it); its one-line error with the closest match otherwise."""
    registry.get(name)
    return name


# ---- reading YAML ------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping with every `base:` resolved (relative to the file that names it)."""
    path = Path(path)
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"config error: config file {path} {where}; see configs/ for examples")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config error: {path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return _resolve_bases(data, path.parent)


def _resolve_bases(data: dict, directory: Path) -> dict:
    data = {k: _resolve_bases(v, directory) if isinstance(v, dict) else v for k, v in data.items()}
    if not str(data.get("base", "")).endswith((".yaml", ".yml")):  # `sns: {base: pgd_at}` is a field, not a file
        return data
    base = read_yaml((directory / str(data.pop("base"))).resolve())
    return deep_merge(base, data)


def deep_merge(base: dict, top: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


KINDS: dict[type, tuple[str, str]] = {}  # config class -> (what it is, the command that runs it)


def config_kind(what: str, command: str):
    """Register a top-level config class, so a file of another kind given to it is one clear line."""
    def decorator(cls: type[M]) -> type[M]:
        KINDS[cls] = (what, command)
        return cls
    return decorator


def load_config(path: str | Path, cls: type[M], overrides: dict[str, Any] | None = None,
                origins: dict[str, str] | None = None) -> M:
    """Read, merge and validate a YAML file as `cls`; `overrides` ({dotted path: value}) go on top and get the
    same checks. An error in an overridden field names where it came from: `origins` maps a path to the flag
    that set it (default `--set PATH=VALUE`)."""
    data = read_yaml(path)
    _check_kind(data, cls, path)
    given = {}
    for dotted, value in (overrides or {}).items():
        flag = (origins or {}).get(dotted) or f"--set {dotted}={_shown(value)}"
        parts = path_parts(cls, dotted, flag=flag)
        full = ".".join(p.name for p in parts)
        set_parts(data, parts, _number(full, value))
        given[full] = flag
    return validate(cls, data, source=str(path), origins=given)


def validate(cls: type[M], data: Any, source: str | None = None, origins: dict[str, str] | None = None) -> M:
    """`cls.model_validate(data)` with every error as one ConfigError line; an error in a field that `origins`
    names ({dotted path: '--set sns.lam=inf'}) says it came from there instead of from `source`."""
    data = _fractions(data)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        parts, froms = [], []
        for e in err.errors():
            parts.append(_format_error(e, cls))
            # a model-wide check names its field at the start of its message ("search_space.sns.lam: ...")
            loc = ".".join(str(p) for p in e["loc"]) or re.match(r"[\w.]*", parts[-1]).group().rstrip(".")
            froms.append(_origin(loc, origins or {}))
        raise ConfigError(f"config error: {'; '.join(parts)}{_where(source, froms, origins)}") from None
    except ValueError as err:
        raise ConfigError(f"config error: {' '.join(str(err).split())}{_where(source, [None], origins)}") from None


def _origin(loc: str, origins: dict[str, str]) -> str | None:
    """The flag that set the field at `loc` (or a field inside it, or the block around it)."""
    for path, flag in origins.items():
        if loc and (loc == path or path.startswith(f"{loc}.") or loc.startswith(f"{path}.")):
            return flag
    return None


def _where(source: str | None, froms: list[str | None], origins: dict[str, str] | None) -> str:
    """Where the bad values came from: the flags that set them, the file, or both."""
    flags = list(dict.fromkeys(f for f in froms if f))
    if flags and all(froms):
        return f" (from {', '.join(flags)})"
    if not source:
        return f" (from {', '.join(flags)})" if flags else ""
    return f" (in {source}{' and from ' + ', '.join(flags) if flags else ''})"


def _shown(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _number(path: str, value: Any) -> Any:
    """An eps given as a fraction ('8/255', as the threat-model guard suggests) is that number."""
    if path.split(".")[-1] == "eps" and isinstance(value, str):
        from ns_core.attacks import parse_eps

        try:
            return parse_eps(value, path)
        except ValueError as err:
            raise ConfigError(f"config error: {err}") from None
    return value


def _fractions(data: Any) -> Any:
    """Every `eps: 8/255` in a config tree read as the number it names."""
    if isinstance(data, dict):
        return {k: _number(str(k), _fractions(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [_fractions(v) for v in data]
    return data


def _check_kind(data: dict, cls: type, path: str | Path) -> None:
    """A file of another config kind (a study given to the train pipeline, or the reverse) is one line saying
    so and naming the command that runs it, instead of an unknown-key error per top-level block."""
    import orchestrator.config.analysis  # noqa: F401  (each module registers its kind when imported)
    import orchestrator.config.study  # noqa: F401

    if cls not in KINDS:
        return
    fields = set(block_fields(cls)) | {alias for alias, _ in block_fields(cls).values() if alias} | {"base"}
    if set(data) <= fields:
        return
    for other, (what, command) in KINDS.items():
        other_fields = set(block_fields(other)) | {"base"}
        if other is not cls and set(data) <= other_fields:
            expected = KINDS[cls][0]
            raise ConfigError(f"config error: {path} is {what}, not {expected}; run it with {command}, or give "
                              f"{KINDS[cls][1]} {expected} (see configs/)")


# ---- overrides ---------------------------------------------------------------------------------------------


def apply_overrides(config: M, overrides: dict[str, Any], source: str | None = None) -> M:
    """A copy of `config` with dotted-path fields set to new values, validated again."""
    data = config.model_dump(mode="json", exclude_unset=False)
    for dotted, value in overrides.items():
        parts = path_parts(type(config), dotted, source)
        set_parts(data, parts, _number(".".join(p.name for p in parts), value))
    return validate(type(config), data, source)


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """['sns.lam=0.3', 'train.epochs=2'] -> {'sns.lam': 0.3, 'train.epochs': 2} (values read as YAML)."""
    overrides = {}
    for item in items:
        path, sep, value = item.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"config error: --set {item!r}: write PATH=VALUE, e.g. --set sns.lam=0.3")
        try:
            overrides[path.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"config error: --set {item!r}: the value is not valid YAML") from None
    return overrides


def settings_text(model: BaseModel) -> str:
    """The resolved settings as YAML (for --dry-run and the MLflow run)."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False, width=120)


# ---- one-line errors ---------------------------------------------------------------------------------------


def _format_error(e: dict, root: type[BaseModel]) -> str:
    loc = ".".join(str(part) for part in e["loc"])
    kind, ctx, given = e["type"], e.get("ctx", {}), e.get("input")
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        valid = _fields_at(root, e["loc"][:-1])
        close = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{loc}: unknown key {e['loc'][-1]!r}; valid keys: {', '.join(valid)}{hint}"
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{loc}: must be {bounds[kind]} {limit} (got {given!r})"
    if kind == "finite_number":
        return f"{loc}: must be a finite number (got {given!r})"
    if kind == "literal_error":
        return f"{loc}: must be one of: {ctx.get('expected')} (got {given!r})"
    if kind in ("missing", "missing_argument"):
        return f"{loc}: required field is missing; add it"
    if kind == "string_pattern_mismatch":
        return f"{loc}: {given!r} must match {ctx.get('pattern')}"
    message = re.sub(r"^(Value error|Assertion failed), ", "", e["msg"])
    message = " ".join(message.replace("Input should be", "must be").split())
    shown = "" if kind in ("value_error", "assertion_error") else f" (got {given!r})"
    return f"{loc}: {message}{shown}" if loc else f"{message}{shown}"


def _fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the model (or dataclass) found by walking `loc` from `root` (list and dict
    indexes are skipped)."""
    cls: Any = root
    for part in loc:
        fields = block_fields(cls)
        name = next((n for n, (alias, _) in fields.items() if part in (n, alias)), None)
        if name is None:
            continue
        annotation = fields[name][1]
        nested = [b for c in (annotation, *getattr(annotation, "__args__", ())) if (b := nested_block(c))]
        if nested:
            cls = nested[0]
    return [alias or n for n, (alias, _) in block_fields(cls).items()]

"""The one config system: a strict pydantic base, one YAML loader (`base:` inheritance, `--set` overrides),
one error style. Every YAML nslab reads (experiments, studies, analyses) goes through here.

    config = load_config("configs/experiment/quick.yaml", ExperimentConfig, {"sns.lam": 0.3})
    config = apply_overrides(config, parse_set(["train.epochs=2"]))

A file may start from another with `base: other.yaml` (a path relative to it; the file's own keys are
deep-merged over the base's); any nested mapping may do the same (a study's `experiment: {base: ...}`).
A `base` whose value is not a .yaml/.yml path is an ordinary field (`sns: {base: pgd_at}`).
Every mistake is a `ConfigError`, a ValueError whose message is one line naming the field path and the
fix, e.g. `config error: study.trials: must be >= 1 (got -3) (in configs/study/x.yaml)`. Dotted paths
(`sns.lam`, alias `sns.lambda`; `train.lr`) name leaf fields and are checked against the model.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ns_core.registry import Registry

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config mistake; str() is one line starting with 'config error:'."""


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
        parts = _path_parts(cls, dotted, flag=flag)
        full = ".".join(p.name for p in parts)
        _set_parts(data, parts, _number(full, value))
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
    fields = set(_block_fields(cls)) | {alias for alias, _ in _block_fields(cls).values() if alias} | {"base"}
    if set(data) <= fields:
        return
    for other, (what, command) in KINDS.items():
        other_fields = set(_block_fields(other)) | {"base"}
        if other is not cls and set(data) <= other_fields:
            expected = KINDS[cls][0]
            raise ConfigError(f"config error: {path} is {what}, not {expected}; run it with {command}, or give "
                              f"{KINDS[cls][1]} {expected} (see configs/)")


# ---- dotted paths and overrides ------------------------------------------------------------------------


def canonical_path(cls: type, path: str, source: str | None = None, flag: str | None = None) -> str:
    """'sns.lambda' -> 'sns.lam'; a path that names no leaf field is a ConfigError naming the valid ones and
    where the path came from: the flag that gave it (`flag`, e.g. '--set sns.lamm=1'), else the file (`source`).
    A mapping field's key is part of the path: 'search_space.sns.lam.high' is the `high` of the entry `sns.lam`."""
    return ".".join(p.name for p in _path_parts(cls, path, source, flag))


class _Part(NamedTuple):
    """One step of a dotted path into config data: a field name, or a mapping's key (`key` says how to match
    an existing key of the data: its canonical form)."""

    name: str
    key: Callable[[str], str] | None = None


def _path_parts(cls: type, path: str, source: str | None = None, flag: str | None = None) -> list[_Part]:
    where_from = f" (from {flag})" if flag else f" (in {source})" if source else ""
    parts: list[_Part] = []
    block: type | None = cls
    segments = path.split(".")
    i = 0
    while i < len(segments):
        segment, fields = segments[i], _block_fields(block)
        name = next((n for n, (alias, _) in fields.items() if segment in (n, alias)), None)
        if name is None:
            where = ".".join(p.name for p in parts) or "the top level"
            names = [f"{n} (alias {alias})" if alias else n for n, (alias, _) in fields.items()]
            close = difflib.get_close_matches(segment, list(fields), n=1)
            hint = f"; did you mean {'.'.join([*(p.name for p in parts), close[0]])!r}?" if close else ""
            if not parts and not close:  # a path of a block given from the top ('sns.lam' for a study)
                inside = [f"{n}.{path}" for n, (_, a) in fields.items() if _resolves(_nested_block(a), path)]
                hint = f"; did you mean {inside[0]!r}?" if inside else ""
            raise ConfigError(f"config error: {path!r} is not a field; {where} has: {', '.join(names)}{hint}"
                              f"{where_from}")
        parts.append(_Part(name))
        i += 1
        entry = _mapping_value(fields[name][1])
        if entry is not None:  # the rest is one of its keys, then (maybe) a field of that entry
            if i == len(segments):
                raise ConfigError(f"config error: {path!r} is a mapping; name one of its entries, e.g. "
                                  f"{path}.KEY (or a field of one: {path}.KEY.{next(iter(_block_fields(entry)))})"
                                  f"{where_from}")
            canon = _key_canonicalizer(block, name, where_from)
            key, rest = _split_key(segments[i:], entry, path, where_from)
            parts.append(_Part(canon(key), canon))
            block, segments, i = entry, rest, 0
            continue
        block = _nested_block(fields[name][1])
        last = i == len(segments)
        if block is not None and last and not _is_dataclass(block):
            raise ConfigError(f"config error: {path!r} is a block; name one of its fields: "
                              f"{', '.join(f'{path}.{f}' for f in _block_fields(block))}")
        if block is None and not last:
            raise ConfigError(f"config error: {'.'.join(p.name for p in parts)} has no sub-fields (path {path!r})")
    return parts


def _resolves(block: type | None, path: str) -> bool:
    try:
        return block is not None and bool(_path_parts(block, path))
    except ConfigError:
        return False


def _mapping_value(annotation: Any) -> type | None:
    """The model a `dict[str, Model]` field maps its keys to (search_space: ParamSpec), else None."""
    if typing.get_origin(annotation) is dict:
        value = typing.get_args(annotation)[1]
        return value if isinstance(value, type) and issubclass(value, BaseModel) else None
    return None


def _key_canonicalizer(owner: type, field: str, where_from: str) -> Callable[[str], str]:
    """How the model `owner` names the keys of its mapping `field` (its `mapping_keys`; a ConfigError names
    the flag), else the key as given."""
    rule = getattr(owner, "mapping_keys", {}).get(field)
    if rule is None:
        return lambda key: key

    def canon(key: str) -> str:
        try:
            return rule(key)
        except ConfigError as err:
            raise ConfigError(f"config error: {field}: {str(err).removeprefix('config error: ')}{where_from}") from None

    return canon


def _split_key(rest: list[str], entry: type, path: str, where_from: str) -> tuple[str, list[str]]:
    """A mapping key that may hold dots ('sns.lam'), and the path inside its entry that follows ('high'): the
    shortest key after which the rest names a field of the entry; the whole rest is the key otherwise."""
    fields = _block_fields(entry)
    for k in range(1, len(rest)):
        if rest[k] in fields and (len(rest) == k + 1 or _nested_block(fields[rest[k]][1]) is not None):
            return ".".join(rest[:k]), rest[k:]
    close = difflib.get_close_matches(rest[-1], list(fields), n=1)
    if len(rest) > 1 and close:
        fixed = ".".join([*path.split(".")[:-1], close[0]])
        raise ConfigError(f"config error: {path!r} is not a field; an entry has: {', '.join(fields)}; did you mean "
                          f"{fixed!r}?{where_from}")
    return ".".join(rest), []


def _is_dataclass(cls: type) -> bool:
    return hasattr(cls, "__dataclass_fields__")


def _block_fields(cls: type) -> dict[str, tuple[str | None, Any]]:
    """name -> (alias, annotation) of a pydantic model or a dataclass (a leaf value, such as an Attack)."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return {n: (f.alias, f.annotation) for n, f in cls.model_fields.items()}
    return {n: (None, f.type) for n, f in getattr(cls, "__dataclass_fields__", {}).items()}


def _nested_block(annotation: Any) -> type | None:
    """The model or dataclass a field holds (through `X | None`), or None for a plain value."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and (issubclass(candidate, BaseModel) or _is_dataclass(candidate)):
            return candidate
    return None


def _set_parts(data: dict, parts: list[_Part], value: Any) -> None:
    """Set the value at `parts` in config data (blocks made as needed); a mapping's key matches an existing
    key of the same canonical form ('sns.lambda' in the YAML is the entry 'sns.lam'), and a mapping entry set
    to null is removed."""
    for i, part in enumerate(parts):
        name = part.name
        if part.key is not None:
            name = next((k for k in data if isinstance(k, str) and _same_key(part.key, k, part.name)), name)
        if i == len(parts) - 1:
            if part.key is not None and value is None:
                data.pop(name, None)
            else:
                data[name] = value
            return
        if not isinstance(data.get(name), dict):
            data[name] = {}
        data = data[name]


def _same_key(canon: Callable[[str], str], key: str, wanted: str) -> bool:
    try:
        return canon(key) == wanted
    except ConfigError:  # a bad key already in the file: validation names it
        return False


def apply_overrides(config: M, overrides: dict[str, Any], source: str | None = None) -> M:
    """A copy of `config` with dotted-path fields set to new values, validated again."""
    data = config.model_dump(mode="json", exclude_unset=False)
    for dotted, value in overrides.items():
        parts = _path_parts(type(config), dotted, source)
        _set_parts(data, parts, _number(".".join(p.name for p in parts), value))
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
        fields = _block_fields(cls)
        name = next((n for n, (alias, _) in fields.items() if part in (n, alias)), None)
        if name is None:
            continue
        annotation = fields[name][1]
        nested = [b for c in (annotation, *getattr(annotation, "__args__", ())) if (b := _nested_block(c))]
        if nested:
            cls = nested[0]
    return [alias or n for n, (alias, _) in _block_fields(cls).items()]

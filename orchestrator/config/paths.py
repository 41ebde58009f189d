"""Dotted paths into a config: how `sns.lam` (alias `sns.lambda`), `train.lr` or a mapping entry's field
(`search_space.sns.lam.high`: the `high` of the entry `sns.lam`) name a field of a config model, checked against
the model, and how a value is set there in config data. Used by the loader's `--set` overrides and by everything
that names a field by path; a path that names nothing is a ConfigError naming the valid fields and where the path
came from (the flag, else the file).

    canonical_path(StudyFile, "experiment.sns.lambda")   # 'experiment.sns.lam'
    set_parts(data, path_parts(StudyFile, "study.trials"), 8)
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Callable
from typing import Any, NamedTuple

from pydantic import BaseModel

from orchestrator.config import ConfigError


def canonical_path(cls: type, path: str, source: str | None = None, flag: str | None = None) -> str:
    """'sns.lambda' -> 'sns.lam'; a path that names no leaf field is a ConfigError naming the valid ones and
    where the path came from: the flag that gave it (`flag`, e.g. '--set sns.lamm=1'), else the file (`source`).
    A mapping field's key is part of the path: 'search_space.sns.lam.high' is the `high` of the entry `sns.lam`."""
    return ".".join(p.name for p in path_parts(cls, path, source, flag))


class Part(NamedTuple):
    """One step of a dotted path into config data: a field name, or a mapping's key (`key` says how to match
    an existing key of the data: its canonical form)."""

    name: str
    key: Callable[[str], str] | None = None


def path_parts(cls: type, path: str, source: str | None = None, flag: str | None = None) -> list[Part]:
    where_from = f" (from {flag})" if flag else f" (in {source})" if source else ""
    parts: list[Part] = []
    block: type | None = cls
    segments = path.split(".")
    i = 0
    while i < len(segments):
        segment, fields = segments[i], block_fields(block)
        name = next((n for n, (alias, _) in fields.items() if segment in (n, alias)), None)
        if name is None:
            where = ".".join(p.name for p in parts) or "the top level"
            names = [f"{n} (alias {alias})" if alias else n for n, (alias, _) in fields.items()]
            close = difflib.get_close_matches(segment, list(fields), n=1)
            hint = f"; did you mean {'.'.join([*(p.name for p in parts), close[0]])!r}?" if close else ""
            if not parts and not close:  # a path of a block given from the top ('sns.lam' for a study)
                inside = [f"{n}.{path}" for n, (_, a) in fields.items() if _resolves(nested_block(a), path)]
                hint = f"; did you mean {inside[0]!r}?" if inside else ""
            raise ConfigError(f"config error: {path!r} is not a field; {where} has: {', '.join(names)}{hint}"
                              f"{where_from}")
        parts.append(Part(name))
        i += 1
        entry = _mapping_value(fields[name][1])
        if entry is not None:  # the rest is one of its keys, then (maybe) a field of that entry
            if i == len(segments):
                raise ConfigError(f"config error: {path!r} is a mapping; name one of its entries, e.g. "
                                  f"{path}.KEY (or a field of one: {path}.KEY.{next(iter(block_fields(entry)))})"
                                  f"{where_from}")
            canon = _key_canonicalizer(block, name, where_from)
            key, rest = _split_key(segments[i:], entry, path, where_from)
            parts.append(Part(canon(key), canon))
            block, segments, i = entry, rest, 0
            continue
        block = nested_block(fields[name][1])
        last = i == len(segments)
        if block is not None and last and not _is_dataclass(block):
            raise ConfigError(f"config error: {path!r} is a block; name one of its fields: "
                              f"{', '.join(f'{path}.{f}' for f in block_fields(block))}")
        if block is None and not last:
            raise ConfigError(f"config error: {'.'.join(p.name for p in parts)} has no sub-fields (path {path!r})")
    return parts


def _resolves(block: type | None, path: str) -> bool:
    try:
        return block is not None and bool(path_parts(block, path))
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
    fields = block_fields(entry)
    for k in range(1, len(rest)):
        if rest[k] in fields and (len(rest) == k + 1 or nested_block(fields[rest[k]][1]) is not None):
            return ".".join(rest[:k]), rest[k:]
    close = difflib.get_close_matches(rest[-1], list(fields), n=1)
    if len(rest) > 1 and close:
        fixed = ".".join([*path.split(".")[:-1], close[0]])
        raise ConfigError(f"config error: {path!r} is not a field; an entry has: {', '.join(fields)}; did you mean "
                          f"{fixed!r}?{where_from}")
    return ".".join(rest), []


def _is_dataclass(cls: type) -> bool:
    return hasattr(cls, "__dataclass_fields__")


def block_fields(cls: type) -> dict[str, tuple[str | None, Any]]:
    """name -> (alias, annotation) of a pydantic model or a dataclass (a leaf value, such as an Attack)."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return {n: (f.alias, f.annotation) for n, f in cls.model_fields.items()}
    return {n: (None, f.type) for n, f in getattr(cls, "__dataclass_fields__", {}).items()}


def nested_block(annotation: Any) -> type | None:
    """The model or dataclass a field holds (through `X | None`), or None for a plain value."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and (issubclass(candidate, BaseModel) or _is_dataclass(candidate)):
            return candidate
    return None


def set_parts(data: dict, parts: list[Part], value: Any) -> None:
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

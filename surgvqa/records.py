"""Typed, versioned JSON records (``surgvqa_config.json``, the predictions meta line), read one way:
:func:`migrate` an older version to the current layout (``migrations[v]`` turns version ``v`` into ``v + 1``; a
newer version is refused: upgrade surgvqa), then :func:`build` the dataclass, nested ones included (an unknown or
missing required key, or a value of the wrong type, is an error naming the key and the source)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from surgvqa.errors import UserError

Migrations = Mapping[int, Callable[[dict[str, Any]], dict[str, Any]]]


def migrate(raw: Any, source: str, *, key: str, current: int, migrations: Migrations, error: type[UserError],
            absent: int = 0) -> dict[str, Any]:
    """``raw`` (version ``raw[key]``, ``absent`` when it has none) migrated to version ``current``."""
    if not isinstance(raw, Mapping):
        raise error(f"{source}: expected a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    version = raw.get(key, absent)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise error(f"{source}: {key} must be a whole number, got {version!r}")
    if version > current:
        raise error(f"{source}: {key} {version} was written by a newer surgvqa (this one reads up to {current}); "
                    "upgrade surgvqa")
    while version < current:
        try:
            raw = migrations[version](raw)
        except error as err:
            raise error(f"{source}: {err}") from None
        version += 1
        raw[key] = version
    return raw


def build(cls: type, raw: Mapping[str, Any], source: str, error: type[UserError], prefix: str = "") -> Any:
    """``cls(**raw)``, every value checked against its field's type (nested dataclasses built the same way)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise error(f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)} (a typo, or a file from "
                    f"another tool); known: {', '.join(prefix + k for k in fields)}")
    values = {}
    for name, spec in fields.items():
        if name not in raw:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise error(f"{source}: required key {prefix + name} is missing; restore it from the file's "
                            "original (or write it again)")
            continue
        values[name] = _check_type(raw[name], hints[name], source, prefix + name, error)
    try:
        return cls(**values)
    except UserError as err:  # a dataclass's own validation
        raise error(f"{source}: {err}") from None


def _check_type(value: Any, hint: Any, source: str, key: str, error: type[UserError]) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise error(f"{source}: {key} must be an object, got {type(value).__name__}")
        return build(hint, value, source, error, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, source, key, error)
            except error as err:
                errors.append(err)
        raise errors[0]
    base = origin or hint
    if base is Any:
        return value
    ok = isinstance(value, base) and not (base in (int, float) and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise error(f"{source}: {key} must be {getattr(base, '__name__', base)}, got {type(value).__name__} "
                    f"{json.dumps(value)[:40]}")
    if base is list:
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_type(v, item, source, f"{key}[{i}]", error) for i, v in enumerate(value)]
    return value

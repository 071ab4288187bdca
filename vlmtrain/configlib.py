"""Typed configs from YAML: dataclasses built from mappings plus ``key.sub=value`` overrides.

Shared by the trainer, the model families and the curation pipeline. Every key is checked when
it is loaded: a misspelled key or a bad value raises ``ConfigError`` naming the dotted key, what
was given and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from vlmtrain.errors import ConfigError


def choices(*allowed: Any) -> dict:
    """Field metadata: the value must be one of ``allowed``."""
    return {"choices": allowed}


def at_least(minimum: float) -> dict:
    return {"min": minimum}


def between(minimum: float, maximum: float) -> dict:
    return {"min": minimum, "max": maximum}


def read_yaml_with_overrides(path: str | Path | None, overrides: Sequence[str] = (), what: str = "config file") -> dict:
    """The mapping in a YAML file (empty without one) with ``key.sub=value`` overrides applied."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{what} not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (so 1e-3, true, [1,2]), unless
    YAML would drop part of the text (``output_dir=/runs/exp #2`` reads as ``/runs/exp``: a comment):
    then the whole text is the value, a string, which a key of another type refuses."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    try:
        parsed = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        parsed = None  # not YAML at all (an unbalanced quote or bracket): the text as it is
    whole = parsed is not None and parsed.end_mark.index >= len(text.rstrip())
    node[leaf] = yaml.safe_load(text) if whole else text


def deep_merge(base: dict, top: dict) -> dict:
    """``base`` with ``top`` laid over it, section by section."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, naming the dotted key of any mistake.

    A field typed ``Any`` takes its value as given (a section resolved by its owner beforehand).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {join_key(prefix, close[0])!r}?)" if close else ""
            raise ConfigError(f"unknown config key {join_key(prefix, key)!r}{hint}; "
                              f"allowed keys here: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        dotted = join_key(prefix, name)
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], dotted)
            _check_bounds(f, values[name], dotted)
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = from_dict(hints[name], {}, dotted)
        if f.metadata.get("required") and not values.get(name, f.default):
            raise ConfigError(f"config key {dotted!r} is required")
    return cls(**values)


def _coerce(kind: Any, value: Any, dotted: str) -> Any:
    if kind is Any:
        return value
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, dotted)
    if isinstance(kind, types.UnionType):
        if value is None and type(None) in typing.get_args(kind):
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {dotted!r} must be a list, got {value!r}")
        (item_kind,) = typing.get_args(kind)
        return [_coerce(item_kind, item, f"{dotted}[{i}]") for i, item in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key {dotted!r} must be {kind.__name__}, got {value!r}")


def _check_bounds(f: dataclasses.Field, value: Any, dotted: str) -> None:
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(str(c) for c in meta["choices"])
        raise ConfigError(f"config key {dotted!r}: got {value!r}, allowed values: {allowed}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"config key {dotted!r}: got {value!r}, must be >= {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"config key {dotted!r}: got {value!r}, must be <= {meta['max']}")


def join_key(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)

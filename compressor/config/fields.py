"""The generic machinery of the config: field specs, coercion and validation, the shared types.

Every section declares its keys with :func:`_spec` (type annotation, default, doc, range);
:func:`_build` turns a raw mapping into a section's dataclass, rejecting unknown keys, and
:func:`_coerce` checks each value against its annotation and range, so every error names the
dotted key. The command line reuses the same rules: :func:`check_value`, :func:`parse_value` and
:func:`describe_field` (a flag's help), and :func:`parse_override`/:func:`apply_overrides` for
``key=value`` overrides. Nothing here knows a section.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal, Union

import yaml

from compressor.errors import ConfigError


def _spec(default: Any, doc: str, **checks: Any) -> Any:
    """A dataclass field with a docstring and range checks (ge, gt, le, lt)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc, **checks})
    return field(default=default, metadata={"doc": doc, **checks})


BACKENDS = ("torch", "onnxruntime", "tensorrt")  # the backend registry's names (deploy/runtimes.py)
Backend = Literal["torch", "onnxruntime", "tensorrt"]
Scheduler = Literal["ddim", "ddpm", "dpmsolver++", "unipc"]


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _range_text(meta: dict) -> str:
    lo = "[" if "ge" in meta else "(" if "gt" in meta else None
    hi = "]" if "le" in meta else ")" if "lt" in meta else None
    lo_v = meta.get("ge", meta.get("gt"))
    hi_v = meta.get("le", meta.get("lt"))
    if lo and hi:
        return f" in {lo}{lo_v}, {hi_v}{hi}"
    if lo:
        return f" {'>=' if lo == '[' else '>'} {lo_v}"
    if hi:
        return f" {'<=' if hi == ']' else '<'} {hi_v}"
    return ""


def _coerce(value: Any, tp: Any, key: str, meta: dict) -> Any:
    """Check ``value`` against annotation ``tp`` and the range in ``meta``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        literals = [a for a in inner if typing.get_origin(a) is Literal]
        if literals and any(value in typing.get_args(a) for a in literals):  # e.g. num_samples: auto
            return value
        if literals and isinstance(value, str):
            plain = " or ".join(_describe(a) for a in inner if a not in literals) + _range_text(meta)
            named = ", ".join(repr(v) for a in literals for v in typing.get_args(a))
            raise ConfigError(f"{key}: expected {plain} or {named}, got {value!r}")
        return _coerce(value, inner[0], key, meta)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as text: take it as the number it is
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            value = number if math.isfinite(number) else value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = math.isfinite(value)
    elif tp is str:
        ok = isinstance(value, str) and value != ""
    if not ok:
        rng = _range_text(meta)
        raise ConfigError(f"{key}: expected {_describe(tp)}{rng}, got {value!r}")
    bad = (
        ("ge" in meta and value < meta["ge"])
        or ("gt" in meta and value <= meta["gt"])
        or ("le" in meta and value > meta["le"])
        or ("lt" in meta and value >= meta["lt"])
    )
    if bad:
        raise ConfigError(f"{key}: expected {_describe(tp)}{_range_text(meta)}, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{where}{unknown[0]}: unknown key; known keys here: {known}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key)
        else:
            kwargs[name] = _coerce(data[name], tp, key, dict(f.metadata))
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``dotted.key=value`` override; the value is read as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. prune.ratio=0.3")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not key.strip() or any(not p.isidentifier() for p in parts):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted config key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) or (
        isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)
    ):
        raise ConfigError(f"override {text!r}: only scalars and flat lists ([a, b]) can be overridden")
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of the raw config mapping with ``key=value`` overrides applied."""
    out = _deepcopy_mapping(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deepcopy_mapping(data: dict) -> dict:
    return {k: _deepcopy_mapping(v) if isinstance(v, dict) else v for k, v in data.items()}


def field_spec(cls: type, name: str) -> tuple[Any, Any, dict]:
    """(type annotation, default, metadata) of config field ``cls.name``."""
    hints = typing.get_type_hints(cls)
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return hints[name], default, dict(f.metadata)


def check_value(key: str, value: Any, cls: type, name: str) -> Any:
    """Validate ``value`` by the rules of config field ``cls.name``; errors name ``key`` (e.g. a flag)."""
    tp, _, meta = field_spec(cls, name)
    return _coerce(value, tp, key, meta)


def parse_value(key: str, text: str, cls: type, name: str) -> Any:
    """A command-line string checked as config field ``cls.name`` would be (ConfigError naming ``key``)."""
    tp, _, meta = field_spec(cls, name)
    base = tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return _coerce(None, tp, key, meta)
        base = inner[0]
    value: Any = text
    try:
        if base is int:
            value = int(text)
        elif base is float:
            value = float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected {_describe(base)}{_range_text(meta)}, got {text!r}") from None
    return _coerce(value, tp, key, meta)


def describe_field(cls: type, name: str) -> str:
    """The field's doc plus its allowed values, for --help texts."""
    tp, default, meta = field_spec(cls, name)
    return f"{meta.get('doc', '')} ({_describe(tp)}{_range_text(meta)}; default {default})"


def config_to_dict(cfg: Any) -> dict:
    """Plain-dict view of a config (or one section) for records and hashing."""
    return dataclasses.asdict(cfg)

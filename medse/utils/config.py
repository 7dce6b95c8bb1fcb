"""Typed configuration: YAML (``yaml.safe_load``) -> nested dataclasses, with inheritance and overrides.

* ``_base_: other.yaml`` at the top of a YAML file inherits that file (paths relative to the file),
  keys in the child override the base recursively.
* ``apply_overrides(d, ["train.epochs=2", "data.root=/x"])`` sets dotted keys; values are parsed as YAML.
* ``from_dict(Schema, d)`` validates against a dataclass schema: unknown keys and wrong types raise
  :class:`~medse.utils.errors.MedseError` naming the dotted key (with a "did you mean" suggestion).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from medse.utils.errors import MedseError, did_you_mean

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping with ``yaml.safe_load``, resolving ``_base_`` inheritance."""
    path = Path(path)
    if not path.is_file():
        raise MedseError("config file not found", path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise MedseError(f"invalid YAML{where}: {getattr(e, 'problem', e)}", path) from e
    if not isinstance(data, dict):
        raise MedseError("config must be a YAML mapping at the top level", path)
    base = data.pop("_base_", None)
    if base is not None:
        bases = [base] if isinstance(base, str) else list(base)
        merged: dict[str, Any] = {}
        for b in bases:
            merged = deep_merge(merged, load_yaml((path.parent / b).resolve()))
        data = deep_merge(merged, data)
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed with ``yaml.safe_load``) to a copy of ``data``."""
    out = copy.deepcopy(data)
    for item in overrides or ():
        if "=" not in item:
            raise MedseError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise MedseError(f"override '{item}': '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = value
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except MedseError as e:
                errors.append(str(e))
        raise MedseError(f"config key '{key}': expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise MedseError(
                f"config key '{key}': {value!r} is not one of {list(args)}.{did_you_mean(str(value), map(str, args))}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MedseError(f"config key '{key}': expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise MedseError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise MedseError(f"config key '{key}': expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        inner = args[0] if args else Any
        conv = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(conv) if (origin is tuple or tp is tuple) else conv
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise MedseError(f"config key '{key}': expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise MedseError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise MedseError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise MedseError(f"config key '{key}': expected a number, got {value!r}")
        if not math.isfinite(number):  # nan/inf would pass every range check below (nan > 0 is False, inf > 0)
            raise MedseError(f"config key '{key}': expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise MedseError(f"config key '{key}': expected a string, got {value!r}")
    return value


def override_key(key: str, overrides: list[str] | tuple[str, ...]) -> str | None:
    """The last override (``a.b=value``) that sets dotted ``key`` or a section holding it, else None."""
    for item in reversed(list(overrides or ())):
        k = item.split("=", 1)[0].strip()
        if k and (k == key or key.startswith(k + ".") or key.startswith(k + "[")):
            return item
    return None


def blame(error: MedseError, schema: type, data: dict[str, Any], overrides: list[str] | tuple[str, ...],
          path: Path | None) -> MedseError:
    """``error`` (raised by ``from_dict(schema, data + overrides)``) blamed on what caused it.

    A command-line override that sets a key the message names gets the blame (``command-line override
    'train.epoch=2': unknown config key 'train.epoch'. Did you mean 'epochs'?``); so do the overrides as a whole
    when ``data`` alone validates; otherwise the config file ``path`` does.
    """
    import re

    msg = str(error)
    if overrides:
        for key in re.findall(r"[A-Za-z_]\w*(?:\.[A-Za-z_0-9]\w*)+", msg):
            item = override_key(key, overrides)
            if item is not None:
                return MedseError(f"command-line override '{item}': {msg}")
        try:
            from_dict(schema, data)
        except MedseError:
            pass
        else:
            return MedseError(f"command-line overrides ({' '.join(overrides)}): {msg}")
    return MedseError(msg, path)


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating keys and types recursively."""
    data = data or {}
    if not isinstance(data, dict):
        raise MedseError(f"config section '{prefix or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise MedseError(f"unknown config key '{full}'.{did_you_mean(str(k), fields)}")
        kwargs[k] = _convert(v, hints[k], full)
    try:
        return cls(**kwargs)
    except TypeError as e:
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise MedseError(f"missing config key '{(prefix + '.') if prefix else ''}{missing[0]}'") from e
        raise MedseError(f"config section '{prefix or '<root>'}': {e}") from e
    except ValueError as e:
        raise MedseError(f"config section '{prefix or '<root>'}': {e}") from e


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list (tuples become lists) suitable for ``yaml.safe_dump``."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)

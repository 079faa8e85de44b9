"""Typed parsing: plain mappings into frozen dataclasses, errors that name the key.

Generic machinery the schema (:mod:`speedstructure.config.schema`) is built with: the project
root (the directory holding ``params.yaml``), paths resolved against it, YAML reading, and
:func:`build` / :func:`coerce`, which turn a mapping into a dataclass by its type hints.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from speedstructure.errors import UserError

PARAMS_FILE = "params.yaml"


class ConfigError(UserError, ValueError):
    """A problem with ``params.yaml`` (names the file and the key)."""


# --------------------------------------------------------------------------- loading


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) holding ``params.yaml``.

    ``SPEEDSTRUCTURE_ROOT`` overrides the search.
    """
    env = os.environ.get("SPEEDSTRUCTURE_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(start or os.getcwd()).resolve()
    for cand in (here, *here.parents):
        if (cand / PARAMS_FILE).is_file():
            return cand
    return here


def resolve_path(p: str | os.PathLike, root: Path | None = None) -> Path:
    """``p`` made absolute against the project root (absolute paths pass through)."""
    p = Path(p)
    return p if p.is_absolute() else (root or project_root()) / p


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """``params.yaml`` (or ``path``) as a plain mapping, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: parameter file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- typed building


def build(cls: type, raw: Any, where: str):
    """An instance of dataclass ``cls`` from mapping ``raw`` (None: all defaults).

    Unknown keys, missing required keys and values of the wrong type raise
    :class:`ConfigError` naming ``where`` and the key.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, raw)) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = coerce(raw[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{name}'")
    return cls(**values)


def replace_checked(obj, overrides: dict[str, Any] | None, where: str):
    """``dataclasses.replace(obj, **overrides)`` with the overrides validated like :func:`build`."""
    if not overrides:
        return obj
    merged = {**as_plain(obj), **overrides}
    return build(type(obj), merged, where)


# scalar type -> (what the error says it must be, the check); bools are not numbers here
_SCALARS: dict[type, tuple[str, Any]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against type ``hint`` (ints pass as floats; lists become tuples)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build(hint, value, where)
    if hint is Any:
        return value
    if hint in _SCALARS:
        what, accepts = _SCALARS[hint]
        if not accepts(value):
            raise ConfigError(f"{where} must be {what}, got {value!r}")
        return value
    if origin is tuple:
        return _coerce_tuple(value, args, where)
    if origin is dict:
        return _coerce_dict(value, args, where)
    raise TypeError(f"{where}: unsupported type {hint!r}")  # a schema error in this module


def _coerce_tuple(value: Any, args: tuple, where: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
    return tuple(
        coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
    )


def _coerce_dict(value: Any, args: tuple, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    key_t, val_t = args
    return {
        coerce(k, key_t, f"{where}"): coerce(v, val_t, f"{where}.{k}") for k, v in value.items()
    }


def as_plain(obj: Any) -> Any:
    """Dataclasses, tuples and mappings as plain dicts and lists (JSON, MLflow, checkpoints)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: as_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.name != "root"
        }
    if isinstance(obj, dict):
        return {str(k): as_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def flatten(d: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for logging params to MLflow)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out

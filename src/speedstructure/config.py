"""The one source of configuration: ``params.yaml`` at the project root.

Every stage reads its section through :func:`load_params`.  Paths inside the
project are resolved against :func:`project_root`, so commands work from any
working directory inside the checkout (and inside the temporary copies that
``dvc exp run --queue`` makes).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from speedstructure.errors import UserError

PARAMS_FILE = "params.yaml"


class ConfigError(UserError, ValueError):
    """A problem with ``params.yaml`` (names the file and the key)."""


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


def load_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read ``params.yaml`` (or ``path``) into a plain dict."""
    p = Path(path) if path is not None else project_root() / PARAMS_FILE
    if not p.is_file():
        raise ConfigError(f"{p}: parameter file not found")
    try:
        with open(p, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def section(params: dict[str, Any], key: str, source: str = PARAMS_FILE) -> dict[str, Any]:
    """``params[key]`` as a dict, with an error naming the file and key when missing."""
    if key not in params or not isinstance(params[key], dict):
        raise ConfigError(f"{source}: missing or invalid section '{key}'")
    return params[key]


def deep_merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """A new dict: ``base`` with ``override`` merged in recursively (override wins)."""
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


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


def resolve_path(p: str | os.PathLike, root: Path | None = None) -> Path:
    """``p`` made absolute against the project root (absolute paths pass through)."""
    p = Path(p)
    return p if p.is_absolute() else (root or project_root()) / p

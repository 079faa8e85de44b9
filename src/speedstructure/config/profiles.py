"""Profiles: the one switch between the small CPU setup and the 1st-place configuration.

``params.yaml`` holds, under ``profiles:``, the keys each profile sets (the
training runs, the ensemble members, the number of folds, ...).  The active
profile's values are the top-level keys that every stage reads; DVC's
templating cannot select a sub-tree by a parameter, so switching rewrites
those keys in place (comments and layout kept):

    speedstructure profile competition      # or: make profile PROFILE=competition
    speedstructure profile default
    speedstructure profile                  # which one is active, and does params.yaml agree?

DVC then sees exactly which parameters changed and reruns what depends on them.
"""

from __future__ import annotations

import argparse
import copy
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from speedstructure.config.load import load_params
from speedstructure.config.schema import Params
from speedstructure.config.typed import PARAMS_FILE, ConfigError, as_plain, project_root
from speedstructure.fsutil import atomic_write_text


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()  # round-trip: keeps comments, order and quoting
    y.preserve_quotes = True
    y.width = 120
    y.indent(mapping=2, sequence=4, offset=2)
    # keep `null` as written (the round-trip default would write an empty value)
    y.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return y


def _set_path(doc, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = doc
    for p in parents:
        if p not in node or not isinstance(node[p], dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a profile: nested mappings are merged key by key, except ``runs`` and
    ``ensemble.*`` values, which are replaced whole (they are lists/tables, not settings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("runs", "ensemble.hand_weights"):
            out.update(_leaves(v, key + "."))
        else:
            out[key] = v
    return out


def _get_path(d: dict[str, Any], dotted: str):
    node: Any = d
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _plain(params: Params | Mapping[str, Any]) -> dict[str, Any]:
    """The settings as plain mappings and lists: typed params (defaults filled in) or the
    mapping ``params.yaml`` holds."""
    return as_plain(params if isinstance(params, Params) else dict(params))


def profile_names(params: Params | Mapping[str, Any]) -> list[str]:
    return sorted((_plain(params).get("profiles") or {}).keys())


def differences(params: Params | Mapping[str, Any], name: str) -> list[str]:
    """Dotted keys whose top-level value differs from what profile ``name`` sets."""
    plain = _plain(params)
    prof = (plain.get("profiles") or {}).get(name)
    if prof is None:
        raise ConfigError(
            f"{PARAMS_FILE}: no profile '{name}' (have: {', '.join(profile_names(plain))})"
        )
    return [k for k, v in _leaves(prof).items() if _get_path(plain, k) != v]


def switch(name: str, path: Path | None = None) -> list[str]:
    """Apply profile ``name`` to ``params.yaml``; returns the keys that changed."""
    path = Path(path or project_root() / PARAMS_FILE)
    params = load_params(path)
    changed = differences(params, name)
    y = _yaml()
    doc = y.load(path.read_text(encoding="utf-8"))
    prof = doc["profiles"][name]
    for key in changed:
        # a copy: the same node under two keys would be written as a YAML anchor and alias
        _set_path(doc, key, copy.deepcopy(_get_path(prof, key)))
    if doc.get("profile") != name:
        doc["profile"] = name
        changed.append("profile")
    if changed:
        buf = io.StringIO()
        y.dump(doc, buf)
        atomic_write_text(path, buf.getvalue())
    return changed


def _cmd(args: argparse.Namespace) -> int:
    if args.name:
        changed = switch(args.name)
        if changed:
            print(
                f"profile {args.name}: set {', '.join(changed)} in {PARAMS_FILE}; "
                "`dvc repro` reruns what they affect"
            )
        else:
            print(f"profile {args.name}: already active")
        return 0
    params = load_params()
    active = params.profile
    diff = differences(params, active) if active in params.profiles else ["profile"]
    state = "params.yaml agrees" if not diff else f"differs in {', '.join(diff)}"
    print(f"profile: {active} ({state}); available: {', '.join(profile_names(params))}")
    return 0 if not diff else 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile",
        description="Apply a profile from params.yaml 'profiles:' to the top-level keys.",
    )
    p.add_argument("name", nargs="?", help="profile to switch to (omit to show the active one)")
    p.set_defaults(func=_cmd)

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
from pathlib import Path
from typing import Any

from speedstructure.config import ConfigError, PARAMS_FILE, load_params, project_root
from speedstructure.fsutil import atomic_write_bytes


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()  # round-trip: keeps comments, order and quoting
    y.preserve_quotes = True
    y.width = 120
    y.indent(mapping=2, sequence=4, offset=2)
    # keep `null` as written (the round-trip default would write an empty value)
    y.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


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


def profile_names(params: dict[str, Any]) -> list[str]:
    return sorted((params.get("profiles") or {}).keys())


def differences(params: dict[str, Any], name: str) -> list[str]:
    """Dotted keys whose top-level value differs from what profile ``name`` sets."""
    prof = (params.get("profiles") or {}).get(name)
    if prof is None:
        raise ConfigError(f"{PARAMS_FILE}: no profile '{name}' (have: {', '.join(profile_names(params))})")
    return [k for k, v in _leaves(prof).items() if _plain(_get_path(params, k)) != _plain(v)]


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
        atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
    return changed


def _cmd(args: argparse.Namespace) -> int:
    params = load_params()
    if not args.name:
        active = params.get("profile", "?")
        diff = differences(params, active) if active in (params.get("profiles") or {}) else ["profile"]
        state = "params.yaml agrees" if not diff else f"differs in {', '.join(diff)}"
        print(f"profile: {active} ({state}); available: {', '.join(profile_names(params))}")
        return 0 if not diff else 1
    changed = switch(args.name)
    if changed:
        print(f"profile {args.name}: set {', '.join(changed)} in {PARAMS_FILE}; `dvc repro` reruns what they affect")
    else:
        print(f"profile {args.name}: already active")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="show or switch the configuration profile (default | competition)",
                       description="Apply a profile from params.yaml 'profiles:' to the top-level keys.")
    p.add_argument("name", nargs="?", help="profile to switch to (omit to show the active one)")
    p.set_defaults(func=_cmd)

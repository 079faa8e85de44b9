"""``speedstructure plots-template``: the page ``dvc plots show`` fills, readable offline.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so that without a network
(the machines this project runs on) every chart stays blank.  ``.dvc/config`` names another
page (``plots.html_template``, relative to ``.dvc/``); this command writes it there with the
three libraries inlined, from the bundle that the ``vl-convert-python`` package ships (no
download).  The page has no ``{scripts}`` placeholder, so DVC adds no CDN tags: the HTML
that ``dvc plots show`` and ``dvc plots diff`` write loads nothing from outside (a test
checks it).  ``make setup`` runs the command; it rewrites the page only when it is missing
or was made by another version of the bundle.
"""

from __future__ import annotations

import argparse
import configparser
from pathlib import Path

from speedstructure.config.typed import project_root
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_write_text

CONFIG_SECTION, CONFIG_KEY = "plots", "html_template"
# DVC fills these two placeholders (str.replace); there is deliberately no {scripts}
PAGE_HEAD = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<style>table { border-spacing: 15px; }</style>
"""
PAGE_BODY = """</head>
<body>
{plot_divs}
</body>
</html>
"""


def template_path(root: Path | None = None) -> Path:
    """The page that ``.dvc/config`` names (``plots.html_template``, relative to ``.dvc/``)."""
    dvc_dir = Path(root or project_root()) / ".dvc"
    config = configparser.ConfigParser()
    config.read(dvc_dir / "config")
    name = config.get(CONFIG_SECTION, CONFIG_KEY, fallback=None)
    if not name:
        raise UserError(f"{dvc_dir / 'config'}: sets no plots.html_template")
    return dvc_dir / name


def _vegalite_version(vlc) -> str:
    """The newest vega-lite 5 of the bundle (DVC's templates declare the v5 schema)."""
    versions = list(vlc.get_vegalite_versions())
    fives = [v for v in versions if v.startswith("5.")]
    return (fives or versions)[-1]


def _vl_convert():
    try:
        import vl_convert
    except ImportError as exc:  # a venv from before the dependency
        raise UserError("vl-convert-python is not installed: run `make setup`") from exc
    return vl_convert


def _marker(vlc) -> str:
    """The page's first comment: the versions it inlines (an older page is rewritten)."""
    vl = _vegalite_version(vlc)
    return (
        f"<!-- vega {vlc.get_vega_version()}, vega-lite {vl}, vega-embed "
        f"{vlc.get_vega_embed_version()} (vl-convert-python {vlc.__version__}) -->"
    )


def page() -> str:
    """The page: DVC's placeholders and vega, vega-lite and vega-embed inlined."""
    vlc = _vl_convert()
    bundle = vlc.javascript_bundle(vl_version=_vegalite_version(vlc))  # sets window.vegaEmbed
    if "</script" in bundle.lower():
        raise UserError("the vega bundle holds '</script': it cannot be inlined")
    return f"{_marker(vlc)}\n{PAGE_HEAD}<script>\n{bundle}\n</script>\n{PAGE_BODY}"


def write_template(path: Path, force: bool = False) -> bool:
    """Write the page to ``path`` unless it is there from the same bundle; True if written."""
    if not force and path.is_file():
        with path.open(encoding="utf-8") as f:
            if f.readline().rstrip("\n") == _marker(_vl_convert()):
                return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page())
    return True


def _cmd(args: argparse.Namespace) -> int:
    path = Path(args.output) if args.output else template_path()
    wrote = write_template(path, force=args.force)
    if not args.quiet or wrote:
        print(f"{path}: {'written' if wrote else 'up to date'} (dvc plots show renders offline)")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from speedstructure.cli import COMMANDS

    p = subparsers.add_parser(
        "plots-template", help=COMMANDS["plots-template"][1], description=__doc__.split("\n")[0]
    )
    p.add_argument("--output", help="where to write it (default: the page .dvc/config names)")
    p.add_argument("--force", action="store_true", help="rewrite it even when up to date")
    p.add_argument("--quiet", action="store_true", help="say nothing when it is up to date")
    p.set_defaults(func=_cmd)

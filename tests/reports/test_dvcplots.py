"""The offline page of `dvc plots show` (speedstructure.reports.dvcplots) and the custom
template."""

from __future__ import annotations

import json
import re

from speedstructure.reports import dvcplots
from support import ROOT


def test_the_page_inlines_vega_and_loads_nothing_from_outside(tmp_path):
    path = tmp_path / "page.html"
    assert dvcplots.write_template(path)
    page = path.read_text()
    # DVC's placeholders, and no {scripts}: DVC adds no CDN <script src=...> tags to it
    assert "{plot_divs}" in page and "{refresh_tag}" in page and "{scripts}" not in page
    assert "window.vegaEmbed" in page  # what DVC's chart divs call
    assert not re.search(r"""<(script|link|img)[^>]*(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert page.count("<script") == 1 and page.count("</script>") == 1
    mtime = path.stat().st_mtime_ns
    assert not dvcplots.write_template(path) and path.stat().st_mtime_ns == mtime  # up to date
    path.write_text(path.read_text().replace("vega ", "vega 0", 1))  # another bundle's page
    assert dvcplots.write_template(path) and path.read_text() == page


def test_dvc_config_names_the_page_under_dvc_tmp():
    path = dvcplots.template_path(ROOT)
    assert path.parent == ROOT / ".dvc" / "tmp"  # .dvc/.gitignore keeps it out of git


def test_the_curves_template_draws_every_run_from_a_dvc_table():
    """.dvc/plots/curves.json, filled as DVC fills it, compiles and draws one line per run
    and curve (vl-convert renders it as the browser would)."""
    import vl_convert as vlc

    template = (ROOT / ".dvc/plots/curves.json").read_text()
    rows = [
        {"run": run, "epoch": str(e), "train_loss": t, "val_mape": str(0.1 / e), "rev": "workspace"}
        for run, t in (("a-f0", "0.2"), ("b-f1", ""))
        for e in (1, 2, 3)
    ]
    spec = json.loads(template.replace('"<DVC_METRIC_DATA>"', json.dumps(rows)))
    spec["title"] = "curves"
    svg = vlc.vegalite_to_svg(spec, vl_version=dvcplots._vegalite_version(vlc))
    assert svg.count('aria-roledescription="line mark"') == 3  # a-f0 twice, b-f1's val only
    assert "a-f0" in svg and "b-f1" in svg and "val_mape" in svg

"""Render the report page from ``report.data`` with jinja2 (autoescape on) and inline its assets."""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

from ..keywords import strict_keywords
from ..results import Results, write_text_atomic
from .data import report_data

__all__ = ["UPLOT_VERSION", "render_report", "write_report"]

UPLOT_VERSION = "1.6.32"
_STATIC = ("uPlot.iife.min.js", "uPlot.min.css", "report.js", "report.css")


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("precision_suite.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    # the chart data goes into the page as one JSON blob: compact, and strict (no NaN/Infinity)
    env.policies["json.dumps_kwargs"] = {"sort_keys": False, "separators": (",", ":"), "allow_nan": False}
    return env


@functools.lru_cache(maxsize=1)
def _assets() -> dict:
    """The vendored chart library and the page's own script and style, inlined verbatim."""
    from markupsafe import Markup

    base = resources.files("precision_suite.report") / "static"
    out = {}
    for name in _STATIC:
        text = (base / name).read_text(encoding="utf-8")
        # inlined inside <script>/<style>: a closing tag in the text would end the element early
        if "</script" in text.lower() or "</style" in text.lower():
            raise RuntimeError(f"static asset {name} contains a closing tag and cannot be inlined")
        out[name.replace(".", "_")] = Markup(text)
    return out


@strict_keywords
def render_report(results: Results, baseline: Results | None = None) -> str:
    """The report page for ``results`` as one HTML string; with ``baseline``, a diff section too."""
    data = report_data(results, baseline)
    template = _environment().get_template("report.html.jinja2")
    return template.render(view=data["view"], charts=data["charts"], assets=_assets(), uplot_version=UPLOT_VERSION)


@strict_keywords
def write_report(results: Results, path: str | os.PathLike, baseline: Results | None = None) -> Path:
    """Render and write atomically (temp file + rename): a reader never sees half a report."""
    path = write_text_atomic(path, render_report(results, baseline))
    # the temp file was created 0600; a report is made to be shared (CI artifacts, web servers)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path

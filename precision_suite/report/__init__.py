"""The HTML report: one self-contained file (no network) comparing init strategies across formats.

``render_report(results)`` returns the page; ``write_report(results, path)`` writes it atomically.
The data model is ``report.data`` (Results -> JSON-ready view), the page is the jinja2 template
``templates/report.html.jinja2`` (autoescaped), and the charts are drawn in the browser by the
vendored uPlot (``static/``, MIT) from one escaped JSON blob.
"""

from ._render import render_report, write_report

__all__ = ["render_report", "write_report"]

"""The benchmark report: Markdown tables (the paper's Tables 2-4 with its numbers side by
side), matplotlib figures (Fig. 1 and Fig. 2 of the paper) and the paper's published numbers.

* :mod:`.paper_numbers`: the paper's Acc/Cover in %, with source and provenance.
* :mod:`.markdown`: :func:`render_report` / :func:`write_report` for ``report.md``.
* :mod:`.html`: :func:`write_html_report`, the self-contained HTML explorer ``report.html``.
* :mod:`.figures`: :func:`heatmap_figure` (Fig. 2), :func:`showcase_figure` and
  :func:`showcase_markdown` (Fig. 1), written atomically as PNG.
"""

from .figures import (heatmap_column_order, heatmap_figure, normalize_rows, showcase_figure, showcase_markdown,
                      top_by_method)
from .html import write_html_report
from .markdown import render_report, write_report
from .paper_numbers import PAPER_TABLES, paper_value

__all__ = [
    "PAPER_TABLES", "heatmap_column_order", "heatmap_figure", "normalize_rows", "paper_value", "render_report",
    "showcase_figure", "showcase_markdown", "top_by_method", "write_html_report", "write_report",
]

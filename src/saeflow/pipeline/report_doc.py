"""The report's document: sections written to HTML and Markdown at once, and the small readers
the report's sections share."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

STYLE = ("body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0;font-size:13px}td,th{border-bottom:"
         "1px solid #ddd;padding:.15em .5em;text-align:left}img{max-width:100%}"
         "pre{background:#f6f6f8;padding:.6em;white-space:pre-wrap}")


class Doc:
    """Sections written to HTML and Markdown at once."""

    def __init__(self):
        self.html: list[str] = []
        self.md: list[str] = []

    def h(self, text: str, level: int = 2):
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append(f"\n{'#' * level} {text}\n")

    def p(self, text: str):
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md.append(text + "\n")

    def table(self, df: pd.DataFrame, floatfmt: str = "{:.3f}"):
        def cell(v):
            if isinstance(v, (float, np.floating)):
                return "" if not np.isfinite(v) else floatfmt.format(v)
            return str(v)
        cols = list(df.columns)
        rows = [[cell(v) for v in r] for r in df.itertuples(index=False)]
        self.html.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) +
                         "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>"
                                                            for v in r) + "</tr>" for r in rows) +
                         "</table>")
        self.md.append("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" +
                       "\n".join("| " + " | ".join(v.replace("|", "\\|") for v in r) + " |"
                                 for r in rows) + "\n")

    def figure(self, png: bytes, caption: str, md_path: str | None = None):
        b64 = base64.b64encode(png).decode()
        self.html.append(f"<figure><img src=\"data:image/png;base64,{b64}\" alt=\""
                         f"{html.escape(caption)}\"><figcaption>{html.escape(caption)}"
                         f"</figcaption></figure>")
        if md_path:
            self.md.append(f"![{caption}]({md_path})\n")

    def pre(self, text: str):
        self.html.append(f"<pre>{html.escape(text)}</pre>")
        self.md.append("```\n" + text + "\n```\n")

    def md_tables(self, text: str) -> None:
        """Markdown of validate's renderers: its tables as tables, its lines as text."""
        block: list[str] = []

        def flush():
            if block:
                rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in block
                        if not set(ln.replace("|", "").strip()) <= {"-"}]
                self.table(pd.DataFrame(rows[1:], columns=rows[0]))
                block.clear()
        for line in text.splitlines():
            if line.startswith("|"):
                block.append(line)
                continue
            flush()
            if line.strip():
                self.p(line)
        flush()

    def page(self, title: str) -> str:
        """The whole HTML page (the Markdown is `"\\n".join(doc.md)`)."""
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>saeflow report: "
                f"{html.escape(title)}</title><style>{STYLE}</style></head><body>"
                + "\n".join(self.html) + "</body></html>")


def png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def read_json(path: Path):
    """The JSON in `path`, or None when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None

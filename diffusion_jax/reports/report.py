"""A run's report: one Markdown file and one self-contained HTML file from the same content.

    report = Report("DiffAE on digits/16", intro="...")
    report.add_table("Linear probe", rows, columns=["features", "dim", "accuracy"])
    report.add_image("Samples", "samples/step_00001500.png", caption="64 samples, DDIM 50 steps")
    md_path, html_path = report.write(workdir)        # workdir/report.md, workdir/report.html

Image paths are relative to the work directory: report.md links them (so it renders on GitHub or
in an editor next to the files) and report.html embeds them as base64 data URIs (so the page can
be mailed or moved on its own). Numbers in tables are formatted with `fmt` (4 significant digits).
"""
from __future__ import annotations

import base64
import dataclasses
import html
import os
from typing import Any, Sequence

__all__ = ["Report", "fmt"]


def fmt(v: Any) -> str:
    """Table cell text: floats with 4 significant digits, None as an em dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}"
    return str(v)


@dataclasses.dataclass
class _Item:
    kind: str                    # 'table' | 'image' | 'text'
    title: str
    payload: Any
    caption: str = ""


class Report:
    """An ordered list of sections (tables, images, text) rendered to Markdown and HTML."""

    def __init__(self, title: str, intro: str = ""):
        self.title, self.intro = title, intro
        self.items: list[_Item] = []

    def add_text(self, title: str, text: str) -> "Report":
        self.items.append(_Item("text", title, text))
        return self

    def add_table(self, title: str, rows: Sequence[dict], columns: Sequence[str] | None = None,
                  caption: str = "") -> "Report":
        rows = list(rows)
        if columns is None:
            columns = list(dict.fromkeys(k for r in rows for k in r))
        self.items.append(_Item("table", title, (list(columns), rows), caption))
        return self

    def add_image(self, title: str, path: str, caption: str = "") -> "Report":
        """`path` relative to the directory the report is written to."""
        self.items.append(_Item("image", title, path, caption))
        return self

    # ---------------------------------------------------------------------- rendering
    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        if self.intro:
            out += [self.intro, ""]
        for it in self.items:
            out += [f"## {it.title}", ""]
            if it.kind == "text":
                out += [it.payload, ""]
            elif it.kind == "table":
                cols, rows = it.payload
                out.append("| " + " | ".join(cols) + " |")
                out.append("|" + "---|" * len(cols))
                for r in rows:
                    out.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
                out.append("")
                if it.caption:
                    out += [it.caption, ""]
            else:
                out += [f"![{it.title}]({it.payload})", ""]
                if it.caption:
                    out += [f"*{it.caption}*", ""]
        return "\n".join(out)

    def to_html(self, base_dir: str) -> str:
        e = html.escape
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{e(self.title)}</title><style>",
            "body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;"
            "color:#222}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
            "padding:.25em .6em;text-align:right}th{background:#f3f3f3}td:first-child,"
            "th:first-child{text-align:left}img{max-width:100%;image-rendering:pixelated;"
            "border:1px solid #ddd}figcaption,.cap{color:#555;font-size:.9em}",
            "</style></head><body>", f"<h1>{e(self.title)}</h1>"]
        if self.intro:
            parts.append(f"<p>{e(self.intro)}</p>")
        for it in self.items:
            parts.append(f"<h2>{e(it.title)}</h2>")
            if it.kind == "text":
                parts += [f"<p>{e(p)}</p>" for p in it.payload.split("\n\n")]
            elif it.kind == "table":
                cols, rows = it.payload
                parts.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
                for r in rows:
                    parts.append("<tr>" + "".join(f"<td>{e(fmt(r.get(c)))}</td>" for c in cols)
                                 + "</tr>")
                parts.append("</table>")
                if it.caption:
                    parts.append(f"<p class='cap'>{e(it.caption)}</p>")
            else:
                src = _data_uri(os.path.join(base_dir, it.payload)) or e(it.payload)
                parts.append(f"<figure><img src='{src}' alt='{e(it.title)}'>")
                if it.caption:
                    parts.append(f"<figcaption>{e(it.caption)}</figcaption>")
                parts.append("</figure>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, directory: str, name: str = "report") -> tuple[str, str]:
        """Writes directory/name.md and directory/name.html (atomically); returns both paths."""
        os.makedirs(directory, exist_ok=True)
        md, htm = (os.path.join(directory, f"{name}.{ext}") for ext in ("md", "html"))
        for path, text in ((md, self.to_markdown()), (htm, self.to_html(directory))):
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        return md, htm


def _data_uri(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    ext = os.path.splitext(path)[1].lower().lstrip(".") or "png"
    mime = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg",
            "svg": "image/svg+xml"}.get(ext, "application/octet-stream")
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode("ascii")

"""The report page: Markdown links the images and tabulates the numbers; HTML embeds the images."""
import base64
import os

import numpy as np

from diffusion_jax.reports import Report, image_grid
from diffusion_jax.reports.report import fmt


def test_report_markdown_and_html(tmp_path):
    d = str(tmp_path)
    png = image_grid(np.linspace(-1, 1, 4 * 8 * 8).reshape(4, 8, 8, 1), os.path.join(d, "g.png"))
    rep = Report("Title", intro="intro text")
    rep.add_table("Numbers", [{"name": "a", "value": 0.123456}, {"name": "b", "value": None}])
    rep.add_image("Grid", "g.png", caption="a caption")
    rep.add_text("Notes", "one\n\ntwo")
    md_path, html_path = rep.write(d)
    md = open(md_path).read()
    assert md.startswith("# Title") and "| name | value |" in md
    assert "| a | 0.1235 |" in md and "| b | — |" in md and "![Grid](g.png)" in md
    html = open(html_path).read()
    data = base64.b64encode(open(png, "rb").read()).decode()
    assert f"data:image/png;base64,{data}" in html and "<td>0.1235</td>" in html
    assert fmt(True) == "yes" and fmt(float("nan")) == "nan" and fmt(3) == "3"

"""Tests of kidneyreg.report: tables, the markdown subset and the report files."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import imageio.v2 as iio
import numpy as np
import pytest

from kidneyreg import __version__
from kidneyreg.report import Table, markdown_to_html, write_report

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


class _Checker(HTMLParser):
    """Collects tags and references and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        if tag == "a":
            self.links.append(values.get("href") or "")
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"unexpected </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


def _parse(text: str) -> _Checker:
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert checker.problems == []
    assert checker.stack == []
    return checker


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.full((8, 8, 3), 128, dtype=np.uint8))
    return path


def test_report_references_every_existing_figure(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = _png(out / "figures" / "stacks.png")
    second = _png(out / "planes coronal.png")  # a space: the link must be URL-encoded
    outside = _png(tmp_path / "shared" / "error.png")
    summary = [
        {"metric": "TRE (mm)", "mean": 1.234, "std": 0.5, "frames": 97},
        {"metric": "MCD CT-CT (mm)", "mean": float("nan"), "std": None, "frames": 0},
    ]
    extra = Table(
        ["method", "HD | CT-US"],
        [["ours", "3.1 ± 0.4"], ["pretrained", "4.0 ± 0.9"]],
        caption="Table 2. Ablation",
        notes=["mean ± std over 5 folds"],
    )
    sections = [
        ("Method", "One-cycle **transfer learning**, then every frame.\n\n- a\n- b `code`"),
        ("Timing", "| step | s |\n| --- | ---: |\n| adaptation | 41.2 |"),
    ]
    stamp = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    md_path, html_path = write_report(
        out,
        title="kidneyreg demo <seed 1>",
        command="kidneyreg demo --out demo",
        summary_table=summary,
        tables=[extra],
        figures=[
            ("Stacks over time", first),
            ("Planes (coronal)", second),
            ("Error vs breathing", outside),
            ("Never drawn", out / "missing.png"),
        ],
        sections=sections,
        generated=stamp,
    )
    assert md_path == out / "report.md" and html_path == out / "report.html"
    md = md_path.read_text(encoding="utf-8")
    page = html_path.read_text(encoding="utf-8")
    for text in (md, page):
        assert "kidneyreg demo --out demo" in text
        assert "2026-01-02 03:04:05 UTC" in text
        assert __version__ in text
        assert "Never drawn" in text and "missing.png" in text
    # Markdown: relative links to the existing figures only.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert [unquote(link) for link in links] == [
        "figures/stacks.png",
        "planes coronal.png",
        "../shared/error.png",
    ]
    assert "| TRE (mm) | 1.23 | 0.50 | 97 |" in md
    assert "| MCD CT-CT (mm) | n/a | n/a | 0 |" in md
    assert "HD \\| CT-US" in md
    # HTML: well formed, every image exists relative to the page, nothing external.
    checker = _parse(page)
    assert len(checker.images) == 3
    for src in checker.images:
        assert (out / unquote(src)).resolve().is_file()
    assert "script" not in checker.tags and "link" not in checker.tags
    assert not any(re.match(r"^[a-z]+://", ref) for ref in checker.images + checker.links)
    assert "&lt;seed 1&gt;" in page and "<seed 1>" not in page
    assert page.count("<table>") == 3  # summary, extra table, the markdown table of a section
    assert '<td class="num">41.2</td>' in page
    assert "<strong>transfer learning</strong>" in page and "<code>code</code>" in page
    assert "Figure 3." in page and "Figure 4." not in page


def test_report_name_and_overwrite(tmp_path: Path) -> None:
    md, page = write_report(tmp_path, title="t", command="c", name="benchmark")
    assert md.name == "benchmark.md" and page.name == "benchmark.html"
    _parse(page.read_text(encoding="utf-8"))
    write_report(tmp_path, title="second", command="c2", name="benchmark")
    assert "second" in md.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmark.html", "benchmark.md"]
    with pytest.raises(ValueError, match="name"):
        write_report(tmp_path, title="t", command="c", name="../escape")


def test_table_formatting() -> None:
    table = Table.from_records(
        [{"a": 1.0, "flag": True}, {"a": np.float32(2.5), "b": "x\ny"}], float_format="{:.1f}"
    )
    assert table.columns == ["a", "flag", "b"]
    assert [table.cell_text(v) for v in table.rows[1]] == ["2.5", "n/a", "x y"]
    assert table.cell_text(True) == "yes" and table.cell_text(float("inf")) == "n/a"
    md = table.to_markdown().splitlines()
    assert md[1] == "| ---: | --- | --- |"  # numbers right-aligned
    _parse(table.to_html())
    with pytest.raises(ValueError, match="cells"):
        Table(["a", "b"], [[1]])


def test_markdown_subset() -> None:
    text = "\n".join(
        [
            "# Heading",
            "Text with <b>tags</b> & *emphasis* and [a link](results/table.csv).",
            "",
            "1. first",
            "2. second",
            "   continued",
            "",
            "```",
            "x < y && z",
            "```",
            "> quoted **bold**",
            "",
            "[bad](javascript:alert(1)) ![pic](fig.png)",
        ]
    )
    page = markdown_to_html(text, heading_offset=2)
    _parse(page)
    assert "<h3>Heading</h3>" in page
    assert "&lt;b&gt;tags&lt;/b&gt; &amp; <em>emphasis</em>" in page
    assert '<a href="results/table.csv">a link</a>' in page
    assert "<ol><li>first</li><li>second continued</li></ol>" in page
    assert "<pre><code>x &lt; y &amp;&amp; z</code></pre>" in page
    assert "<blockquote><p>quoted <strong>bold</strong></p></blockquote>" in page
    assert "javascript" not in page and "<p>bad" in page
    assert '<img src="fig.png" alt="pic">' in page
    # Underscores in names are not emphasis.
    assert "<em>" not in markdown_to_html("mcd_ctct and hd_ctus")

"""Reports: a markdown file and a self-contained HTML page from tables, text and figures.

:func:`write_report` writes ``<name>.md`` and ``<name>.html`` side by side (``report`` for
``kidneyreg demo``, ``benchmark`` for the benchmark). Both hold the title, when and with which
command and version they were made, the summary table and further tables, text sections and the
figures, referenced by paths relative to the report (so the folder can be moved or zipped as a
whole). The HTML page needs nothing else: inline CSS, no scripts, fonts or remote resources.

Text sections are markdown. The HTML page renders the subset that reports need
(:func:`markdown_to_html`): headings, paragraphs, flat bullet and numbered lists, pipe tables,
fenced code blocks, block quotes, inline code, bold, italic, links and images. Everything else is
shown as plain text, and all text is HTML-escaped, so no input can inject markup.
"""

from __future__ import annotations

import html
import math
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from kidneyreg import __version__
from kidneyreg.io.atomic import atomic_write_text

__all__ = ["Table", "markdown_to_html", "write_report"]

_MISSING_CELL = "n/a"
_SAFE_SCHEMES = ("http", "https", "mailto")
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d1d1f;
       margin: 0; background: #fafafa; line-height: 1.5; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { font-size: 1.1em; }
.meta { color: #555; font-size: 0.92em; }
pre { background: #f3f3f3; padding: 10px 12px; overflow-x: auto; border-radius: 4px; }
code { font-family: Menlo, Consolas, monospace; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; }
th { background: #f0f0f0; }
tbody tr:nth-child(even) { background: #fafafa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.caption { font-weight: 600; margin-bottom: 0.2em; }
.notes { color: #555; font-size: 0.88em; margin-top: -0.8em; }
figure { margin: 1.4em 0; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
figcaption { color: #333; font-size: 0.93em; margin-top: 0.4em; }
.missing { color: #a33; }
blockquote { border-left: 4px solid #ddd; margin: 0.8em 0; padding: 0.1em 1em; color: #444; }
footer { max-width: 1180px; margin: 0 auto; padding: 12px 32px; color: #666; font-size: 0.85em; }
""".strip()


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


@dataclass
class Table:
    """A small table for reports (no pandas needed).

    Attributes:
        columns: Column headers.
        rows: One list of cells per row (numbers, strings, None); as many cells as columns.
        caption: Shown above the table.
        notes: Footnotes shown below the table.
        float_format: Format of float cells (``str.format`` syntax); NaN and None show as n/a.

    Raises:
        ValueError: A row whose length differs from the number of columns.

    Example:
        >>> table = Table.from_records([{"metric": "TRE (mm)", "mean": 1.234}])
        >>> print(table.to_markdown())
        | metric | mean |
        | --- | ---: |
        | TRE (mm) | 1.23 |
    """

    columns: list[str]
    rows: list[list[Any]]
    caption: str | None = None
    notes: list[str] = field(default_factory=list)
    float_format: str = "{:.2f}"

    def __post_init__(self) -> None:
        self.columns = [str(c) for c in self.columns]
        self.rows = [list(row) for row in self.rows]
        for k, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(
                    f"table row {k} has {len(row)} cells for {len(self.columns)} columns"
                )
        self.notes = [str(n) for n in self.notes]

    @classmethod
    def from_records(
        cls,
        records: Sequence[Mapping[str, Any]],
        *,
        columns: Sequence[str] | None = None,
        caption: str | None = None,
        notes: Sequence[str] = (),
        float_format: str = "{:.2f}",
    ) -> Table:
        """A table from dictionaries, one per row; columns in first-seen key order by default.

        Example:
            >>> Table.from_records([{"a": 1}, {"a": 2, "b": "x"}]).rows
            [[1, None], [2, 'x']]
        """
        names: list[str] = list(columns) if columns is not None else []
        if columns is None:
            for record in records:
                names.extend(key for key in record if key not in names)
        rows = [[record.get(name) for name in names] for record in records]
        return cls(names, rows, caption, list(notes), float_format)

    def cell_text(self, value: Any) -> str:
        """The text of one cell: floats formatted, None and NaN as ``n/a``.

        Example:
            >>> Table(["x"], [], float_format="{:.1f}").cell_text(2.345)
            '2.3'
        """
        if value is None:
            return _MISSING_CELL
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else "no"
        if isinstance(value, (float, np.floating)):
            return (
                _MISSING_CELL
                if not math.isfinite(float(value))
                else self.float_format.format(value)
            )
        return " ".join(str(value).split())  # one line: newlines would break a markdown row

    def _numeric_columns(self) -> list[bool]:
        return [
            bool(self.rows)
            and all(_is_number(row[i]) or row[i] is None for row in self.rows)
            and any(_is_number(row[i]) for row in self.rows)
            for i in range(len(self.columns))
        ]

    def to_markdown(self) -> str:
        """The table as a GitHub-flavoured markdown pipe table (caption and notes around it)."""

        def cell(text: str) -> str:
            return text.replace("|", "\\|")

        numeric = self._numeric_columns()
        lines = []
        if self.caption:
            lines += [f"**{self.caption}**", ""]
        lines.append("| " + " | ".join(cell(c) for c in self.columns) + " |")
        lines.append("| " + " | ".join("---:" if n else "---" for n in numeric) + " |")
        for row in self.rows:
            lines.append("| " + " | ".join(cell(self.cell_text(v)) for v in row) + " |")
        if self.notes:
            lines.append("")
            lines += [f"{note}  " for note in self.notes]
        return "\n".join(lines)

    def to_html(self) -> str:
        """The table as HTML (cells escaped; inline markdown such as ``**x**`` rendered)."""
        numeric = self._numeric_columns()
        parts = []
        if self.caption:
            parts.append(f'<p class="caption">{_inline(self.caption)}</p>')
        parts.append("<table>")
        align = [' class="num"' if n else "" for n in numeric]
        head = "".join(
            f"<th{a}>{_inline(c)}</th>" for c, a in zip(self.columns, align, strict=True)
        )
        parts.append(f"<thead><tr>{head}</tr></thead>")
        parts.append("<tbody>")
        for row in self.rows:
            cells = "".join(
                f"<td{a}>{_inline(self.cell_text(v))}</td>" for v, a in zip(row, align, strict=True)
            )
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</tbody></table>")
        if self.notes:
            notes = "<br>".join(_inline(note) for note in self.notes)
            parts.append(f'<p class="notes">{notes}</p>')
        return "\n".join(parts)


def _as_table(table: Table | Sequence[Mapping[str, Any]]) -> Table:
    if isinstance(table, Table):
        return table
    return Table.from_records(table)


# ----------------------------------------------------------------------------------------------
# Markdown subset -> HTML
# ----------------------------------------------------------------------------------------------

_CODE_SPAN = re.compile(r"(`[^`]+`)")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_ITALIC = re.compile(r"(?<![*\w])\*(?=\S)([^*]+?)(?<=\S)\*(?![*\w])")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^[-*+]\s+(.*)$")
_NUMBERED = re.compile(r"^\d+[.)]\s+(.*)$")
_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def _safe_url(url: str) -> str | None:
    """The URL if it is relative or uses a harmless scheme, else None (e.g. ``javascript:``)."""
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", html.unescape(url))
    if scheme and scheme.group(1).lower() not in _SAFE_SCHEMES:
        return None
    return url


def _inline_plain(escaped: str) -> str:
    """Images, links, bold and italic in already escaped text."""

    def image(match: re.Match[str]) -> str:
        url = _safe_url(match.group(2))
        return match.group(1) if url is None else f'<img src="{url}" alt="{match.group(1)}">'

    def link(match: re.Match[str]) -> str:
        url = _safe_url(match.group(2))
        return match.group(1) if url is None else f'<a href="{url}">{match.group(1)}</a>'

    text = _IMAGE.sub(image, escaped)
    text = _LINK.sub(link, text)
    text = _BOLD.sub(r"<strong>\1</strong>", text)
    return _ITALIC.sub(r"<em>\1</em>", text)


def _inline(text: str) -> str:
    """Inline markdown of one line of text as HTML (everything escaped first)."""
    parts = []
    for piece in _CODE_SPAN.split(text):
        if len(piece) > 1 and piece.startswith("`") and piece.endswith("`"):
            parts.append(f"<code>{html.escape(piece[1:-1])}</code>")
        else:
            parts.append(_inline_plain(html.escape(piece)))
    return "".join(parts)


def _row_cells(line: str) -> list[str]:
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    cells = re.split(r"(?<!\\)\|", body)
    return [cell.strip().replace("\\|", "|") for cell in cells]


def _pipe_table(header: list[str], separator: str, body: list[list[str]]) -> str:
    aligns = []
    for spec in _row_cells(separator):
        if spec.startswith(":") and spec.endswith(":"):
            aligns.append(' style="text-align:center"')
        elif spec.endswith(":"):
            aligns.append(' class="num"')
        else:
            aligns.append("")
    aligns += [""] * (len(header) - len(aligns))
    head = "".join(f"<th{aligns[i]}>{_inline(c)}</th>" for i, c in enumerate(header))
    rows = []
    for cells in body:
        cells = (cells + [""] * len(header))[: len(header)]
        rows.append(
            "<tr>"
            + "".join(f"<td{aligns[i]}>{_inline(c)}</td>" for i, c in enumerate(cells))
            + "</tr>"
        )
    return (
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table>"
    )


def markdown_to_html(text: str, *, heading_offset: int = 0) -> str:
    """Render the markdown subset of reports as HTML (all text escaped).

    Supported: ATX headings (``#``..``######``, shifted down by ``heading_offset``, at most
    ``h6``), paragraphs, flat ``-``/``*``/``+`` bullet and ``1.`` numbered lists (indented lines
    continue an item), pipe tables with a ``---`` separator row (``---:`` right-aligns), fenced
    code blocks, ``>`` block quotes, inline code, ``**bold**``, ``*italic*``, links and images
    (relative or http/https/mailto URLs only). Anything else is kept as escaped text.

    Args:
        text: Markdown.
        heading_offset: Added to every heading level (2 makes ``#`` an ``h3``).

    Returns:
        HTML fragment.

    Example:
        >>> markdown_to_html("# Title\\n\\nSome **bold** <text>.")
        '<h1>Title</h1>\\n<p>Some <strong>bold</strong> &lt;text&gt;.</p>'
    """
    lines = text.splitlines()
    out: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append("<p>" + _inline(" ".join(paragraph)) + "</p>")
            paragraph.clear()

    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            flush()
            code: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                code.append(lines[i])
                i += 1
            out.append("<pre><code>" + html.escape("\n".join(code)) + "</code></pre>")
            i += 1  # the closing fence (or the end of the text)
            continue
        if not stripped:
            flush()
            i += 1
            continue
        heading = _HEADING.match(stripped)
        if heading:
            flush()
            level = min(6, len(heading.group(1)) + max(0, heading_offset))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            i += 1
            continue
        if (
            stripped.startswith("|")
            and i + 1 < len(lines)
            and _SEPARATOR.match(lines[i + 1].strip())
        ):
            flush()
            header = _row_cells(stripped)
            separator = lines[i + 1].strip()
            i += 2
            body = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                body.append(_row_cells(lines[i]))
                i += 1
            out.append(_pipe_table(header, separator, body))
            continue
        if stripped.startswith(">"):
            flush()
            quoted = []
            while i < len(lines) and lines[i].strip().startswith(">"):
                quoted.append(lines[i].strip()[1:].strip())
                i += 1
            out.append(
                "<blockquote>"
                + markdown_to_html("\n".join(quoted), heading_offset=heading_offset)
                + "</blockquote>"
            )
            continue
        for pattern, tag in ((_BULLET, "ul"), (_NUMBERED, "ol")):
            if pattern.match(stripped):
                flush()
                items: list[str] = []
                while i < len(lines):
                    current = lines[i]
                    item = pattern.match(current.strip())
                    indented = current[:1] in (" ", "\t")
                    if item and (not indented or not items):
                        items.append(item.group(1))
                    elif items and indented and current.strip():
                        items[-1] += " " + current.strip()  # continuation (nesting is flattened)
                    else:
                        break
                    i += 1
                out.append(
                    f"<{tag}>" + "".join(f"<li>{_inline(it)}</li>" for it in items) + f"</{tag}>"
                )
                break
        else:
            paragraph.append(stripped)
            i += 1
    flush()
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def _relative_url(path: Path, base: Path) -> str:
    relative = os.path.relpath(path.absolute(), base.absolute())
    return quote(Path(relative).as_posix())


def _provenance() -> str:
    return (
        f"kidneyreg {__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}"
    )


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    command: str,
    summary_table: Table | Sequence[Mapping[str, Any]] | None = None,
    figures: Sequence[tuple[str, str | Path]] = (),
    sections: Sequence[tuple[str, str]] = (),
    tables: Sequence[Table] = (),
    name: str = "report",
    generated: datetime | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>.md`` and ``<name>.html`` into ``out_dir``, atomically.

    Layout: title; when, by which kidneyreg version and with which command the report was made;
    "Summary" (``summary_table``) and the further ``tables``; the ``sections``; "Figures"
    (numbered, with captions); a provenance footer. Figures are linked by their path relative to
    ``out_dir``; a figure whose file does not exist is not linked but listed as missing, so the
    report never shows a broken image.

    Args:
        out_dir: Folder of the report (created when missing); figures should live in it.
        title: Report title.
        command: The command line that produced the report (shown verbatim).
        summary_table: A :class:`Table`, or records (one dict per row).
        figures: ``(caption, path)`` pairs, in order.
        sections: ``(heading, markdown text)`` pairs; use ``###`` for sub-headings inside.
        tables: Further tables, after the summary.
        name: File name stem (``report``, ``benchmark``...).
        generated: Timestamp to print; default now (UTC).

    Returns:
        ``(markdown path, HTML path)``.

    Example:
        >>> write_report("out", title="kidneyreg demo", command="kidneyreg demo --out out",
        ...              summary_table=[{"metric": "TRE (mm)", "mean": 1.2}],
        ...              figures=[("Per-frame error", "out/error.png")])  # doctest: +SKIP
        (PosixPath('out/report.md'), PosixPath('out/report.html'))
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"name must be a plain file name stem, got {name!r}")
    folder = Path(out_dir)
    when = (generated or datetime.now(timezone.utc)).astimezone(timezone.utc)
    stamp = when.strftime("%Y-%m-%d %H:%M:%S UTC")
    all_tables = ([] if summary_table is None else [_as_table(summary_table)]) + list(tables)
    present: list[tuple[int, str, str]] = []  # (number, caption, url)
    missing: list[tuple[str, str]] = []
    for caption, path in figures:
        figure_path = Path(path)
        if figure_path.is_file():
            present.append((len(present) + 1, caption, _relative_url(figure_path, folder)))
        else:
            missing.append((caption, figure_path.name))

    md: list[str] = [f"# {title}", "", f"*Generated {stamp} by kidneyreg {__version__} with:*", ""]
    md += ["```bash", command, "```", ""]
    page: list[str] = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">Generated {html.escape(stamp)} by kidneyreg {html.escape(__version__)}'
        " with:</p>",
        f"<pre><code>{html.escape(command)}</code></pre>",
    ]
    if all_tables:
        md += ["## Summary", ""]
        page.append("<h2>Summary</h2>")
        for table in all_tables:
            md += [table.to_markdown(), ""]
            page.append(table.to_html())
    for heading, text in sections:
        md += [f"## {heading}", "", text.strip(), ""]
        page.append(f"<h2>{_inline(heading)}</h2>")
        page.append(markdown_to_html(text, heading_offset=1))
    if present or missing:
        md += ["## Figures", ""]
        page.append("<h2>Figures</h2>")
        for number, caption, url in present:
            alt = caption.replace("[", "(").replace("]", ")")
            md += [f"![{alt}]({url})", "", f"*Figure {number}. {caption}*", ""]
            page.append(
                f'<figure><a href="{html.escape(url)}"><img src="{html.escape(url)}" '
                f'alt="{html.escape(caption)}"></a>'
                f"<figcaption><strong>Figure {number}.</strong> {_inline(caption)}</figcaption>"
                "</figure>"
            )
        for caption, filename in missing:
            md += [f"*Figure not available: {caption} ({filename} was not written).*", ""]
            page.append(
                f'<p class="missing">Figure not available: {_inline(caption)} '
                f"({html.escape(filename)} was not written).</p>"
            )
    provenance = _provenance()
    md += ["---", "", f"*{provenance}; command: `{command}`*", ""]
    document = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="generator" content="kidneyreg {html.escape(__version__)}">',
            f"<title>{html.escape(title)}</title>",
            f"<style>\n{_CSS}\n</style>",
            "</head>",
            "<body>",
            "<main>",
            *page,
            "</main>",
            f"<footer>{html.escape(provenance)}; generated {html.escape(stamp)}; command: "
            f"<code>{html.escape(command)}</code></footer>",
            "</body>",
            "</html>",
            "",
        ]
    )
    md_path = atomic_write_text(folder / f"{name}.md", "\n".join(md))
    html_path = atomic_write_text(folder / f"{name}.html", document)
    return md_path, html_path

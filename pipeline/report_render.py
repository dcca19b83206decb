"""The report's renderer: blocks (headings, paragraphs, tables, images, the summary card) written
twice, as Markdown with images beside it and as one self-contained HTML page with images inlined.

The sections themselves live in :mod:`pipeline.stages.report`; this module knows nothing of runs.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from pipeline.summary import Summary

OUTCOMES = ("PASS", "FAIL", "INCONCLUSIVE")  # table cells holding one of these are coloured
STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}
td:first-child{text-align:left}th{background:#eee}img{max-width:100%;border:1px solid #ddd}
.PASS,.INCONCLUSIVE,.FAIL{font-weight:bold}.PASS{color:#1a7f37}.FAIL{color:#c62828}.INCONCLUSIVE{color:#9a6700}
.card{border:2px solid #bbb;border-radius:8px;padding:1em 1.2em;margin:1em 0 2em}
.card.verdict-pass{border-color:#1a7f37;background:#f3faf4}.card.verdict-fail{border-color:#c62828;background:#fdf3f3}
.card.verdict-inconclusive{border-color:#d4a017;background:#fffaeb}.card.verdict-none{background:#f6f6f6}
.badge{display:inline-block;color:#fff;font-weight:bold;font-size:1.5em;padding:.15em .6em;border-radius:6px;
margin-right:.6em}.badge.verdict-pass{background:#1a7f37}.badge.verdict-fail{background:#c62828}
.badge.verdict-inconclusive{background:#d4a017;color:#222}.badge.verdict-none{background:#777}
.card img{border:none;background:#fff}.chip{display:inline-block;border-radius:4px;padding:1px 6px;margin:2px;
font-size:.85em;border:1px solid}.chip.pass{color:#1a7f37;border-color:#1a7f37}
.chip.fail{color:#c62828;border-color:#c62828}.chip.inconclusive{color:#9a6700;border-color:#d4a017}
.card code{background:#fff;border:1px solid #ddd;padding:2px 4px;display:inline-block;margin:2px 0;
font-size:.85em;white-space:pre-wrap;word-break:break-all}.cost{color:#555;font-size:.9em}
.note{color:#444;font-size:.92em}
"""


class Doc:
    """Sections rendered twice: Markdown (images as files) and HTML (images inlined)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[tuple[str, object]] = []

    def heading(self, text: str) -> None:
        """A section heading (``##``)."""
        self.blocks.append(("h2", text))

    def para(self, text: str) -> None:
        """A paragraph; ``**bold**`` and ``` `code` ``` are kept in both forms."""
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        """A table; floats shown with four significant digits, None as ``-``."""
        self.blocks.append(("table", (header, [[fmt(c) for c in r] for r in rows])))

    def image(self, path: Path, alt: str) -> None:
        """A PNG written beside the report (inlined in the HTML)."""
        self.blocks.append(("img", (path, alt)))

    def card(self, summary: Summary, chart: Path | None, notes: list[str]) -> None:
        """The summary card: verdict in its colour, headline chart, every gate, next steps, notes."""
        self.blocks.append(("card", (summary, chart, notes)))

    def images(self) -> list[Path]:
        """Every image the report shows, once each."""
        found = [v[0] for k, v in self.blocks if k == "img"] + [v[1] for k, v in self.blocks if k == "card"]
        return [p for p in dict.fromkeys(found) if p is not None]

    def markdown(self) -> str:
        """The report as Markdown."""
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "h2":
                out += [f"## {value}", ""]
            elif kind == "p":
                out += [str(value), ""]
            elif kind == "table":
                header, rows = value
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                path, alt = value
                out += [f"![{alt}]({path.name})", ""]
            elif kind == "card":
                out += _card_markdown(*value)
        return "\n".join(out)

    def html(self) -> str:
        """The report as one HTML page, images inlined."""
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title><style>{STYLE}</style>",
            f"</head><body><h1>{html.escape(self.title)}</h1>",
        ]
        for kind, value in self.blocks:
            if kind == "h2":
                parts.append(f"<h2>{html.escape(str(value))}</h2>")
            elif kind == "p":
                parts.append(f"<p>{inline(str(value))}</p>")
            elif kind == "table":
                header, rows = value
                parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                for r in rows:
                    cells = "".join(
                        f"<td class='{c if c in OUTCOMES else ''}'>{html.escape(c)}</td>" for c in r
                    )
                    parts.append(f"<tr>{cells}</tr>")
                parts.append("</table>")
            elif kind == "img":
                path, alt = value
                parts.append(f"<p>{_img(path, alt)}</p>")
            elif kind == "card":
                parts.append(_card_html(*value))
        parts.append("</body></html>")
        return "\n".join(parts)


def fmt(v: object) -> str:
    """A table cell: floats with four significant digits, None as ``-``."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def with_interval(value: object, interval: list | None) -> str:
    """A figure with its interval, e.g. ``0.963 [0.85, 1.09]``."""
    if not isinstance(value, float):
        return fmt(value)
    return f"{value:.4g}" + (f" [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "")


def inline(text: str) -> str:
    """Escaped HTML with ``**bold**`` and ``` `code` ``` spans."""
    out = html.escape(text)
    while out.count("**") >= 2:
        out = out.replace("**", "<b>", 1).replace("**", "</b>", 1)
    while out.count("`") >= 2:
        out = out.replace("`", "<code>", 1).replace("`", "</code>", 1)
    return out


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _verdict_word(s: Summary) -> str:
    return "NO LIMITS" if s.verdict == "none" else s.verdict.upper()


def _card_markdown(s: Summary, chart: Path | None, notes: list[str]) -> list[str]:
    out = [
        f"**Acceptance: {_verdict_word(s)}** ({s.final} vs dense) {s.verdict_line().split(': ', 1)[-1]}",
        "",
    ]
    out += [f"- {f.text()}" + (f" ({f.where})" if f.where else "") for f in s.headline()]
    out += ["", f"![headline figures against their limits]({chart.name})" if chart else "", ""]
    if s.steps:
        out += ["**What to do next**", ""]
        out += [f"- {step.gate}: {step.why}: `{step.command}` ({step.cost})" for step in s.steps]
        out.append("")
    out += [*notes, ""]
    return out


def _card_html(s: Summary, chart: Path | None, notes: list[str]) -> str:
    cls = f"verdict-{s.verdict}"
    detail = html.escape(f"{s.final} vs dense: {s.verdict_line().split(': ', 1)[-1]}")
    badge = f"<span class='badge {cls}'>{_verdict_word(s)}</span>"
    parts = [f"<section class='card {cls}' id='summary'>", f"<div>{badge}<span>{detail}</span></div>"]
    if chart is not None:
        parts.append(f"<p>{_img(chart, 'headline figures against their limits')}</p>")
    chips = "".join(
        f"<span class='chip {c.outcome}'>{c.outcome.upper()} {html.escape(c.name)}"
        + (f" {c.measured:.4g} {html.escape(c.direction)} {c.limit:g}" if c.measured is not None else "")
        + "</span>"
        for c in s.checks
    )
    if chips:
        parts.append(f"<p>{chips}</p>")
    if s.steps:
        parts.append("<h3>What to do next</h3><ul>")
        for step in s.steps:
            parts.append(f"<li><b>{html.escape(step.gate)}</b>: {html.escape(step.why)}<br>"
                         f"<code>{html.escape(step.command)}</code><br>"
                         f"<span class='cost'>{html.escape(step.cost)}</span></li>")  # fmt: skip
        parts.append("</ul>")
    parts += [f"<p class='note'>{inline(n)}</p>" for n in notes]
    parts.append("</section>")
    return "\n".join(parts)

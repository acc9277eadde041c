"""Page assembly: sections and blocks -> one self-contained HTML page.

Self-contained means a reader can mail the file: every image is a ``data:image/png;base64`` URI, the style
sheet is inline, there is no script, and a Content-Security-Policy (``default-src 'none'``, images from
``data:`` only, inline styles) makes a browser refuse anything else. Every piece of text that came from a
file is escaped with :func:`html.escape`; markdown is rendered by a small escaping subset (headings, lists,
tables, paragraphs, code, emphasis) -- raw HTML in a markdown file is shown as text, never interpreted.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
import struct
from collections.abc import Iterator

from medcl.report.blocks import Block, Code, Facts, Figure, Group, Markdown, Section, Table
from medcl.report.readers import short_number

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#d9dee7;--bg2:#f5f7fa;--accent:#2456a6;--warn:#fff4d6;--warnl:#e0b43a}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg)}
main,header,nav,footer,.problems{max-width:1120px;margin:0 auto;padding:0 24px}
header{padding-top:20px;border-bottom:1px solid var(--line)}
h1{font-size:24px;margin:0 0 4px}h2{font-size:20px;margin:32px 0 8px;padding-top:8px;border-top:2px solid var(--line)}
h3{font-size:15px;margin:20px 0 6px}h4,h5,h6{font-size:14px;margin:14px 0 4px}
.meta{color:var(--muted);margin:0 0 14px}
.kind{display:inline-block;font-size:12px;font-weight:600;padding:1px 8px;border-radius:10px;background:#e4ecfa;
 color:var(--accent);vertical-align:middle;margin-left:8px}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
nav{margin-top:14px}nav ol{padding-left:20px;margin:4px 0}nav li{margin:2px 0}
nav .blocks{color:var(--muted);font-size:12.5px}
.problems{margin-top:16px}
.problems div{background:var(--warn);border-left:4px solid var(--warnl);padding:8px 14px;border-radius:4px}
.problems ul,.section-problems ul{margin:4px 0;padding-left:20px}
.section-problems{background:var(--warn);border-left:4px solid var(--warnl);padding:6px 12px;border-radius:4px}
.ok{color:#2e7d32}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:4px 0 8px;font-size:13px}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
th{background:var(--bg2);font-weight:600}tbody tr:nth-child(even){background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.facts th{min-width:150px;font-weight:500;color:var(--muted);background:none}
.facts-row{display:flex;flex-wrap:wrap;gap:0 32px;align-items:flex-start}.facts-cell{max-width:100%}
.note{color:var(--muted);font-size:12.5px;margin:0 0 8px}
details{margin:6px 0 10px}summary{cursor:pointer;font-weight:600}
pre{background:var(--bg2);border:1px solid var(--line);padding:10px;overflow:auto;max-height:560px;font-size:12.5px}
code{background:var(--bg2);padding:0 3px;border-radius:3px;font-size:12.5px}
figure{margin:8px 0 14px}figure img{max-width:100%;height:auto;border:1px solid var(--line)}
figcaption{color:var(--muted);font-size:12.5px}
.md table{font-size:13px}.md p,.md ul{margin:6px 0}
.child{margin-left:0}
footer{color:var(--muted);font-size:12px;border-top:1px solid var(--line);margin-top:36px;padding-top:10px;
 padding-bottom:30px}
"""

esc = html.escape


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a PNG's IHDR chunk."""
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_INT = re.compile(r"^[+-]?\d+$")


def format_cell(text: str) -> tuple[str, bool]:
    """``(shown text, numeric)``: numbers as :func:`~medcl.report.readers.short_number` shows them, other text
    unchanged."""
    t = text.strip()
    if _INT.match(t):
        return t, True
    try:
        v = float(t)
    except ValueError:
        return t, False
    return short_number(v), True


# ---- markdown (escaping subset) -------------------------------------------------------------------------

def _inline(text: str) -> str:
    s = esc(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?![*\w])", r"<em>\1</em>", s)


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _md_table(lines: list[str]) -> str:
    """A pipe table; the first row is the header when the second is a ``|---|:--:|`` separator."""
    has_head = len(lines) > 1 and re.match(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$", lines[1]) is not None
    rows = [_md_cells(x) for x in ([lines[0], *lines[2:]] if has_head else lines)]
    head = "<thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in rows[0]) + "</tr></thead>" if has_head else ""
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                   for r in (rows[1:] if has_head else rows))
    return f'<div class="scroll"><table>{head}<tbody>{body}</tbody></table></div>'


def markdown_html(text: str, heading_offset: int = 2) -> str:
    """Headings (shifted down by ``heading_offset``), ``-``/``*`` lists, ``|`` tables, fenced code, paragraphs."""
    lines, out, i = text.splitlines(), [], 0
    special = re.compile(r"^\s*(#{1,6}\s|[-*+]\s|\||```)")
    while i < len(lines):
        s = lines[i].strip()
        if not s:
            i += 1
        elif m := re.match(r"^(#{1,6})\s+(.*)$", s):
            level = min(6, len(m.group(1)) + heading_offset)
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif s.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append(f"<pre>{esc(chr(10).join(lines[i + 1:j]))}</pre>")
            i = j + 1
        elif s.startswith("|"):
            j = i
            while j < len(lines) and lines[j].strip().startswith("|"):
                j += 1
            out.append(_md_table([x.strip() for x in lines[i:j]]))
            i = j
        elif re.match(r"^[-*+]\s", s):
            items = []
            while i < len(lines) and re.match(r"^\s*[-*+]\s", lines[i]):
                items.append(re.sub(r"^\s*[-*+]\s+", "", lines[i]))
                i += 1
                while i < len(lines) and lines[i].startswith("  ") and lines[i].strip() and not special.match(lines[i]):
                    items[-1] += " " + lines[i].strip()
                    i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in items) + "</ul>")
        else:
            j = i
            while j < len(lines) and lines[j].strip() and not special.match(lines[j]):
                j += 1
            out.append(f"<p>{_inline(' '.join(x.strip() for x in lines[i:j]))}</p>")
            i = j
    return "\n".join(out)


# ---- blocks ----------------------------------------------------------------------------------------------

class _Ids:
    """Unique, safe anchor ids (never derived from file text)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"


def _table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = []
        for c in r:
            shown, numeric = format_cell(c)
            title = f' title="{esc(c)}"' if shown != c.strip() else ""
            cells.append(f'<td class="num"{title}>{esc(shown)}</td>' if numeric else f"<td>{esc(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _wrap(title: str, inner: str, collapsed: bool, anchor: str) -> str:
    if collapsed:
        return f'<details id="{anchor}"><summary>{esc(title)}</summary>{inner}</details>'
    return f'<h3 id="{anchor}">{esc(title)}</h3>{inner}'


def block_html(b: Block, anchor: str) -> str:
    """One block as HTML; every file-derived string escaped."""
    if isinstance(b, Facts):
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in b.rows)
        return _wrap(b.title, f'<div class="scroll"><table class="facts"><tbody>{rows}</tbody></table></div>',
                     False, anchor)
    if isinstance(b, Table):
        note = f'<p class="note">{esc(b.note)}</p>' if b.note else ""
        return _wrap(b.title, _table_html(b.header, b.rows) + note, b.collapsed, anchor)
    if isinstance(b, Markdown):
        return _wrap(b.title, f'<div class="md">{markdown_html(b.text)}</div>', False, anchor)
    if isinstance(b, Code):
        return _wrap(b.title, f"<pre>{esc(b.text)}</pre>", b.collapsed, anchor)
    if isinstance(b, Figure):
        w, h = png_size(b.png)
        cap = f"<figcaption>{esc(b.caption)}</figcaption>" if b.caption else ""
        img = f'<img src="{data_uri(b.png)}" alt="{esc(b.title)}" width="{w}" height="{h}">'
        return _wrap(b.title, f"<figure>{img}{cap}</figure>", False, anchor)
    if isinstance(b, Group):
        inner = "".join(block_html(x, f"{anchor}-{i}") for i, x in enumerate(b.blocks))
        note = f'<p class="note">{esc(b.note)}</p>' if b.note else ""
        return _wrap(b.title, inner + note, b.collapsed, anchor)
    raise TypeError(f"unknown block {type(b).__name__}")


# ---- page ------------------------------------------------------------------------------------------------

def _figures(blocks: list[Block]) -> Iterator[Figure]:
    for b in blocks:
        if isinstance(b, Figure):
            yield b
        elif isinstance(b, Group):
            yield from _figures(b.blocks)


def count_images(root: Section) -> int:
    return sum(1 for s in root.walk() for _ in _figures(s.blocks))


def render_page(root: Section, version: str, generated: str | None = None) -> str:
    """The whole page for ``root`` and its child sections."""
    generated = generated or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    ids = _Ids()
    anchors: dict[int, tuple[str, list[str]]] = {}
    for s in root.walk():
        anchors[id(s)] = (ids("run-"), [ids("b-") for _ in s.blocks])

    def toc(s: Section) -> str:
        sid, bids = anchors[id(s)]
        blocks = " &middot; ".join(f'<a href="#{a}">{esc(b.title)}</a>' for a, b in zip(bids, s.blocks))
        kids = "".join(toc(c) for c in s.children)
        flag = f" &mdash; {len(s.problems)} problem(s)" if s.problems else ""
        return (f'<li><a href="#{sid}"><strong>{esc(s.title)}</strong></a> <span class="kind">{esc(s.label)}</span>'
                f'{flag}<div class="blocks">{blocks}</div>' + (f"<ol>{kids}</ol>" if kids else "") + "</li>")

    def section(s: Section) -> str:
        sid, bids = anchors[id(s)]
        parts = [f'<section class="run" id="{sid}"><h2>{esc(s.title)}<span class="kind">{esc(s.label)}</span></h2>']
        if s.problems:
            parts.append('<div class="section-problems"><strong>Problems noticed</strong><ul>'
                         + "".join(f"<li>{esc(p)}</li>" for p in s.problems) + "</ul></div>")
        row: list[str] = []  # consecutive key/value tables sit side by side
        for b, a in zip(s.blocks, bids):
            if isinstance(b, Facts):
                row.append(f'<div class="facts-cell">{block_html(b, a)}</div>')
                continue
            if row:
                parts.append(f'<div class="facts-row">{"".join(row)}</div>')
                row = []
            parts.append(block_html(b, a))
        if row:
            parts.append(f'<div class="facts-row">{"".join(row)}</div>')
        parts.append("</section>")
        return "".join(parts) + "".join(section(c) for c in s.children)

    every = [(s, p) for s in root.walk() for p in s.problems]
    if every:
        items = "".join(f'<li><a href="#{anchors[id(s)][0]}">{esc(s.title)}</a>: {esc(p)}</li>' for s, p in every)
        problems = f'<section class="problems" id="problems"><div><strong>Problems noticed ({len(every)})</strong>' \
                   f"<ul>{items}</ul></div></section>"
    else:
        problems = '<section class="problems" id="problems"><p class="ok">No problems noticed.</p></section>'
    n_runs = len(root.walk())
    n_img = count_images(root)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="generator" content="medcl report">',
        f"<title>medcl report: {esc(root.title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f'<header><h1>medcl report: {esc(root.title)}<span class="kind">{esc(root.label)}</span></h1>'
        f'<p class="meta">{esc(str(root.path))} &middot; {n_runs} run folder(s), {n_img} image(s) &middot; '
        f"generated {esc(generated)} by medcl {esc(version)}</p></header>",
        f'<nav><strong>Contents</strong><ol><li><a href="#problems">Problems noticed</a></li>{toc(root)}</ol></nav>',
        problems,
        f"<main>{section(root)}</main>",
        "<footer>A self-contained page: images are embedded as data URIs; no scripts and no external resources "
        "(the page's Content-Security-Policy forbids them). Runs record no patient fields and none are "
        "shown.</footer>",
        "</body></html>",
    ])

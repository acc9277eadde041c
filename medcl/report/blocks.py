"""What a report is made of: sections (one per run folder) holding an ordered list of blocks.

The section builders (:mod:`medcl.report.sections`) fill these plain dataclasses from the files of a run; the
page assembler (:mod:`medcl.report.html`) turns them into HTML. Nothing here knows about HTML or about run kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Facts:
    """A key/value table (run summary, environment...)."""

    title: str
    rows: list[tuple[str, str]]


@dataclass
class Table:
    """A table of cells (a CSV file, a per-step metric summary...).

    Attributes:
        header: column names.
        rows: cells as text; numbers are formatted by the page (see :func:`medcl.report.html.format_cell`).
        note: shown under the table (e.g. ``"first 200 of 3000 rows"``).
        collapsed: inside a closed ``<details>``.
    """

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    collapsed: bool = False


@dataclass
class Markdown:
    """A markdown file medcl wrote (``results.md``, ``summary.md``), rendered as escaped HTML."""

    title: str
    text: str


@dataclass
class Figure:
    """A PNG, embedded as a ``data:`` URI. ``png`` holds the file's bytes (checked to be a PNG)."""

    title: str
    png: bytes
    caption: str = ""


@dataclass
class Code:
    """Verbatim text (a resolved config as YAML), collapsible."""

    title: str
    text: str
    collapsed: bool = True


@dataclass
class Group:
    """Blocks shown together under one heading, optionally collapsed (e.g. the loss curves of 30 runs)."""

    title: str
    blocks: list[Block]
    collapsed: bool = True
    note: str = ""


Block = Facts | Table | Markdown | Figure | Code | Group


@dataclass
class Section:
    """One run folder.

    Attributes:
        title: heading (the folder's path relative to the report's root, or its name for the root).
        kind: run kind (``pretrain``, ``finetune``, ``label-efficiency``, ``mil``, ``wsi-tiles``,
            ``mil-encoder``, ``demo``, ``folder`` for an unrecognised folder with plots or tables).
        path: the folder.
        legacy: the kind was guessed from the files (a folder without ``record.json``, written before the
            run-folder contract); shown as "KIND (legacy)".
        blocks: what the page shows, in order.
        problems: things the reader should know (NaN losses, a leakage override, an unfinished run...).
        children: sections of the run folders inside this one.
        shown: names of the files (relative to ``path``) already shown, so the catch-all pass that embeds the
            remaining PNGs does not show them twice.
    """

    title: str
    kind: str
    path: Path
    legacy: bool = False
    blocks: list[Block] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    children: list[Section] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The kind as shown: ``pretrain``, or ``pretrain (legacy)`` when it was guessed from the files."""
        return f"{self.kind} (legacy)" if self.legacy else self.kind
    shown: set[str] = field(default_factory=set)

    def walk(self) -> list[Section]:
        """This section and every section below it, depth first."""
        out = [self]
        for c in self.children:
            out += c.walk()
        return out

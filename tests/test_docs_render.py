"""The docs render as written: every number in a page's Markdown survives into its HTML, and
nested lists are indented as Python-Markdown (what mkdocs uses) needs.

Two defects this catches were in docs/results.md: a wrapped line that began with ``785.`` became
an ordered list starting at 785 (the number vanished), and sub-bullets indented by two spaces were
flattened into their parent list."""

from __future__ import annotations

import html
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")
FENCE = re.compile(r"^\s*(```|~~~)")


def _extensions() -> tuple[list[str], dict[str, Any]]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    names: list[str] = []
    settings: dict[str, Any] = {}
    for item in config.get("markdown_extensions", []):
        if isinstance(item, dict):
            ((name, options),) = item.items()
            names.append(name)
            settings[name] = options or {}
        else:
            names.append(item)
    return names, settings


def _prose(text: str) -> list[tuple[int, str]]:
    """Numbered lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def _numbers(text: str) -> Counter[str]:
    """The numbers of the prose, less intended ordered-list markers (``N.`` after a blank line, or
    in an ordered list) and image alt texts; an ``N.`` that continues a paragraph or a bullet is
    counted: it is the defect."""
    found: Counter[str] = Counter()
    blank, ordered = True, False
    for _, line in _prose(text):
        item = re.match(r"^\s*\d+\.\s", line)
        if item and (blank or ordered):
            line = line[item.end() :]
            ordered = True
        elif re.match(r"^\s*[-*+]\s", line):
            ordered = False
        line = re.sub(r"!\[[^\]]*\]|\]\([^)]*\)|&#?\w+;", " ", line)  # alt texts, link targets, entities
        found.update(NUMBER.findall(line))
        blank = not line.strip()
    return found


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_number_in_the_markdown_appears_in_the_html(page: Path) -> None:
    markdown = pytest.importorskip("markdown")
    names, settings = _extensions()
    source = page.read_text(encoding="utf-8")
    rendered = html.unescape(
        re.sub(r"<[^>]+>", " ", markdown.markdown(source, extensions=names, extension_configs=settings))
    )
    written = _numbers(source)
    shown = Counter(NUMBER.findall(rendered))
    missing = [f"{page.name}: {number!r}" for number, count in written.items() if shown[number] < count]
    assert not missing, "numbers lost in rendering (a line starting with 'N.' becomes a list): " + "; ".join(
        missing[:10]
    )


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_nested_lists_are_indented_by_four_spaces(page: Path) -> None:
    """Python-Markdown nests a list only under four spaces: ``  - item`` under a bullet renders as
    a sibling, not a child."""
    bad = [
        f"{page.name}:{n}"
        for n, line in _prose(page.read_text(encoding="utf-8"))
        if re.match(r"^ {1,3}[-*+] ", line)
    ]
    assert not bad, "sub-list indented by fewer than 4 spaces: " + ", ".join(bad)

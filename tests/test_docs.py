"""Every relative link in README.md and docs/ resolves (a file, and a heading anchor where one
is named): a page moved or a heading renamed must not leave a newcomer at a dead link. README.md
stays a landing page: short, the two commands on its first screen, and a map that links every
page of docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = [line.lstrip("#").strip() for line in page.read_text().splitlines()
             if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code holds no links
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def section(page: Path, heading: str) -> str:
    """The text under one ``## heading``, up to the next heading of that level."""
    lines = page.read_text().splitlines()
    start = lines.index(f"## {heading}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


def dead_links(page: Path) -> list[str]:
    dead = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            dead.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            dead.append(target)
    return dead


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    assert dead_links(page) == [], f"{page.name} links to files or headings that do not exist"


def test_the_checker_finds_a_dead_link(tmp_path):
    page = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Real heading, (with) punctuation\n")
    page.write_text("[ok](b.md#real-heading-with-punctuation) [bad](b.md#gone) [none](c.md) "
                    "`[x](y)` [web](https://example.com)\n")
    assert dead_links(page) == ["b.md#gone", "c.md"]


README = ROOT / "README.md"
DOCS_MAP = "Documentation"  # README's section that links every page of docs/
LANDING_MAX_LINES = 200
FIRST_SCREEN = 40


def test_readme_is_a_landing_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= LANDING_MAX_LINES, (
        f"README.md has {len(lines)} lines: keep it a landing page and move the detail to docs/")
    first = "\n".join(lines[:FIRST_SCREEN])
    for command in ("make demo", "make test"):
        assert f"\n{command} " in first, f"`{command}` must stay on README's first screen"


def test_readme_maps_every_docs_page():
    text = re.sub(r"`[^`\n]*`", "", section(README, DOCS_MAP))
    mapped = {t.partition("#")[0] for t in LINK.findall(text)}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages - mapped == set(), f"README's '{DOCS_MAP}' map does not link these pages"

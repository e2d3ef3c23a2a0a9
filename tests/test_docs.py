"""The front page and the guides: every relative link goes to a file that is there, every #anchor to a heading of
that file (as GitHub names headings), and the README stays a front page (≤ 250 lines)."""

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
FENCE = re.compile(r"^( {4}|\t)")  # an indented block: commands and outputs, no links


def anchors(page: Path) -> set[str]:
    """GitHub's ids for the headings of `page`: lower case, punctuation dropped, spaces → '-', repeats numbered."""
    seen: dict[str, int] = {}
    ids = set()
    for line in page.read_text().splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if not heading:
            continue
        text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def links(page: Path) -> list[str]:
    return [
        target
        for line in page.read_text().splitlines()
        if not FENCE.match(line)
        for target in LINK.findall(line)
        if not re.match(r"[a-z]+://|mailto:", target)
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_anchor_rule_is_githubs():
    page = ROOT / "docs" / "benchmarks.md"
    assert "time-to-the-slides-7051-" in anchors(page)  # "Time to the slides' 70.51 %"


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move a section into docs/"
    assert all(any(f"docs/{name}" in line for line in lines) for name in ("training.md", "design.md", "results.md"))

"""README.md and docs/*.md: every relative link and image resolves, anchors name real headings, README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """Anchors of every heading of a markdown page (outside code blocks)."""
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", FENCE.sub("", page.read_text()), re.MULTILINE)}


def _links(page: Path) -> list[str]:
    """Relative link targets of a page (web and mail links left out)."""
    return [t for t in LINK.findall(_prose(page.read_text())) if not re.match(r"[a-z]+:", t)]


def test_slug_matches_github_for_the_headings_used():
    assert _slug("Security: Redis access, TLS and engine files") == "security-redis-access-tls-and-engine-files"
    assert _slug("The study's tables") == "the-studys-tables"
    assert _slug("Dependencies, and why") == "dependencies-and-why"


def test_link_finder_sees_links_and_images_but_not_code():
    page = "[a](x.md) ![b](img/y.png) `[c](z.md)` [w](https://example.org)\n```\n[d](q.md)\n```\n"
    assert [t for t in LINK.findall(_prose(page)) if not re.match(r"[a-z]+:", t)] == ["x.md", "img/y.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 12_000
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert "producer enqueue demo/images" in blocks[0] and "worker run" in blocks[0]
    assert "python -m pytest" in blocks[1]
    assert len(blocks[0].strip().splitlines()) == 1 and len(blocks[1].strip().splitlines()) == 1


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(ROOT / "README.md")}
    assert {p.resolve() for p in PAGES[1:]} <= linked


def test_docs_images_exist_and_stay_small():
    images = sorted((ROOT / "docs" / "img").glob("*.png"))
    assert images
    for image in images:
        assert image.stat().st_size < 200_000, image

"""Every link between the README and the pages under docs/ leads somewhere: the file exists, and a
`#section` names a heading of that page (as GitHub turns headings into anchors)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # a `# comment` in code is no heading
    return {anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def local_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", target)]


def test_anchors_are_made_as_github_makes_them():
    assert anchor("Segment-merged MoE (V4)") == "segment-merged-moe-v4"
    assert anchor("What the terminal shows during training") == "what-the-terminal-shows-during-training"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_link_leads_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in local_links(page):
        path, _, section = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (section and section not in anchors(linked)):
            broken.append(target)
    assert broken == []


def test_the_readme_links_every_page_of_the_docs():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in local_links(REPO / "README.md")}
    assert set((REPO / "docs").glob("*.md")) <= linked

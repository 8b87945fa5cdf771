"""Every relative link in README.md and docs/*.md reaches a file that exists, and an #anchor
reaches a heading of that file: moved or renamed pages must not leave dead links behind."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#+\s+(.+?)\s*$", re.MULTILINE)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def relative_links(page: Path) -> list[str]:
    found = LINK.findall(page.read_text())
    return [link for link in found if not re.match(r"[a-z][a-z0-9+.-]*:", link)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    dead = []
    for link in relative_links(page):
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            dead.append(link)
        elif fragment and target.suffix == ".md":
            anchors = {anchor(h) for h in HEADING.findall(target.read_text())}
            if fragment not in anchors:
                dead.append(link)
    assert dead == [], f"{page.name}: dead links"


def test_anchor_follows_github_rules() -> None:
    assert anchor("API reference: `refit.v1.Refit`") == "api-reference-refitv1refit"
    assert anchor("Retrain on your own classes") == "retrain-on-your-own-classes"


def test_readme_is_a_short_contract() -> None:
    """The README says what refit is and how to start; reference material lives in docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move reference into docs/"

"""Every relative link in the README and docs/ points at a file that exists and, with a #fragment, at a heading there.

The stage references moved from the README into docs/ (thirty-seventh session); this keeps the cross-links honest
when a heading is renamed or a page moves.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.*)")


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped (hyphens kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def heading_anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else HEADING.match(line)
        if match:
            base = anchor = github_anchor(match.group(1))
            repeat = 1
            while anchor in anchors:  # GitHub numbers repeated headings: x, x-1, x-2
                anchor = f"{base}-{repeat}"
                repeat += 1
            anchors.add(anchor)
    return anchors


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "launch" / "README.md"]


def broken_links(path: Path) -> list[str]:
    broken = []
    for match in LINK.finditer(path.read_text()):
        target = match.group(1)
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in heading_anchors(linked):
            broken.append(f"{target}: no heading with that anchor")
    return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_checker_finds_a_broken_anchor_and_file(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title (`x`)\n\n## Same\n\n## Same\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#title-x) [ok](a.md#same-1) [bad](a.md#nope) [gone](c.md) [web](https://x.org/#y)\n")
    assert broken_links(page) == ["a.md#nope: no heading with that anchor", "c.md: no such file"]


def test_readme_opens_with_the_ci_test_command() -> None:
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    quick_start = (ROOT / "README.md").read_text().split("## Pipeline")[0]
    assert ci_command in quick_start

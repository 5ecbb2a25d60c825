"""The documentation against the code: what docs/*.md and README.md show must be true."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from pydantic import BaseModel

from api.schemas import TaskOut, TaskSummaryOut

ROOT = Path(__file__).resolve().parents[2]
API_DOC = ROOT / "docs" / "api.md"
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def json_example_after(text: str, marker: str) -> dict[str, Any]:
    """The first ```json block after `marker` in `text`."""
    start = text.index(marker)
    for match in FENCE.finditer(text, start):
        if match.group(1) == "json":
            example: dict[str, Any] = orjson.loads(match.group(2))
            return example
    raise AssertionError(f"no json block after {marker!r}")


def field_names(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_the_documented_task_shapes_are_the_served_ones() -> None:
    text = API_DOC.read_text()
    task = json_example_after(text, "The task representation")
    assert set(task) == field_names(TaskOut)
    item = json_example_after(text, "### List items")
    assert set(item) == field_names(TaskSummaryOut)


# -- links and anchors ---------------------------------------------------------------------------

FENCE_LINE = re.compile(r"^\s{0,3}(```|~~~)")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        opened = FENCE_LINE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text as rendered (no markup), lower case,
    without punctuation other than `-` and `_`, each space a `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link reads as its text
    text = INLINE_CODE.sub(lambda m: m.group(2).strip(), text)
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis markers
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor; a repeated slug gets -1, -2, … as on GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for _, line in prose_lines(path.read_text()):
        heading = HEADING.match(line)
        if heading is None:
            continue
        slug = github_slug(heading.group(1))
        found.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code."""
    found = []
    for number, line in prose_lines(path.read_text()):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Authentication, tenants, roles", "authentication-tenants-roles"),
        ("Concurrency: the first writer wins", "concurrency-the-first-writer-wins"),
        ("`taskledger dev` and `task_status`", "taskledger-dev-and-task_status"),
        ("Upgrades and schema migrations", "upgrades-and-schema-migrations"),
        ("What it does *not* guarantee", "what-it-does-not-guarantee"),
        ("A [linked](x.md) heading", "a-linked-heading"),
        (
            "Performance: taskledger against Celery (p99)",
            "performance-taskledger-against-celery-p99",
        ),
        ("Ünïcode, too", "ünïcode-too"),
    ],
)
def test_github_slugs(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_repeated_headings_get_numbered_anchors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Logs\n\n```sh\n# Logs\n```\n\n## Logs\n\n### Logs\n")
    assert anchors(page) == {"logs", "logs-1", "logs-2"}


def test_links_in_code_are_not_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text('[a](a.md) and `[b](b.md)`\n\n```md\n[c](c.md)\n```\n![d](d.png "title")\n')
    assert links(page) == [(1, "a.md"), (6, "d.png")]


def broken_links(page: Path) -> list[str]:
    """What is wrong with each relative link of `page`: a file that does not exist, or an
    anchor no heading of the target has."""
    broken = []
    for number, target in links(page):
        if EXTERNAL.match(target):
            continue
        where = f"{page.name}:{number}: {target}"
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{where}: {path_part} does not exist")
        elif anchor and resolved.suffix != ".md":
            broken.append(f"{where}: an anchor into a file that is not markdown")
        elif anchor and unquote(anchor) not in anchors(resolved):
            known = ", ".join(sorted(anchors(resolved)))
            broken.append(f"{where}: {resolved.name} has no heading #{anchor} (it has {known})")
    return broken


def test_broken_links_are_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n"
        "[ok](other.md) [ok](other.md#a-section) [ok](#page) [ok](https://example.com/x#y)\n"
        "[gone](missing.md) [no anchor](other.md#nowhere) [wrong case](other.md#A-section)\n"
    )
    assert [problem.split(": ")[1] for problem in broken_links(page)] == [
        "missing.md",
        "other.md#nowhere",
        "other.md#A-section",
    ]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_docs_have_links_to_check() -> None:
    # The checks above pass vacuously if the pattern stops matching.
    assert len(DOCS) >= 5
    assert sum(len(links(page)) for page in DOCS) >= 20

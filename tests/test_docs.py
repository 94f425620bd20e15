"""The repository is self-contained: its documents point only at files inside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Documents that live outside this repository; written split so that this file does not match.
FOREIGN = ["REFERENCE" + ".md", "DESIGN" + ".md", "STYLE" + ".md", "steering" + " repo", "../shared" + "/docs"]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]


def _text_files() -> list[Path]:
    files = list(_markdown_files())
    for folder in ("src", "tests", "benchmarks"):
        files += [
            p
            for p in sorted((ROOT / folder).rglob("*"))
            if p.is_file() and p.suffix in (".py", ".md", ".txt", ".yaml", ".json", ".toml")
        ]
    return sorted(set(files))


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code (links there are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces -> '-'."""
    anchors = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            title = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


def test_docs_exist():
    for name in ("recipe.md", "architecture.md", "store.md"):
        assert (ROOT / "docs" / name).is_file(), f"docs/{name} is missing"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("docs/recipe.md", "docs/architecture.md", "docs/store.md"):
        assert f"]({name}" in readme, f"README.md does not link {name}"


@pytest.mark.parametrize("path", _text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pointer_to_documents_outside_the_repository(path):
    if path == Path(__file__).resolve():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    found = [
        (n + 1, word) for n, line in enumerate(text.splitlines()) for word in FOREIGN if word.lower() in line.lower()
    ]
    assert not found, f"{path.relative_to(ROOT)} points outside the repository: " + ", ".join(
        f"line {n}: {w!r}" for n, w in found
    )


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(path):
    broken = []
    for target in LINK.findall(_prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if ROOT not in (resolved, *resolved.parents):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: " + "; ".join(broken)

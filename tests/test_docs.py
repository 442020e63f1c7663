"""The docs stay true to the repository: generated tables equal their raw lines, and relative links resolve."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def docs_tables():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "bench" / "docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_tables_are_generated_from_the_raw_results():
    """Regenerating docs/benchmarks.md from bench/results yields the committed file byte for byte."""
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text(encoding="utf-8")
    assert text.count("<!-- generated: ") >= 7, "the generated-table markers are missing"
    assert docs_tables().render(text) == text, (
        "docs/benchmarks.md differs from its raw lines: run python bench/docs_tables.py"
    )


def test_a_typed_figure_inside_a_generated_block_is_caught():
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    tampered = text.replace("| deltatune train | ", "| deltatune train | 99.9 ", 1)
    assert tampered != text
    assert docs_tables().render(tampered) == text


def test_a_block_without_its_end_marker_is_refused():
    with pytest.raises(SystemExit, match="end generated"):
        docs_tables().render("<!-- generated: dora -->\nno end\n")


def links(path: Path) -> list[str]:
    """Relative link targets of a markdown file, outside code blocks, without their #fragment."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    found = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        found.append(target.split("#", 1)[0])
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_point_to_existing_files(path: Path):
    missing = [t for t in links(path) if not (path.parent / t).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


def test_the_readme_links_every_docs_page():
    readme = set(links(ROOT / "README.md"))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages <= readme, f"README.md does not link {sorted(pages - readme)}"


def full_links(path: Path) -> list[str]:
    """Link targets of a markdown file outside code blocks, with their #fragment."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a file's headings: lower case, punctuation dropped, spaces as hyphens, -N for repeats."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_anchors_point_to_existing_headings(path: Path):
    """A link to a section (`page.md#section`, `#section`) names a heading that exists: cutting or renaming a
    section must fix the links into it."""
    broken = []
    for target in full_links(path):
        page, _, anchor = target.partition("#")
        file = path if not page else path.parent / page
        if anchor and file.suffix == ".md" and file.exists() and anchor not in heading_anchors(file):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to missing sections: {broken}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_raw_line_links_point_to_existing_lines(path: Path):
    """A figure's link to its raw result (`bench/results/X.jsonl#L4-L6`) names lines the file has."""
    broken = []
    for target in full_links(path):
        found = re.fullmatch(r"(.*bench/results/[^#]+\.jsonl)#L(\d+)(?:-L(\d+))?", target)
        if found:
            file = path.parent / found.group(1)
            last = int(found.group(3) or found.group(2))
            lines = file.read_text(encoding="utf-8").count("\n") if file.exists() else 0
            if not 1 <= int(found.group(2)) <= last <= lines:
                broken.append(f"{target} ({lines} lines)")
    assert not broken, f"{path.relative_to(ROOT)} links to raw lines that do not exist: {broken}"

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
        "docs/benchmarks.md differs from its raw lines: run python bench/report.py --write docs/benchmarks.md"
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

"""Every figure the docs link to comes from committed code: a link to a raw result line never names a line
measured on a dirty tree (`"library_dirty": true`), which no commit reproduces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
DIRTY = re.compile(r'"library_dirty":\s*true')  # top level or inside "git"
RAW_LINK = re.compile(r"\]\(([^)\s]*bench/results/[^)#\s]+\.jsonl)#L(\d+)(?:-L(\d+))?\)")


def dirty_references(path: Path) -> list[str]:
    """The raw-line links of a markdown file that name at least one `library_dirty` line."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    found = []
    for target, first, last in RAW_LINK.findall(text):
        file = (path.parent / target).resolve()
        if not file.exists():
            continue  # test_docs reports missing files and lines
        lines = file.read_text(encoding="utf-8").splitlines()
        for number in range(int(first), int(last or first) + 1):
            if number <= len(lines) and DIRTY.search(lines[number - 1]):
                found.append(f"{target}#L{number}")
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_raw_line_links_never_name_a_dirty_line(path: Path):
    dirty = dirty_references(path)
    assert not dirty, (
        f"{path.relative_to(ROOT)} links to lines measured on uncommitted code: {dirty}; "
        "measure the figure again from a commit or remove it"
    )


def test_a_link_to_a_dirty_line_is_caught(tmp_path: Path):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "x.jsonl").write_text('{"git": {"library_dirty": false}}\n{"git": {"library_dirty": true}}\n')
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text("clean [line 1](../bench/results/x.jsonl#L1), dirty [lines 1-2](../bench/results/x.jsonl#L1-L2)\n")
    assert dirty_references(page) == ["../bench/results/x.jsonl#L2"]


def test_the_generated_tables_leave_out_lines_measured_on_a_dirty_tree(tmp_path, monkeypatch):
    import importlib.util
    import json
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("report_for_test", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    records = [
        {"figures": 1, "git": {"library_dirty": False}},
        {"figures": 2, "git": {"library_dirty": True}},  # nested, as append_result writes it
        {"figures": 3, "library_dirty": True},  # top level, as the oldest lines have it
        {"figures": 4},
    ]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [(n, r["figures"]) for n, r in report.load("x")] == [(1, 1), (4, 4)]

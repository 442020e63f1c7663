"""bench/_common.append_result refuses to append a figure that no commit reproduces (deltatune/ or bench/
differing from HEAD) unless the bench was given ``--allow-dirty``, which the line records. Checked on a
real git repository holding a copy of bench/_common.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "_common.py"
APPEND = """
import sys
sys.path.insert(0, "bench")
import _common
_common.append_result("demo", {"x": 1})
print("argv-after-import", sys.argv[1:])
"""


@pytest.fixture
def repo(tmp_path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    (tmp_path / "deltatune").mkdir()
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "deltatune" / "x.py").write_text("X = 1\n")
    (tmp_path / "bench" / "results" / "demo.jsonl").write_text("")
    shutil.copy(BENCH, tmp_path / "bench" / "_common.py")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    return tmp_path


def _append(repo: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTATUNE_BENCH")}
    return subprocess.run(
        [sys.executable, "-c", APPEND, *flags], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )


def _lines(repo: Path) -> list[dict]:
    return [json.loads(x) for x in (repo / "bench" / "results" / "demo.jsonl").read_text().splitlines()]


def test_clean_tree_appends_and_results_do_not_count_as_dirty(repo):
    done = _append(repo)
    assert done.returncode == 0, done.stderr
    line = _lines(repo)[-1]  # the results file itself changed: that is not a dirty tree
    assert line["git"]["tree_dirty"] is False and line["git"]["allow_dirty"] is False


def test_dirty_library_is_refused_unless_allowed(repo):
    (repo / "deltatune" / "x.py").write_text("X = 2\n")
    refused = _append(repo)
    assert refused.returncode != 0 and "--allow-dirty" in refused.stderr and "deltatune/x.py" in refused.stderr
    assert _lines(repo) == []
    allowed = _append(repo, "--allow-dirty")
    assert allowed.returncode == 0, allowed.stderr
    assert "argv-after-import []" in allowed.stdout  # the script's own argparse never sees the flag
    git = _lines(repo)[-1]["git"]
    assert git["library_dirty"] and git["tree_dirty"] and git["allow_dirty"]
    assert "--allow-dirty" in _lines(repo)[-1]["argv"]


def test_dirty_bench_code_is_refused(repo):
    (repo / "bench" / "_common.py").write_text((repo / "bench" / "_common.py").read_text() + "\n# edited\n")
    refused = _append(repo)
    assert refused.returncode != 0 and "bench/_common.py" in refused.stderr

"""A mutation pass: apply each small break of scripts/mutations.py to a COPY of the committed tree (a
detached git worktree, never the checkout you work in), run the test files meant to catch it there, and
report which tests catch each break (killed) and which breaks pass every test (survived).

    nice -n 10 .venv/bin/python scripts/mutate.py                       # all areas -> docs/mutation.md
    .venv/bin/python scripts/mutate.py --area attention --out -         # one area, table on stdout
    .venv/bin/python scripts/mutate.py --all 2> pass.log                 # also the breaks left out for time
    .venv/bin/python scripts/mutate.py --only end-of-sequence 2> again.log # re-run some breaks (a test was added)
    .venv/bin/python scripts/mutate.py --all --from-log pass.log --from-log again.log   # one report, rows by commit

Tests run from the copy's root with PYTHONPATH at the copy, so its deltatune wins over the editable
install. The test files run unmutated first: a file that fails already makes its mutations "baseline
failed" rather than killed.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import EXTRA, MUTATIONS, NOTES, Mutation

ROOT = Path(__file__).resolve().parent.parent
MAX_CAUGHT = 2  # tests listed per killed mutation (pytest stops after this many failures)


def worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), ref], check=True,
                   capture_output=True)  # fmt: skip
    return where


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, list[str], float]:
    """('passed' | 'failed' | 'timeout', failing test ids, seconds) of ``tests`` run in ``copy``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", f"--maxfail={MAX_CAUGHT}"]
    cmd += ["-m", "not real_model", *tests]  # the real-model tests take minutes each: left out of the pass
    env = {**os.environ, "PYTHONPATH": str(copy)}
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", [], time.monotonic() - start
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in done.stdout.splitlines() if line.startswith("FAILED ")]
    errors = [line.split(" ", 1)[1].split(" - ")[0] for line in done.stdout.splitlines() if line.startswith("ERROR ")]
    status = "passed" if done.returncode == 0 else "failed"
    if done.returncode not in (0, 1) and not failed:  # a collection or import error: the break made it unloadable
        failed = errors or [f"pytest exit {done.returncode}"]
    return status, failed, time.monotonic() - start


def apply(copy: Path, mutation: Mutation) -> str | None:
    """Write the mutated file in ``copy``; returns its original text, or None when a snippet is not found once."""
    path = copy / mutation.file
    original = text = path.read_text()
    for old, new in mutation.edits:
        if text.count(old) != 1:
            return None
        text = text.replace(old, new)
    path.write_text(text)
    return original


def classify(status: str, failed: list[str], base_status: str, base_failed: list[str]) -> tuple[str, list[str]]:
    """(result, the tests that caught it). When the tests already fail unmutated, only failures beyond
    the baseline's count as catching the break."""
    if status == "timeout":
        return "killed (timeout)", []
    if base_status == "passed":
        return ("killed", failed) if status == "failed" else ("SURVIVED", [])
    new = [f for f in failed if f not in base_failed]
    return ("killed", new) if new else (f"baseline failed ({len(base_failed)} tests fail unmutated)", [])


def mutate(copy: Path, mutations: list[Mutation], timeout: float, report=None) -> list[dict]:
    """Each mutation in turn; ``report(results)`` after each, so a stopped pass leaves its rows so far.
    The log lines on stderr are the raw record (``--from-log`` renders the report from them again)."""
    baseline: dict[tuple[str, ...], tuple[str, list[str]]] = {}
    results = []
    for mutation in mutations:
        if mutation.tests not in baseline:
            status, failed, secs = run_tests(copy, mutation.tests, timeout)
            baseline[mutation.tests] = (status, failed)
            print(f"baseline {' '.join(mutation.tests)}: {status} {failed} ({secs:.0f} s)", file=sys.stderr)
        original = apply(copy, mutation)
        if original is None:
            results.append({"mutation": mutation, "result": "stale (snippet not found once)", "caught": []})
            continue
        try:
            status, failed, secs = run_tests(copy, mutation.tests, timeout)
        finally:
            (copy / mutation.file).write_text(original)
        result, caught = classify(status, failed, *baseline[mutation.tests])
        results_base = baseline[mutation.tests][1]
        print(f"mutant {status} {mutation.area}: {mutation.description} ({secs:.0f} s) {failed}", file=sys.stderr)
        results.append(
            {"mutation": mutation, "result": result, "caught": caught, "seconds": secs, "base": results_base}
        )
        if report is not None:
            report(results)
    return results


LOG_LINE = re.compile(r"^(?:mutant )?(\w+|baseline failed)\s+(\w+): (.*) \((\d+) s\) (\[.*\])$")
STATUS_OF = {"killed": "failed", "SURVIVED": "passed", "baseline failed": "failed", "failed": "failed"}


def from_log(log: Path, chosen: list[Mutation], commit: str = "?") -> list[dict]:
    """The results of a pass, re-classified from its log (a pass whose report rules changed afterwards).
    A ``commit X`` line in the log names the commit of the rows after it (else ``commit``)."""
    by_description = {mu.description: mu for mu in chosen}
    baseline: dict[str, tuple[str, list[str]]] = {}
    last: tuple[str, list[str]] = ("passed", [])
    results = []
    for line in log.read_text().splitlines():
        if line.startswith("commit "):
            commit = line.split()[1]
            continue
        if line.startswith("baseline tests/"):
            tests, rest = line[len("baseline ") :].split(": ", 1)
            status, listed = rest.split(" ", 1)
            baseline[tests] = last = (status, ast.literal_eval(listed[: listed.rindex("]") + 1]))
            continue
        match = LOG_LINE.match(line)
        if match is None or match[3] not in by_description:
            continue
        mutation = by_description[match[3]]
        status = STATUS_OF.get(match[1], match[1])
        base = baseline.get(" ".join(mutation.tests), last)  # an older log: its tests were listed otherwise
        result, caught = classify(status, ast.literal_eval(match[5]), *base)
        results.append(
            {"mutation": mutation, "result": result, "caught": caught, "seconds": float(match[4]), "base": base[1],
             "commit": commit}
        )  # fmt: skip
    return results


def from_logs(logs: list[Path], chosen: list[Mutation], commit: str) -> list[dict]:
    """Several passes' logs: a later log's row replaces an earlier one's for the same break (a re-run after
    a test was added); rows keep the order of scripts/mutations.py."""
    latest: dict[str, dict] = {}
    for log in logs:
        for row in from_log(log, chosen, commit):
            latest[row["mutation"].description] = row
    return [latest[mu.description] for mu in chosen if mu.description in latest]


def table(results: list[dict], commit: str, minutes: float, planned: int, source: str = "") -> str:
    killed = sum(r["result"].startswith("killed") for r in results)
    survived = [r for r in results if r["result"] == "SURVIVED"]
    commits = sorted({r.get("commit", commit) for r in results}) or [commit]
    several = len(commits) > 1
    measured = f"Commit `{commits[0]}`" if not several else "Commits " + ", ".join(f"`{c}`" for c in commits)
    measured += " (column *at*: the commit each row was measured at)" if several else ""
    lines = [
        "# Mutation pass",
        "",
        "Generated by `scripts/mutate.py` (do not edit by hand): each row is one small break of the library",
        "(scripts/mutations.py), applied alone to a detached worktree of the commit below; the listed test",
        "files ran against it (tests marked `real_model` left out for time). *killed*: some test failed (the",
        "first ones are named); *SURVIVED*: every test passed, i.e. these tests cannot see this break.",
        "",
        f"{measured}; {len(results)} of {planned} mutations run, {killed} killed, {len(survived)} survived; "
        f"{minutes:.1f} min of mutant runs.{source}",
        "",
        "| area | file | break | result | caught by (first failing tests) |" + (" at |" if several else ""),
        "|---|---|---|---|---|" + ("---|" if several else ""),
    ]
    for r in results:
        mu = r["mutation"]
        caught = "<br>".join(f"`{c}`" for c in r["caught"][:MAX_CAUGHT]) or "—"
        at = f" `{r.get('commit', commit)}` |" if several else ""
        lines.append(
            f"| {mu.area} | `{mu.file.removeprefix('deltatune/')}` | {mu.description} | {r['result']} | {caught} |{at}"
        )
    failing = sorted({f for r in results for f in r.get("base", [])})
    if failing:
        lines += [
            "",
            "Failing already without any break (so not counted as catching one; pytest stops after "
            f"{MAX_CAUGHT} failures, so there may be more):",
            "",
        ]
        lines += [f"- `{f}`" for f in failing]
    noted = [r for r in results if r["mutation"].description in NOTES]
    if noted:
        lines += ["", "Notes:", ""]
        lines += [f"- {r['mutation'].description}: {NOTES[r['mutation'].description]}." for r in noted]
    if survived:
        lines += ["", "Survivors (breaks no test sees):", ""]
        lines += [f"- {r['mutation'].area}: {r['mutation'].description} (`{r['mutation'].file}`)" for r in survived]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="also the breaks left out of the default pass for time")
    parser.add_argument("--from-log", action="append", help="render the report from passes' logs (stderr) "
                        "instead of running one; repeat it: a later log's rows replace an earlier one's")  # fmt: skip
    parser.add_argument("--only", action="append", help="only the breaks whose description contains this text")
    parser.add_argument("--ref", default="HEAD", help="commit to mutate (default HEAD: commit your tests first)")
    parser.add_argument("--area", action="append", help="only these areas (methods, attention, quantization, serving)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "mutation.md"), help="markdown report, '-' for stdout")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run before it counts as a hang")
    parser.add_argument("--workdir", default=str(ROOT.parent), help="where the temporary worktree goes (beside the "
                        "checkout by default, so that tests find shared/data)")  # fmt: skip
    args = parser.parse_args(argv)
    chosen = [
        mu
        for mu in MUTATIONS
        if (not args.area or mu.area in args.area)
        and (args.all or args.only or mu.description not in EXTRA)
        and (not args.only or any(text in mu.description for text in args.only))
    ]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.ref], capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    start = time.monotonic()

    def report(results: list[dict]) -> None:
        minutes = sum(r.get("seconds", 0) for r in results) / 60 if args.from_log else (time.monotonic() - start) / 60
        logs = ", ".join(f"`{log}`" for log in args.from_log or [])
        source = f" Rendered from the passes' logs, {logs} (`--from-log`)." if args.from_log else ""
        text = table(results, commit, minutes, len(chosen), source)
        if args.out == "-":
            return
        tmp_out = Path(args.out).with_suffix(".md.tmp")
        tmp_out.write_text(text)
        tmp_out.replace(args.out)

    if args.from_log:
        results = from_logs([Path(log) for log in args.from_log], chosen, commit)
        report(results)
        if args.out == "-":
            minutes = sum(r.get("seconds", 0) for r in results) / 60
            print(table(results, commit, minutes, len(chosen), " Rendered from logs (`--from-log`)."), end="")
        return 0
    copy = worktree(args.ref, Path(args.workdir) / f"wt-mutate-{os.getpid()}")  # beside the checkout: shared/data
    print(f"commit {commit}", file=sys.stderr)  # the log says which commit its rows were measured at
    try:
        results = mutate(copy, chosen, args.timeout, report)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(copy)], check=False)
    if args.out == "-":
        print(table(results, commit, (time.monotonic() - start) / 60, len(chosen)), end="")
    else:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

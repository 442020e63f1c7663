"""Regenerate the tables of docs/benchmarks.md from ``bench/results/*.jsonl``, so no figure there is typed by hand.

Each table sits between two markers::

    <!-- generated: TABLE [CAMPAIGN] -->
    ...
    <!-- end generated -->

and is written as one line saying what it measured and when (dates, commits and raw lines of the records it reads),
then the table from ``bench/report.py`` (or ``bench/claims_report.py`` for ``claims``). Text outside the markers is
kept as it is. ``python bench/docs_tables.py [MD]`` runs :func:`write` (MD: docs/benchmarks.md by default);
``tests/test_docs.py`` checks that the committed file equals :func:`render` of itself.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report

BEGIN = re.compile(r"^<!-- generated: (?P<table>[\w]+)(?: (?P<campaign>[\w.-]+))? -->$", re.M)
END = "<!-- end generated -->"

WHAT = {
    "train_throughput": "tokens/s of `deltatune train` and of `transformers.Trainer` + peft, LoRA r=8 (q,v) on "
    "SmolLM2-135M-Instruct, the same E2E examples on both sides, alternating fresh processes",
    "methods": "training step time and peak RSS per method, deltatune vs peft, SmolLM2-135M, batch 4×128",
    "glue": "accuracy on a held-out split of the GLUE train files (all-MiniLM-L6-v2), per method, 3 seeds",
    "lora_train_step": "one LoRA training step (SmolLM2-135M-Instruct, 4×128 tokens), deltatune vs peft",
    "lora_inference": "batch-1 greedy decoding ms/token: base, merged and unmerged LoRA, peft",
    "dora": "DoRA's training step and unmerged forward against LoRA and peft's DoRA; PiSSA's init time",
    "claims": "the seeds' claims (subspace, rank, freezing, BitFit/Houlsby vs full, latency) and the LoRA family's "
    "(DoRA, PiSSA, LoRA+, (IA)³, LoKr against LoRA), re-run here",
    "demo": "the README's main job, `deltatune train` with no arguments, in a fresh process at two commits: how "
    "long it takes and what it scores",
    "defaults": "SST-2 accuracy of `deltatune train` (MiniLM-L6, classification) per method over a grid of learning "
    "rates, which chose each method's default rate",
    "e2e_eval": "`deltatune eval` over E2E devset inputs with all their references, beam search: wall time, tokens/s "
    "and multi-reference scores",
}
USER_TABLES = ("defaults", "e2e_eval")  # in bench/user_report.py


def _claims_lines(table: str) -> list[int]:
    """Line numbers named in the last column of the claims table ("lines 16, 18, 20–23")."""
    numbers: list[int] = []
    for row in table.splitlines()[2:]:
        cell = row.rstrip(" |").rsplit("|", 1)[-1]
        for a, b in re.findall(r"(\d+)(?:–(\d+))?", cell):
            numbers += range(int(a), int(b or a) + 1)
    return sorted(set(numbers))  # rows may share lines (the LoRA-family rows all read one campaign)


def _used(table: str, campaign: str | None, text: str) -> tuple[str, list[int]]:
    """The results file a table reads and the line numbers of the records it uses."""
    lines = report.load(table)
    if table == "claims":
        return table, _claims_lines(text)
    if table in USER_TABLES:
        return table, [n for n, r in lines if r.get("kind") in ("run", "summary")]
    if table == "lora_inference":
        return table, [n for n, r in lines if r.get("kind") == "summary"][-3:]
    if table == "demo":
        return table, [n for n, _ in report.demo_lines(campaign)]
    if table == "dora":
        chosen = set(re.findall(r"campaign `([^`]+)`", text))
        return table, [n for n, r in lines if r.get("campaign") in chosen]
    return table, [n for n, _ in report.pick(lines, campaign)[1]]


def when(bench: str, numbers: list[int]) -> str:
    """Dates, commits and dirty lines of the records ``numbers`` of ``bench/results/<bench>.jsonl``."""
    records = dict(report.load(bench))
    chosen = [records[n] for n in numbers if n in records]
    if not chosen:
        return f"no records in `bench/results/{bench}.jsonl`"
    dates = sorted(r["date"][:16].replace("T", " ") for r in chosen)
    commits = list(dict.fromkeys(r.get("git", {}).get("commit", "?")[:7] for r in chosen))
    dirty = sum(bool(r.get("git", {}).get("library_dirty")) for r in chosen)
    note = f", {dirty} of them on uncommitted changes (**provisional**)" if dirty else ""
    span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    return (
        f"{span} UTC, commit {', '.join(commits)}{note}; raw lines `bench/results/{bench}.jsonl` {report.span(numbers)}"
    )


def generate(table: str, campaign: str | None) -> str:
    if table not in WHAT:
        raise SystemExit(f"unknown generated table {table!r}: one of {', '.join(WHAT)}")
    if table == "claims":
        import claims_report

        text = claims_report.table() + "\n"
    elif table in USER_TABLES:
        import user_report

        text = getattr(user_report, table)(campaign)
    else:
        text = getattr(report, table)(campaign)
    bench, numbers = _used(table, campaign, text)
    return f"*Measured:* {WHAT[table]}. *When:* {when(bench, numbers)}.\n\n{text}"


def render(markdown: str) -> str:
    """``markdown`` with every generated block replaced by a freshly generated one."""
    out, pos = [], 0
    for match in BEGIN.finditer(markdown):
        end = markdown.find(END, match.end())
        if end < 0:
            raise SystemExit(f"'{match.group(0)}' has no '{END}' after it")
        out += [markdown[pos : match.end()], "\n", generate(match["table"], match["campaign"])]
        pos = end
    return "".join(out) + markdown[pos:]


def write(path: Path) -> None:
    from deltatune.atomic import atomic_write_text

    atomic_write_text(path, render(path.read_text(encoding="utf-8")))


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")

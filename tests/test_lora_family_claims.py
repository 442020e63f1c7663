"""The LoRA-family claims rows (bench/claims_report.py) decide each paper's claim from per-seed runs: checked on
hand-made records whose answer is known (the early-loss measure, the paired verdicts, the newest run per seed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
claims_report = pytest.importorskip("claims_report")

SETTINGS = {"lr": 4e-3, "examples": 400, "epochs": 2, "steps": 40, "batch_size": 4, "e2e_lr": 2e-3, "threads": 1}


def record(task: str, method: str, seed: int, score: float, losses: list[float], params: int = 100) -> dict:
    figures = {"task": task, "method": method, "seed": seed, "losses": losses, "trainable_params": params}
    if task == "sst2":
        figures["accuracy"] = {"accuracy": score, "majority": 50.0}
    else:
        figures["dev_loss"] = score
    return {"claim": "lora-family", "argv": ["claims.py", "lora-family"], "settings": SETTINGS, "figures": figures}


def rows(records: list[dict]) -> dict[str, list[str]]:
    lines = list(enumerate(records, start=1))
    return {row[0].split(".")[0]: row for row in claims_report.claim_family(lines)}


def base_records() -> list[dict]:
    out = []
    for seed in (0, 1, 2):
        # LoRA: flat early losses; PiSSA lower over the first half but ending higher (the early measure only).
        out.append(record("sst2", "lora", seed, 80.0 + seed, [1.0, 1.0, 0.2, 0.2]))
        out.append(record("sst2", "pissa", seed, 79.0 + seed, [0.5, 0.5, 0.9, 0.9]))
        out.append(record("sst2", "dora", seed, 81.0 + seed, [1.0, 1.0, 0.2, 0.2]))
        out.append(record("sst2", "lokr", seed, 79.5 + seed, [1.0, 1.0, 0.2, 0.2], params=10))
        out.append(record("sst2", "ia3", seed, 60.0, [1.0, 1.0, 0.2, 0.2], params=5))
        out.append(record("e2e", "lora", seed, 1.5, [2.0, 2.0, 1.0, 1.0]))
        out.append(record("e2e", "dora", seed, 1.6 if seed else 1.4, [2.0, 2.0, 1.0, 1.0]))
        out.append(record("e2e", "pissa", seed, 1.5, [2.5, 2.5, 0.1, 0.1]))
    return out


def test_verdicts_follow_the_paired_seeds() -> None:
    got = rows(base_records())
    assert "SST-2: yes" in got["6a"][4]  # DoRA more accurate in every seed
    assert "E2E: mixed" in got["6a"][4]  # lower dev loss in 1 of 3 seeds
    assert "SST-2: yes" in got["6b"][4] and "E2E: **no**" in got["6b"][4]  # first half of the losses only
    assert "SST-2 early training loss pissa − lora: -0.5000 (better in 3/3 seeds)" in got["6b"][2]
    assert got["6c"][4] == "SST-2: not measured; E2E: not measured"
    assert got["6d"][4].startswith("SST-2: **no**")  # 20+ points below LoRA, far outside the seeds' spread
    assert got["6e"][4].startswith("SST-2: yes")  # 0.5 points below, within LoRA's seed std (1.0)
    assert "SST-2 lora 100 vs lokr 10" in got["6e"][2] and "lokr − lora: -0.5000" in got["6e"][2]
    assert got["6a"][3] == "SST-2 3, E2E 3"
    assert not any("|" in cell for row in got.values() for cell in row)  # a pipe would split a markdown cell


def test_a_rerun_replaces_the_older_run_of_its_seed() -> None:
    records = [*base_records(), record("sst2", "dora", 0, 70.0, [1.0, 1.0, 0.2, 0.2])]
    assert "SST-2: mixed" in rows(records)["6a"][4]


def test_no_family_lines_no_rows() -> None:
    assert claims_report.claim_family([]) == []


def test_campaigns_differing_only_in_work_dir_or_lr_selection_options_are_one() -> None:
    records = base_records()
    for r in records[:8]:  # the first seed's runs as a resumed campaign would record them
        r["settings"] = {**SETTINGS, "work_dir": "/elsewhere", "select_lrs": None, "select_seed": 0}
    assert rows(records)["6a"][3] == "SST-2 3, E2E 3"
    records[-1]["settings"] = {**SETTINGS, "lr": 1e-3}  # another lr: another campaign, the newest
    assert rows(records)["6a"][3] == "E2E 1"


def test_tuned_row_compares_each_method_at_its_own_lr() -> None:
    tuned = []
    for seed in (0, 1, 2):
        for method, lr, acc in (("lora", 4e-3, 80.0 + seed), ("ia3", 1.6e-2, 79.5 + seed),
                                ("lokr", 1.6e-2, 60.0), ("loraplus", 1e-3, 81.0 + seed)):  # fmt: skip
            r = record("sst2", method, seed, acc, [1.0, 0.5])
            r["claim"], r["figures"]["lr"] = "lora-family-tuned", lr
            r["settings"] = {**SETTINGS, "select_lrs": [1e-3, 4e-3, 1.6e-2]}
            tuned.append(r)
    row = rows([*base_records(), *tuned])["6f"]
    assert "ia3 lr 0.016: 80.5 ± 1.0" in row[2] and "lora lr 0.004: 81.0 ± 1.0" in row[2]
    assert row[4].startswith("(IA)³ as good as LoRA: yes") and "LoKr as good as LoRA: **no**" in row[4]
    assert "LoRA+ more accurate than LoRA: yes" in row[4]

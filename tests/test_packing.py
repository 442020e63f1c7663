"""`--packing`: examples packed into one row must not see each other, so packed and unpacked training agree."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.data import IGNORE_INDEX, Batcher, pack
from deltatune.loss import LossModule, causal_lm_loss_sum
from deltatune.training import trainer

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def features(lengths: list[int], seed: int = 0) -> list[dict]:
    """Random causal-lm features whose first third is an unlabelled prompt."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]})
    return out


def first_fit(lengths: list[int], capacity: int) -> list[tuple[int, int]]:
    """(row, offset) of each example, as :func:`pack` places them."""
    used: list[int] = []
    places = []
    for n in lengths:
        row = next((r for r, u in enumerate(used) if u + n <= capacity), len(used))
        used += [0] * (row == len(used))
        places.append((row, used[row]))
        used[row] += n
    return places


def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """As the loss runs the model: without a KV cache (with one, transformers ignores the packed positions)."""
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_rows_give_each_example_its_own_logits(name, attn):
    model = MODELS[name]()
    model.config._attn_implementation = attn
    lengths = [7, 5, 9, 3, 6, 1, 4]
    feats = features(lengths)
    rows = pack(feats, 16)  # several rows of several examples, padded to the widest row
    assert any(len(r["seq_lens"]) > 2 for r in rows) and len({len(r["input_ids"]) for r in rows}) > 1
    batch = Batcher(rows, len(rows), pad_token_id=0, seed=0).collate(list(range(len(rows))))
    packed = logits(model, batch)
    for i, (r, start) in enumerate(first_fit(lengths, 16)):
        alone = logits(model, Batcher(feats, 1, pad_token_id=0, seed=0).collate([i]))[0]
        torch.testing.assert_close(packed[r, start : start + lengths[i]], alone, atol=1e-5, rtol=0)


def test_packed_loss_equals_the_sum_of_single_example_losses():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    feats = features([8, 3, 11, 5, 2, 6])
    rows = pack(feats, 16)
    batch = Batcher(rows, len(rows), pad_token_id=0, seed=0).collate(list(range(len(rows))))
    with torch.no_grad():
        loss, count = LossModule(model, "causal-lm")(batch)
        single = [
            LossModule(model, "causal-lm")(Batcher(feats, 1, pad_token_id=0, seed=0).collate([i]))
            for i in range(len(feats))
        ]
    assert int(count) == sum(int(n) for _, n in single)
    torch.testing.assert_close(loss, sum(s for s, _ in single), atol=1e-5, rtol=1e-6)
    # the plain transformers model takes the same batch
    with torch.no_grad():
        base_loss, _ = causal_lm_loss_sum(tiny_llama(), batch)
    assert torch.isfinite(base_loss)


@pytest.mark.parametrize(
    "config", [dt.PromptTuningConfig(num_virtual_tokens=3), dt.PrefixTuningConfig(num_virtual_tokens=3)]
)
@pytest.mark.filterwarnings("ignore:position_ids are ignored")
def test_virtual_token_methods_refuse_packed_batches(config):
    model = dt.wrap(tiny_llama(), config)
    rows = pack(features([4, 3, 6]), 8)
    batch = Batcher(rows, 2, pad_token_id=0, seed=0).collate([0, 1])
    with pytest.raises(ConfigError, match="--packing"):
        LossModule(model, "causal-lm")(batch)


def test_packed_batches_carry_positions_not_a_padding_mask():
    rows = pack(features([4, 3, 6]), 8)
    batch = Batcher(rows, 2, pad_token_id=0, seed=0).collate([0, 1])
    assert "attention_mask" not in batch  # a mask would stop transformers building the block-diagonal one
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0]]
    assert batch["labels"][1, -1] == IGNORE_INDEX and batch["input_ids"][1, -1] == 0


# --- the command line ------------------------------------------------------------------------------------------


def alpaca_file(path: Path, count: int) -> Path:
    records = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i} {i}"} for i in range(count)]
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def first_loss(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_packing_logs_the_same_step_loss_as_unpacked_rows(tiny_llama_dir, tmp_path):
    data = alpaca_file(tmp_path / "train.jsonl", count=12)
    # one optimizer step over every training example, packed or not
    options = "--max-steps 1 --batch-size 32 --log-every 1 --no-eval-generate --threads 1 --max-length 256 --r 2"
    common = ["train", "--base", tiny_llama_dir, "--data", data, *options.split()]
    assert main([str(a) for a in [*common, "--output-dir", tmp_path / "rows", "--no-packing"]]) == 0
    assert main([str(a) for a in [*common, "--output-dir", tmp_path / "packed", "--packing"]]) == 0
    rows, packed = first_loss(tmp_path / "rows"), first_loss(tmp_path / "packed")
    assert packed == pytest.approx(rows, rel=1e-5)
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("rows", "packed")]
    assert summaries[0]["tokens"] == summaries[1]["tokens"]


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_packing_refuses_virtual_token_methods_before_loading(method, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(trainer, "load_base", no_load)
    cfg = trainer.TrainConfig(
        base="smollm2-135m", method=method, data=str(alpaca_file(tmp_path / "t.jsonl", 4)), packing=True
    )
    with pytest.raises(ConfigError, match="--no-packing"):
        trainer.prepare(cfg)

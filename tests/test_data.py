"""Training data: format detection, helpful errors, label masking, packing and deterministic batching."""

from __future__ import annotations

import copy
import csv
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

from deltatune.config import ConfigError
from deltatune.data import (
    Batcher,
    Example,
    label_ids,
    pack,
    prompt_ids,
    prompt_text,
    read_examples,
    split_train_eval,
    tokenize_examples,
)


@pytest.fixture(scope="module")
def smol(smol_tokenizer):
    return smol_tokenizer


@pytest.fixture(scope="module")
def smol_plain(smol):
    """The same tokenizer without a chat template, as a base model's would be."""
    tok = copy.deepcopy(smol)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="module")
def bert(bert_tokenizer):
    return bert_tokenizer


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent: the shared data sets live in <repo>/../shared/data")
    return path


# --- format detection --------------------------------------------------------------------------------------------


def test_alpaca_json_list(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            ]
        )
    )
    assert read_examples(path, "causal-lm") == [
        Example("Add the numbers.\n\n2 and 3", "5"),
        Example("Say hi.", "Hi!"),
    ]


def test_prompt_completion_chat_and_text_jsonl(tmp_path):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "Q: 1+1?", "completion": " 2"},
            {"messages": chat},
            {"text": "Plain text."},
        ],
    )
    assert read_examples(path, "causal-lm") == [
        Example("Q: 1+1?", " 2"),
        Example([chat[0]], "Hello"),
        Example(None, None, text="Plain text."),
    ]


def test_json_lines_in_a_json_file(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [{"text": "a"}, {"text": "b"}])
    assert [e.text for e in read_examples(path, "causal-lm")] == ["a", "b"]


def test_txt_splits_on_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First paragraph,\nstill first.\n\n\nSecond.\n  \nThird.\n")
    assert [e.text for e in read_examples(path, "causal-lm")] == ["First paragraph,\nstill first.", "Second.", "Third."]


def test_csv_prompt_target_columns(tmp_path):
    path = write_csv(tmp_path / "e2e.csv", [["mr", "ref", "note"], ["name[A], food[B]", 'A serves B, "cheap".', "x"]])
    assert read_examples(path, "causal-lm") == [Example("name[A], food[B]", 'A serves B, "cheap".')]
    assert read_examples(path, "causal-lm", prompt_column="ref", target_column="note") == [
        Example('A serves B, "cheap".', "x")
    ]
    assert read_examples(path, "causal-lm", text_column="note") == [Example(None, None, text="x")]


def test_classification_jsonl_with_string_labels(tmp_path):
    path = write_jsonl(
        tmp_path / "nli.jsonl",
        [
            {"sentence1": "A dog runs.", "sentence2": "An animal moves.", "label": "entailment"},
            {"sentence1": "A dog runs.", "sentence2": "A cat sleeps.", "label": "not_entailment"},
        ],
    )
    examples = read_examples(path, "classification", num_labels=2)
    assert [(e.text, e.text_pair, e.label) for e in examples] == [
        ("A dog runs.", "An animal moves.", 0),
        ("A dog runs.", "A cat sleeps.", 1),
    ]


def test_classification_csv_and_column_overrides(tmp_path):
    path = write_csv(
        tmp_path / "reviews.tsv", [["review", "other", "stars"], ["good", "x", "4"], ["bad", "y", "0"]], delimiter="\t"
    )
    examples = read_examples(
        path, "classification", text_column="review", text_pair_column="other", label_column="stars"
    )
    assert [(e.text, e.text_pair, e.label) for e in examples] == [("good", "x", 4), ("bad", "y", 0)]


def test_label_ids_known_orders_and_sorted_names():
    assert label_ids(["not_entailment", "entailment"]) == {"entailment": 0, "not_entailment": 1}
    assert label_ids(["contradiction", "neutral", "entailment"]) == {"entailment": 0, "neutral": 1, "contradiction": 2}
    assert label_ids(["equivalent", "not_equivalent"]) == {"not_equivalent": 0, "equivalent": 1}
    assert label_ids(["spam", "ham", "eggs"]) == {"eggs": 0, "ham": 1, "spam": 2}


# --- the shared GLUE / E2E files ---------------------------------------------------------------------------------


def test_sst2():
    examples = read_examples(shared("sst2/train.tsv"), "classification", num_labels=2)
    assert len(examples) == 67349
    assert Counter(e.label for e in examples) == {1: 37569, 0: 29780}
    assert examples[0].text.startswith("hide new secretions") and examples[0].text_pair is None


def test_rte_string_labels():
    examples = read_examples(shared("rte/train.tsv"), "classification", num_labels=2)
    assert len(examples) == 2490
    assert Counter(e.label for e in examples) == {0: 1249, 1: 1241}  # entailment = 0, as in GLUE
    assert examples[0].text == "No Weapons of Mass Destruction Found in Iraq Yet."
    assert examples[0].text_pair == "Weapons of Mass Destruction Found in Iraq." and examples[0].label == 1


def test_mrpc_bom_header_and_quotes():
    examples = read_examples(shared("mrpc/train.tsv"), "classification", num_labels=2)
    assert len(examples) == 3668
    assert Counter(e.label for e in examples) == {1: 2474, 0: 1194}
    assert examples[0].text.startswith('Amrozi accused his brother , whom he called " the witness "')
    assert examples[0].text_pair.startswith("Referring to him")


def test_e2e_csv():
    examples = read_examples(shared("e2e/trainset.csv"), "causal-lm")
    assert len(examples) == 42061
    assert examples[0].prompt.startswith("name[The Vaults], eatType[pub]")
    assert examples[0].target.startswith("The Vaults pub near Café Adriatic")


# --- errors ------------------------------------------------------------------------------------------------------


def assert_config_error(call, *words: str) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


def test_missing_file_and_unknown_extension(tmp_path):
    assert_config_error(lambda: read_examples(tmp_path / "nope.jsonl", "causal-lm"), "does not exist", "nope.jsonl")
    (tmp_path / "data.parquet").write_text("x")
    assert_config_error(lambda: read_examples(tmp_path / "data.parquet", "causal-lm"), ".parquet", ".jsonl", ".csv")


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert_config_error(lambda: read_examples(tmp_path / "empty.jsonl", "causal-lm"), "no examples")
    (tmp_path / "blank.txt").write_text("  \n\n")
    assert_config_error(lambda: read_examples(tmp_path / "blank.txt", "causal-lm"), "no examples")


def test_unrecognised_jsonl_record(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "fine"}, {"query": "q", "reply": "r"}])
    assert_config_error(
        lambda: read_examples(path, "causal-lm"),
        "line 2",
        "'query'",
        "'reply'",
        "prompt+completion",
        "messages",
        "--prompt-column",
    )


def test_invalid_json_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    assert_config_error(lambda: read_examples(tmp_path / "bad.jsonl", "causal-lm"), "line 2", "not valid JSON")


def test_csv_without_text_or_label_column(tmp_path):
    no_label = write_csv(tmp_path / "test.tsv", [["index", "sentence"], ["0", "hello"]], delimiter="\t")
    assert_config_error(
        lambda: read_examples(no_label, "classification"), "no label column", "'index'", "'sentence'", "--label-column"
    )
    no_text = write_csv(tmp_path / "odd.csv", [["body", "label"], ["hello", "1"]])
    assert_config_error(lambda: read_examples(no_text, "classification"), "no text column", "'body'", "--text-column")
    assert_config_error(
        lambda: read_examples(no_text, "classification", text_column="content"), "'content'", "'body'", "--text-column"
    )


def test_labels_that_do_not_fit_num_labels(tmp_path):
    path = write_jsonl(tmp_path / "three.jsonl", [{"text": t, "label": i} for i, t in enumerate("abc")])
    assert_config_error(
        lambda: read_examples(path, "classification", num_labels=2),
        "label 2",
        "num_labels=2",
        "3 distinct labels",
        "--num-labels 3",
    )
    nli = write_jsonl(
        tmp_path / "mnli.jsonl",
        [{"premise": "p", "hypothesis": "h", "label": name} for name in ("entailment", "neutral", "contradiction")],
    )
    assert_config_error(lambda: read_examples(nli, "classification", num_labels=2), "'contradiction'", "--num-labels 3")


def test_chat_must_end_with_assistant(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye"},
                ]
            }
        ],
    )
    assert_config_error(lambda: read_examples(path, "causal-lm"), "line 1", "'user'", "assistant")


def test_prompt_longer_than_max_length(smol_plain):
    long = Example("word " * 50, "short answer")
    assert_config_error(
        lambda: tokenize_examples([Example("ok", "fine"), long], smol_plain, "causal-lm", 20),
        "example 1",
        "prompt alone",
        "--max-length",
    )
    too_long = Example("Question?", "answer " * 50)
    assert_config_error(
        lambda: tokenize_examples([too_long], smol_plain, "causal-lm", 20, truncate=False),
        "example 0",
        "--max-length",
        "max_length is 20",
    )


# --- tokenization ------------------------------------------------------------------------------------------------


def unmasked(feature: dict) -> list[int]:
    return [t for t, label in zip(feature["input_ids"], feature["labels"], strict=True) if label != -100]


@pytest.mark.parametrize("tokenizer", ["smol", "smol_plain"])
def test_loss_only_on_response_and_eos(tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    example = Example("Translate to French: cheese", " fromage")
    feature = tokenize_examples([example], tok, "causal-lm", 64)[0]
    assert tok.decode(unmasked(feature)) == " fromage" + tok.eos_token
    n_prompt = len(prompt_ids(example, tok))
    assert feature["labels"][:n_prompt] == [-100] * n_prompt
    assert tok.decode(feature["input_ids"][:n_prompt]) == prompt_text(example, tok)
    expected_prompt = (
        "<|im_start|>user\nTranslate to French: cheese<|im_end|>\n<|im_start|>assistant\n"
        if tokenizer == "smol"
        else "Translate to French: cheese"
    )
    assert prompt_text(example, tok).endswith(expected_prompt)


def test_chat_masks_all_but_the_assistant_turn(smol, smol_plain):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    example = Example(messages[:-1], "Paris.")
    feature = tokenize_examples([example], smol, "causal-lm", 128)[0]
    assert smol.decode(unmasked(feature)) == "Paris.<|im_end|>"
    # the whole row is the model's own chat format, up to the final newline after <|im_end|>
    assert smol.decode(feature["input_ids"]) == smol.apply_chat_template(messages, tokenize=False).rstrip("\n")
    assert prompt_text(example, smol_plain) == "system: Be brief.\nuser: Capital of France?\nassistant: "


def test_truncation_cuts_the_response_end(smol_plain):
    example = Example("Count:", " one two three four five six seven eight nine ten")
    feature = tokenize_examples([example], smol_plain, "causal-lm", 6)[0]
    n_prompt = len(prompt_ids(example, smol_plain))
    assert len(feature["input_ids"]) == 6 and feature["labels"][:n_prompt] == [-100] * n_prompt
    response = smol_plain.decode(unmasked(feature))
    assert response and example.target.startswith(response) and smol_plain.eos_token_id not in feature["input_ids"]


def test_plain_text_is_split_into_windows(smol):
    text = " ".join(f"w{i}" for i in range(40))
    features = tokenize_examples([Example(None, None, text=text)], smol, "causal-lm", 16)
    ids = [t for f in features for t in f["input_ids"]]
    assert ids == smol(text)["input_ids"] + [smol.eos_token_id]
    assert all(len(f["input_ids"]) <= 16 and f["labels"] == f["input_ids"] for f in features) and len(features) > 1


def test_classification_features(bert):
    examples = [
        Example(None, None, text="a cat sat", text_pair="on the mat", label=1),
        Example(None, None, text="word " * 100, label=0),
    ]
    features = tokenize_examples(examples, bert, "classification", 32)
    assert features[0]["input_ids"] == bert("a cat sat", "on the mat")["input_ids"]
    assert features[0]["token_type_ids"].count(1) == len(bert("on the mat")["input_ids"]) - 1
    assert [f["labels"] for f in features] == [1, 0] and len(features[1]["input_ids"]) == 32
    assert_config_error(
        lambda: tokenize_examples(examples, bert, "classification", 32, truncate=False), "example 1", "--max-length"
    )


# --- packing -----------------------------------------------------------------------------------------------------


def lm_features(lengths: list[int], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    features = []
    for n in lengths:
        ids = [rng.randrange(3, 1000) for _ in range(n)]
        features.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]})
    return features


def naive_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        row = next((r for r in rows if sum(lengths[j] for j in r) + n <= capacity), None)
        if row is None:
            rows.append(row := [])
        row.append(i)
    return rows


def test_pack_first_fit_in_order():
    rows = pack(lm_features([6, 6, 3, 2, 5]), 8)
    assert [r["seq_lens"] for r in rows] == [[6, 2], [6], [3, 5]]


def test_pack_keeps_every_example_whole():
    rng = random.Random(1)
    lengths = [rng.randint(1, 40) for _ in range(300)]
    features = lm_features(lengths)
    rows = pack(features, 64)
    placed = [i for row in naive_first_fit(lengths, 64) for i in row]
    assert [r["seq_lens"] for r in rows] == [[lengths[i] for i in row] for row in naive_first_fit(lengths, 64)]
    segments = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == sum(row["seq_lens"]) <= 64
        start = 0
        for n in row["seq_lens"]:
            assert row["position_ids"][start : start + n] == list(range(n))
            assert row["labels"][start] == -100  # never predicted from the previous example
            segments.append((row["input_ids"][start : start + n], row["labels"][start + 1 : start + n]))
            start += n
    assert segments == [(features[i]["input_ids"], features[i]["labels"][1:]) for i in placed]
    assert sum(len(r["input_ids"]) for r in rows) == sum(lengths)


def test_pack_rejects_an_example_longer_than_a_row():
    assert_config_error(lambda: pack(lm_features([3, 9]), 8), "feature 1", "9 tokens")


# --- batching ----------------------------------------------------------------------------------------------------


def padding(batcher: Batcher, batches: list[list[int]]) -> int:
    return sum(max(batcher.lengths[b]) * len(b) - sum(batcher.lengths[b]) for b in batches)


def test_batches_are_deterministic_per_seed_and_epoch():
    features = lm_features([random.Random(i).randint(1, 50) for i in range(250)])
    batcher = Batcher(features, 8, pad_token_id=0, seed=3)
    epoch0 = batcher.epoch_batches(0)
    assert epoch0 == Batcher(features, 8, pad_token_id=0, seed=3).epoch_batches(0)
    assert epoch0 != batcher.epoch_batches(1)
    assert epoch0 != Batcher(features, 8, pad_token_id=0, seed=4).epoch_batches(0)
    for grouped in (True, False):
        for shuffle in (True, False):
            b = Batcher(features, 8, pad_token_id=0, seed=3, group_by_length=grouped, shuffle=shuffle)
            batches = b.epoch_batches(2)
            assert sorted(i for batch in batches for i in batch) == list(range(250))
            assert len(batches) == len(b) == 32 and sum(len(batch) < 8 for batch in batches) == 1
    assert Batcher(features, 8, pad_token_id=0, seed=3, group_by_length=False, shuffle=False).epoch_batches(5)[
        0
    ] == list(range(8))


def test_length_grouping_reduces_padding():
    rng = random.Random(0)
    features = lm_features([rng.randint(1, 200) for _ in range(1000)])
    grouped = Batcher(features, 8, pad_token_id=0, seed=0)
    random_order = Batcher(features, 8, pad_token_id=0, seed=0, group_by_length=False)
    assert padding(grouped, grouped.epoch_batches(0)) * 5 < padding(random_order, random_order.epoch_batches(0))
    assert max(grouped.lengths[grouped.epoch_batches(0)[0]]) == 200  # the longest batch comes first


def test_collate_pads_right():
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
        {"input_ids": [8], "labels": [8], "position_ids": [0]},
    ]
    batch = Batcher(features, 2, pad_token_id=1, seed=0).collate([1, 0])
    assert batch["input_ids"].tolist() == [[8, 1, 1], [5, 6, 7]]
    assert batch["labels"].tolist() == [[8, -100, -100], [-100, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 0, 0], [0, 1, 0]]
    assert "token_type_ids" not in batch


def test_collate_classification(bert):
    examples = [
        Example(None, None, text="short", text_pair="pair", label=1),
        Example(None, None, text="a much longer sentence here", label=0),
    ]
    features = tokenize_examples(examples, bert, "classification", 32)
    batch = Batcher(features, 2, pad_token_id=bert.pad_token_id, seed=0).collate([0, 1])
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    n0 = len(features[0]["input_ids"])
    assert batch["input_ids"][0, n0:].eq(bert.pad_token_id).all() and batch["attention_mask"][0].sum() == n0
    assert batch["token_type_ids"][0, :n0].tolist() == features[0]["token_type_ids"]


# --- train/eval split --------------------------------------------------------------------------------------------


def test_split_train_eval():
    items = list(range(100))
    train, evaluation = split_train_eval(items, 0.1, seed=0)
    assert len(evaluation) == 10 and sorted(train + evaluation) == items and train == sorted(train)
    assert split_train_eval(items, 0.1, seed=0) == (train, evaluation)
    assert split_train_eval(items, 0.1, seed=1)[1] != evaluation
    assert len(split_train_eval(items[:3], 0.01, seed=0)[1]) == 1
    assert_config_error(lambda: split_train_eval(items[:1], 0.5, seed=0), "1 example")

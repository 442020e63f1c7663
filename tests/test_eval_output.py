"""deltatune eval, paper style: multi-reference corpus metrics equal to the libraries' own functions, references
grouped by input, predictions.jsonl / eval.json round trips, several models side by side, and every bad input
reported before a model loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from test_cli_errors import block_model_loads, one_line_error

import deltatune as dt
from deltatune.cli import main
from deltatune.data import Example
from deltatune.eval_runs import read_predictions
from deltatune.scoring import classification_scores, corpus_scores, example_scores, group_references, matthews

PREDICTIONS = ["the cat sat on the mat", "a dog ran in the park today", "it is raining", "hello world"]
REFERENCES = [
    ["the cat is on the mat", "there is a cat on the mat"],
    ["a dog runs in the park", "the dog ran through a park today", "dogs run"],
    ["it rains"],
    ["hello world", "hi world"],
]


def test_multi_reference_bleu_and_chrf_equal_sacrebleu():
    import sacrebleu

    # sacrebleu's own layout, written out by hand: one stream per reference position, None where missing
    streams = [
        [REFERENCES[0][0], REFERENCES[1][0], REFERENCES[2][0], REFERENCES[3][0]],
        [REFERENCES[0][1], REFERENCES[1][1], None, REFERENCES[3][1]],
        [None, REFERENCES[1][2], None, None],
    ]
    ours = corpus_scores(PREDICTIONS, REFERENCES, ("bleu", "chrf"))
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, streams).score, abs=1e-9)
    assert ours["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, streams).score, abs=1e-9)
    # more references can only help: the first reference alone scores lower
    single = corpus_scores(PREDICTIONS, [[r[0]] for r in REFERENCES], ("bleu",))
    assert single["bleu"] < ours["bleu"]


def test_rouge_l_is_the_best_reference_and_nist_is_nltks():
    from nltk.translate.nist_score import corpus_nist
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = zip(PREDICTIONS, REFERENCES, strict=True)
    best = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in pairs]
    ours = corpus_scores(PREDICTIONS, REFERENCES, ("rougeL", "nist", "exact_match"))
    assert ours["rougeL"] == pytest.approx(100 * np.mean(best))
    nist = corpus_nist([[r.split() for r in refs] for refs in REFERENCES], [p.split() for p in PREDICTIONS], n=5)
    assert ours["nist"] == pytest.approx(nist)
    assert ours["exact_match"] == 25.0  # "hello world" matches its first reference


def test_nist_of_predictions_shorter_than_five_words():
    """Every prediction under 5 words: nltk's corpus_nist divides by zero; ours adds 0 for the orders no
    prediction reaches (mteval-v13a's max(count, 1)), so it is Doddington's formula over orders 1 and 2."""
    import math

    from nltk.translate.nist_score import corpus_nist

    predictions, references = ["hello world", "it rains"], [["hello world"], ["it rains today"]]
    refs, hyps = [[r.split() for r in rs] for rs in references], [p.split() for p in predictions]
    with pytest.raises(ZeroDivisionError):
        corpus_nist(refs, hyps, n=5)
    # by hand: 5 reference words; each matched unigram carries log2(5 / 1), each matched bigram log2(1 / 1) = 0;
    # 4 words against 5 give the brevity factor exp(beta * ln(4/5)^2), beta = ln(0.5) / ln(1.5)^2
    beta = math.log(0.5) / math.log(1.5) ** 2
    wanted = (4 * math.log2(5) / 4 + 0 / 2) * math.exp(beta * math.log(4 / 5) ** 2)
    assert corpus_scores(predictions, references, ("nist",))["nist"] == pytest.approx(wanted, rel=1e-12)
    assert corpus_nist(refs, hyps, n=2) == pytest.approx(wanted, rel=1e-12)  # nltk up to the longest prediction
    assert corpus_scores(["", ""], references, ("nist",))["nist"] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_nist_equals_nltk_whenever_nltk_has_a_value(seed):
    from nltk.translate.nist_score import corpus_nist

    rng = np.random.default_rng(seed)
    words = ["a", "b", "c", "d", "e", "f"]

    def sentence(low: int) -> str:
        return " ".join(rng.choice(words, size=int(rng.integers(low, 9))))

    predictions = [sentence(0) for _ in range(6)] + [sentence(5)]  # one of 5+ words: nltk divides by nothing 0
    references = [[sentence(1) for _ in range(int(rng.integers(1, 4)))] for _ in predictions]
    wanted = corpus_nist([[r.split() for r in rs] for rs in references], [p.split() for p in predictions], n=5)
    assert corpus_scores(predictions, references, ("nist",))["nist"] == wanted


def test_example_scores_are_sacrebleus_sentence_scores():
    import sacrebleu

    scores = example_scores(PREDICTIONS[1], REFERENCES[1], ("bleu", "chrf"))
    assert scores["bleu"] == pytest.approx(sacrebleu.sentence_bleu(PREDICTIONS[1], REFERENCES[1]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.sentence_chrf(PREDICTIONS[1], REFERENCES[1]).score)


def test_classification_scores_against_other_computations():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50).tolist()
    predictions = [y if rng.random() < 0.7 else 1 - y for y in labels]
    scores = classification_scores(predictions, labels)
    # binary Matthews correlation is Pearson's correlation of the two 0/1 vectors
    assert scores["mcc"] == pytest.approx(np.corrcoef(predictions, labels)[0, 1])
    tp = sum(p == y == 1 for p, y in zip(predictions, labels, strict=True))
    precision, recall = tp / sum(predictions), tp / sum(labels)
    assert scores["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert scores["accuracy"] == pytest.approx(np.mean(np.array(predictions) == np.array(labels)))
    assert matthews([0, 0, 0], [0, 1, 0], 2) == 0.0  # a constant prediction


def test_classification_scores_equal_sklearn():
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed")
    rng = np.random.default_rng(1)
    labels, predictions = rng.integers(0, 3, 60).tolist(), rng.integers(0, 3, 60).tolist()
    ours = classification_scores(predictions, labels, num_labels=3)
    assert ours["mcc"] == pytest.approx(metrics.matthews_corrcoef(labels, predictions))
    assert ours["f1"] == pytest.approx(metrics.f1_score(labels, predictions, average="macro"))


def test_group_references_by_input_or_key():
    rows = [("a", "1"), ("b", "2"), ("a", "3"), ("c", "4"), ("b", "5")]
    examples = [Example(prompt=p, target=t) for p, t in rows]
    groups = group_references(examples)
    assert [(g.key, g.references, g.rows) for g in groups] == [
        ("a", ["1", "3"], [0, 2]),
        ("b", ["2", "5"], [1, 4]),
        ("c", ["4"], [3]),
    ]
    by_key = group_references(examples, ["x", "x", "y", "y", "x"])
    assert [(g.key, g.references) for g in by_key] == [("x", ["1", "2", "5"]), ("y", ["3", "4"])]


# --- the command -----------------------------------------------------------------------------------
def e2e_file(path: Path, inputs: int = 3) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref", "id"])
        for i in range(inputs):
            for j in range(i + 1):  # input i has i + 1 references
                writer.writerow([f"name[Place {i}], food[Thai]", f"Place {i} serves Thai food, version {j}.", i])
    return path


def adapter_dir(directory: Path, seed: int = 0) -> Path:
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=seed)
    model.save_pretrained(directory)
    return directory


def test_eval_writes_predictions_that_round_trip(tiny_llama_dir, tmp_path, capsys):
    data, adapter, out = e2e_file(tmp_path / "dev.csv"), adapter_dir(tmp_path / "lora"), tmp_path / "out"
    argv = ["eval", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "--data", str(data)]
    assert main([*argv, "--output-dir", str(out), "--max-new-tokens", "6", "--metrics", "bleu", "chrf"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "eval.json").read_text())
    assert printed == saved and {"loss", "bleu", "chrf"} <= set(saved)
    records = read_predictions(out / "predictions.jsonl")
    assert [len(r["references"]) for r in records] == [1, 2, 3]  # one line per distinct input
    # the corpus scores recomputed from the file equal the reported ones
    again = corpus_scores([r["prediction"] for r in records], [r["references"] for r in records], ("bleu", "chrf"))
    assert again == pytest.approx({k: saved[k] for k in ("bleu", "chrf")})
    # each prediction is the library's own greedy completion of that input
    base, tokenizer = dt.load_base(str(tiny_llama_dir))
    model = dt.DeltaModel.from_pretrained(base, adapter)
    expected = dt.evaluation.generate(model, tokenizer, [Example(prompt=r["input"], target=None) for r in records], 6)
    assert [r["prediction"] for r in records] == expected


def test_eval_limit_group_by_and_beams(tiny_llama_dir, tmp_path, capsys):
    data, out = e2e_file(tmp_path / "dev.csv", inputs=4), tmp_path / "out"
    argv = ["eval", "--base", str(tiny_llama_dir), "--data", str(data), "--output-dir", str(out)]
    assert (
        main([*argv, "--limit", "2", "--group-by", "id", "--num-beams", "3", "--max-new-tokens", "5", "--no-loss"]) == 0
    )
    assert "loss" not in json.loads(capsys.readouterr().out)
    records = read_predictions(out / "predictions.jsonl")
    assert [len(r["references"]) for r in records] == [1, 2]
    base, tokenizer = dt.load_base(str(tiny_llama_dir))
    ids = dt.data.prompt_ids(Example(prompt=records[1]["input"], target=None), tokenizer)
    with torch.no_grad():
        beams = base.generate(torch.tensor([ids]), num_beams=3, max_new_tokens=5, do_sample=False)
    assert records[1]["prediction"] == tokenizer.decode(beams[0, len(ids) :], skip_special_tokens=True).strip()


def test_several_adapters_side_by_side(tiny_llama_dir, tmp_path, capsys):
    data = e2e_file(tmp_path / "dev.csv")
    one, two, out = adapter_dir(tmp_path / "one", 1), adapter_dir(tmp_path / "two", 2), tmp_path / "out"
    argv = ["eval", "--base", str(tiny_llama_dir), "--data", str(data), "--max-new-tokens", "4"]
    assert (
        main([*argv, "--adapter", "base", "--adapter", str(one), "--adapter", str(two), "--output-dir", str(out)]) == 0
    )
    assert main([*argv, "--adapter", str(two), "--output-dir", str(tmp_path / "alone")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["metric", "base", "one", "two"] and table[1].split()[0] == "loss"
    side = json.loads((out / "eval.json").read_text())
    assert side["two"] == pytest.approx(json.loads((tmp_path / "alone" / "eval.json").read_text()))
    assert side["base"]["loss"] != side["one"]["loss"]
    assert read_predictions(out / "two" / "predictions.jsonl") == read_predictions(tmp_path / "alone/predictions.jsonl")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metrics", "bleu", "cider"], "unknown metric(s) cider"),
        (["--prompt-column", "mr", "--target-column", "reference"], "reference"),
        (["--group-by", "nope"], "--group-by nope"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--num-beams", "0"], "--num-beams must be at least 1"),
        (["--data", "EMPTY"], "holds no examples"),
    ],
)
def test_bad_input_is_an_error_before_the_model_loads(extra, message, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    data = e2e_file(tmp_path / "dev.csv")
    (tmp_path / "empty.jsonl").write_text("")
    extra = [str(tmp_path / "empty.jsonl") if a == "EMPTY" else a for a in extra]
    loads = block_model_loads(monkeypatch)
    assert main(["eval", "--base", str(tiny_llama_dir), "--data", str(data), *extra]) == 2
    assert message in one_line_error(capsys) and loads == []

"""Scores the way papers report them: several references per input, corpus metrics from the libraries that
define them (sacrebleu's BLEU and chrF, rouge-score's ROUGE-L, nltk's NIST), and classification accuracy, F1
and Matthews correlation from their textbook formulas.

Missing on purpose: CIDEr and METEOR. CIDEr's only package (pycocoevalcap) is unmaintained and needs Java;
nltk's METEOR needs the WordNet corpus downloaded at run time, which deltatune never does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from deltatune.config import ConfigError
from deltatune.data import Example

GENERATION_METRICS = ("bleu", "chrf", "rougeL", "nist", "exact_match")
CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
DEFAULT_GENERATION = ("bleu", "chrf", "rougeL", "exact_match")


@dataclass
class Group:
    """One distinct input: the example to prompt with, every reference given for it, and its rows."""

    example: Example
    key: str
    references: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


def input_key(example: Example) -> str:
    """The text an input is recognised by when several rows share it (E2E's meaning representation)."""
    prompt = example.prompt
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)
    return prompt if prompt is not None else (example.text or "")


def group_references(examples: Sequence[Example], keys: Sequence[str] | None = None) -> list[Group]:
    """Rows grouped by input (or by ``keys``, one per row: a ``--group-by`` column), in first-seen order;
    each group's references are its rows' targets in file order."""
    if keys is not None and len(keys) != len(examples):
        raise ConfigError(f"{len(keys)} group keys for {len(examples)} examples")
    groups: dict[str, Group] = {}
    for i, example in enumerate(examples):
        key = keys[i] if keys is not None else input_key(example)
        group = groups.setdefault(key, Group(example, key))
        if example.target is not None:
            group.references.append(example.target)
        group.rows.append(i)
    return list(groups.values())


def check_metrics(names: Sequence[str] | None, task: str) -> tuple[str, ...]:
    """The metrics asked for (the task's defaults for None), refusing any this task cannot compute."""
    known = CLASSIFICATION_METRICS if task == "classification" else GENERATION_METRICS
    if not names:
        return CLASSIFICATION_METRICS if task == "classification" else DEFAULT_GENERATION
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)} for task {task}: choose from {', '.join(known)}")
    return tuple(dict.fromkeys(names))


def _transpose(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """sacrebleu's layout: one stream per reference position, ``None`` where an input has fewer references."""
    width = max(map(len, references))
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def corpus_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Sequence[str] = DEFAULT_GENERATION,
    exact_match: Callable[[str, str], bool] | None = None,
) -> dict[str, float]:
    """Corpus metrics of ``predictions`` against each input's list of references (0-100 scales)."""
    if len(predictions) != len(references) or any(not refs for refs in references):
        raise ConfigError("every prediction needs at least one reference")
    out: dict[str, float] = {}
    if "bleu" in metrics or "chrf" in metrics:
        import sacrebleu

        streams = _transpose(references)
        if "bleu" in metrics:
            out["bleu"] = sacrebleu.corpus_bleu(list(predictions), streams).score
        if "chrf" in metrics:
            out["chrf"] = sacrebleu.corpus_chrf(list(predictions), streams).score
    if "rougeL" in metrics:
        out["rougeL"] = 100 * _mean(rouge_l(p, refs) for p, refs in zip(predictions, references, strict=True))
    if "nist" in metrics:
        hyps = [p.split() for p in predictions]
        out["nist"] = corpus_nist([[r.split() for r in refs] for refs in references], hyps, n=5)
    if "exact_match" in metrics:
        match = exact_match or (lambda p, r: p.strip() == r.strip())
        hits = (any(match(p, r) for r in refs) for p, refs in zip(predictions, references, strict=True))
        out["exact_match"] = 100 * _mean(hits)
    return out


def corpus_nist(references: Sequence[Sequence[list[str]]], hypotheses: Sequence[list[str]], n: int = 5) -> float:
    """nltk's ``corpus_nist`` (nltk 3.10, the same arithmetic step by step), except that an n-gram order no
    hypothesis is long enough for adds 0 to the score instead of dividing by zero: NIST's reference script
    (mteval-v13a.pl) divides by ``max(count, 1)``. nltk raises ZeroDivisionError when every hypothesis has fewer
    than ``n`` words; on any other input both give the same value (tests/test_eval_output.py)."""
    from collections import Counter

    from nltk.translate.nist_score import nist_length_penalty
    from nltk.util import ngrams

    freq: Counter = Counter()
    total_words = 0
    for refs in references:
        for ref in refs:
            for i in range(1, n + 1):
                freq.update(ngrams(ref, i))
            total_words += len(ref)
    weight = {g: math.log((freq[g[:-1]] if g[:-1] and g[:-1] in freq else total_words) / c, 2) for g, c in freq.items()}
    score, ref_len, sys_len = 0.0, 0, 0
    for i in range(1, n + 1):
        numerator = denominator = 0
        for refs, hyp in zip(references, hypotheses, strict=True):
            hyp_grams = Counter(ngrams(hyp, i)) if len(hyp) >= i else Counter()
            per_ref = []
            for ref in refs:
                overlap = hyp_grams & (Counter(ngrams(ref, i)) if len(ref) >= i else Counter())
                num, den = sum(weight[g] * c for g, c in overlap.items()), sum(hyp_grams.values())
                per_ref.append((0 if den == 0 else num / den, num, den, len(ref)))
            _, num, den, length = max(per_ref)  # nltk's choice of reference, ties and all
            numerator, denominator = numerator + num, denominator + den
            ref_len, sys_len = ref_len + length, sys_len + len(hyp)
        score += numerator / denominator if denominator else 0.0
    return score * nist_length_penalty(ref_len, sys_len) if ref_len else 0.0


def example_scores(prediction: str, references: Sequence[str], metrics: Sequence[str]) -> dict[str, float]:
    """One input's scores: sentence BLEU and chrF (sacrebleu, all references), best ROUGE-L over references."""
    import sacrebleu

    out: dict[str, float] = {}
    if "bleu" in metrics:
        out["bleu"] = sacrebleu.sentence_bleu(prediction, list(references)).score
    if "chrf" in metrics:
        out["chrf"] = sacrebleu.sentence_chrf(prediction, list(references)).score
    if "rougeL" in metrics:
        out["rougeL"] = 100 * rouge_l(prediction, references)
    if "exact_match" in metrics:
        out["exact_match"] = 100.0 * any(prediction.strip() == r.strip() for r in references)
    return out


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """rouge-score's ROUGE-L F-measure against the best-matching reference (its ``score_multi``)."""
    return _scorer().score_multi(list(references), prediction)["rougeL"].fmeasure


_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:  # built once: it loads the stemmer; scoring keeps no per-call state on it
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def classification_scores(predictions: Sequence[int], labels: Sequence[int], num_labels: int = 2) -> dict[str, float]:
    """Accuracy, F1 (of class 1 when binary, macro-averaged otherwise) and Matthews correlation."""
    if len(predictions) != len(labels) or not labels:
        raise ConfigError(f"{len(predictions)} predictions for {len(labels)} labels")
    classes = range(max(num_labels, max(predictions) + 1, max(labels) + 1))
    f1s = [class_f1(predictions, labels, c) for c in classes]
    return {
        "accuracy": _mean(p == g for p, g in zip(predictions, labels, strict=True)),
        "f1": f1s[1] if num_labels == 2 else _mean(f1s),
        "mcc": matthews(predictions, labels, len(classes)),
    }


def class_f1(predictions: Sequence[int], labels: Sequence[int], positive: int) -> float:
    tp = sum(p == g == positive for p, g in zip(predictions, labels, strict=True))
    predicted, actual = predictions.count(positive), labels.count(positive)
    return 2 * tp / (predicted + actual) if predicted + actual else 0.0


def matthews(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004), 0 when either side is constant."""
    n = len(labels)
    correct = sum(p == g for p, g in zip(predictions, labels, strict=True))
    p_counts = [list(predictions).count(k) for k in range(num_classes)]
    t_counts = [list(labels).count(k) for k in range(num_classes)]
    cov = correct * n - sum(p * t for p, t in zip(p_counts, t_counts, strict=True))
    denom = math.sqrt((n * n - sum(p * p for p in p_counts)) * (n * n - sum(t * t for t in t_counts)))
    return cov / denom if denom else 0.0

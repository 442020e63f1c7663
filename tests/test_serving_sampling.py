"""A serving row's sampler (``serving.rows.pick``) against nucleus sampling as Holtzman et al. define it:
the smallest set of most likely tokens whose probability reaches top_p, renormalised; temperature divides
the logits first; temperature 0 is the argmax. Frequencies of many seeded draws are compared with the
distribution written here by hand."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.serving.rows import Request, pick

PROBS = [0.05, 0.5, 0.15, 0.3]  # token 1 most likely, then 3, 2, 0
DRAWS = 4000


def _request(**sampling) -> Request:
    return Request("base", [1], 1, lambda event: None, **sampling)


def _nucleus(probs: list[float], top_p: float) -> dict[int, float]:
    """The smallest most-likely set whose probability reaches top_p, renormalised (by hand)."""
    kept, total = {}, 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        if total >= top_p:
            break
        kept[token] = probs[token]
        total += probs[token]
    return {token: p / total for token, p in kept.items()}


def _frequencies(logits: torch.Tensor, **sampling) -> dict[int, float]:
    request = _request(seed=0, **sampling)
    drawn = [pick(request, logits) for _ in range(DRAWS)]
    return {token: drawn.count(token) / DRAWS for token in set(drawn)}


@pytest.mark.parametrize("top_p", [0.45, 0.7, 0.9, 1.0])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
    expected = _nucleus(PROBS, top_p)
    found = _frequencies(torch.tensor(PROBS).log(), temperature=1.0, top_p=top_p)
    assert set(found) == set(expected)  # 0.7: tokens 1 and 3 (0.5 alone does not reach it; 0.8 does)
    for token, p in expected.items():
        assert abs(found[token] - p) < 4 * math.sqrt(p * (1 - p) / DRAWS) + 1e-9


def test_temperature_divides_the_logits_and_zero_is_greedy():
    logits = torch.tensor(PROBS).log()
    scaled = torch.softmax(logits / 0.5, dim=-1).tolist()
    found = _frequencies(logits, temperature=0.5)
    for token, p in enumerate(scaled):
        assert abs(found.get(token, 0.0) - p) < 4 * math.sqrt(p * (1 - p) / DRAWS) + 1e-9
    assert pick(_request(temperature=0.0), logits) == 1


def test_a_seed_repeats_its_draws():
    logits = torch.tensor(PROBS).log()
    first, second = _request(seed=5, temperature=1.0), _request(seed=5, temperature=1.0)
    assert [pick(first, logits) for _ in range(50)] == [pick(second, logits) for _ in range(50)]

"""Sampling rules on hand-made logits: greedy, top-k, top-p, min-p, temperature,
repetition penalty, seed reproducibility, and validation of the settings."""

from __future__ import annotations

import pytest
import torch

from llmrun.errors import LlmrunError
from llmrun.runtime.sampling import apply_repetition_penalty, sample, validate
from llmrun.runtime.types import SamplingSettings

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))


def draws(settings, n=400, logits=LOGITS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [sample(logits, settings, g) for _ in range(n)]


def test_greedy_at_temperature_zero():
    assert set(draws(SamplingSettings(temperature=0), n=20)) == {0}


def test_top_k_keeps_only_k_tokens():
    assert set(draws(SamplingSettings(temperature=1.0, top_k=2))) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.5 + 0.25 = 0.75 < 0.8: the third token is needed, the fourth is not
    assert set(draws(SamplingSettings(temperature=1.0, top_p=0.8))) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    # 0.25 * 0.5 = 0.125: tokens with p < 0.125 are dropped
    assert set(draws(SamplingSettings(temperature=1.0, min_p=0.25))) == {0, 1, 2}


def test_temperature_flattens_and_sharpens():
    hot = draws(SamplingSettings(temperature=5.0), n=2000)
    cold = draws(SamplingSettings(temperature=0.2), n=2000)
    assert hot.count(0) < 1000 < cold.count(0)


def test_same_seed_same_draws_other_seed_differs():
    s = SamplingSettings(temperature=1.0)
    assert draws(s, seed=7) == draws(s, seed=7)
    assert draws(s, seed=7) != draws(s, seed=8)


def test_repetition_penalty_shrinks_seen_tokens_toward_zero():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert sample(logits, SamplingSettings(temperature=0, repetition_penalty=3.0), None,
                  torch.tensor([0])) == 2


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
                                         ("min_p", 1.0), ("top_k", -1), ("repetition_penalty", 0.0),
                                         ("max_new_tokens", 0)])
def test_invalid_settings_raise_one_clear_error(field, value):
    with pytest.raises(LlmrunError, match="invalid sampling settings"):
        validate(SamplingSettings(**{field: value}))

"""The two shipped real models against transformers (the oracle), fp32: full-sequence
logits, greedy tokens, golden text, and KV-cache decode against a no-cache forward."""

from __future__ import annotations

import pytest
import torch

from llmrun.generate import Generator
from llmrun.generation_types import SamplingSettings
from llmrun.kv_cache import KVCache

PROMPT = ("The quick brown fox jumps over the lazy dog. Meanwhile, in a small village by the "
          "sea, an old fisherman was mending his nets and telling stories about")
GOLDEN = {
    "smollm2": " Paris.\n\nThe answer is:",
    "gemma3": " the capital of the country of France.",
}


@pytest.fixture(params=["smollm2", "gemma3"])
def pair(request):
    return request.param, request.getfixturevalue(f"{request.param}_pair")


def _prompt_ids(tok, n=32):
    ids = tok.encode(PROMPT)[:n]
    assert len(ids) == n, "the test prompt must give at least 32 tokens"
    return ids


def test_full_sequence_logits_match_transformers(pair):
    name, (ours, tok, hf) = pair
    ids = torch.tensor([_prompt_ids(tok)])
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    # Same fp32 math up to op order: observed exact on both models; allow fp32 reassociation.
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)


def test_32_greedy_tokens_match_transformers(pair):
    name, (ours, tok, hf) = pair
    ids = _prompt_ids(tok)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0, min_new_tokens=32)
    expected = out[0, len(ids):].tolist()
    gen = Generator(ours, tok)
    got = [c.token for c in gen.stream(ids, SamplingSettings(max_new_tokens=32, temperature=0),
                                       ignore_eos=True) if c.token is not None]
    assert got == expected


def test_golden_greedy_text(pair):
    name, (ours, tok, hf) = pair
    gen = Generator(ours, tok)
    ids = tok.encode("The capital of France is")
    golden = GOLDEN[name]
    text = "".join(c.text for c in gen.stream(ids, SamplingSettings(max_new_tokens=10, temperature=0)))
    assert text.startswith(golden), text


def test_kv_cache_decode_equals_full_forward(pair):
    name, (ours, tok, hf) = pair
    ids = torch.tensor([_prompt_ids(tok, 24)])
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(ours.config, 2, 256, torch.float32)
        slot = torch.tensor([1])
        steps = [ours(ids[:, :16], torch.arange(16)[None], cache, slot)]
        steps += [ours(ids[:, i:i + 1], torch.tensor([[i]]), cache, slot) for i in range(16, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-3, rtol=1e-4)

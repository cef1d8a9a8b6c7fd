"""The two shipped real models against transformers (the oracle), fp32: full-sequence
logits, greedy tokens, golden text, and KV-cache decode against a no-cache forward."""

from __future__ import annotations

import pytest
import torch

from llmrun.runtime.generator import Generator
from llmrun.runtime.kv_cache import KVCache
from llmrun.runtime.types import SamplingSettings

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


def _greedy(gen, ids, n, max_new=None):
    """The first n greedy tokens (the request allows max_new) and the final stats."""
    import threading

    stop, tokens, stats = threading.Event(), [], None
    settings = SamplingSettings(max_new_tokens=max_new or n, temperature=0)
    for chunk in gen.stream(ids, settings, stop, ignore_eos=True):
        if chunk.token is not None:
            tokens.append(chunk.token)
            if len(tokens) == n:
                stop.set()
        stats = chunk.stats or stats
    return tokens, stats


def test_prefix_reuse_gives_the_tokens_of_a_full_prefill(pair):
    """Requests that begin with what the cache holds (a chat's next turn, the same prompt again,
    an edited turn) prefill only the rest, and give a fresh generator's tokens; the next turn
    also outgrows the cache, whose kept positions move into the longer one."""
    name, (ours, tok, hf) = pair
    gen = Generator(ours, tok)
    first = _prompt_ids(tok, 24)
    answer, stats = _greedy(gen, first, 12)
    assert stats.reused_tokens == 0 and gen.cache.length == 512
    extra = tok.encode(" Then, the sea")[-4:]
    requests = [  # (prompt, tokens the cache must hold of it, max_new)
        (first + answer + extra, len(first) + len(answer) - 1, 600),  # the answer's last id was never fed
        (first + answer + extra, len(first + answer + extra) - 2, None),  # two fed: sequence.prefill_end
        (first[:10] + extra, 10, None),
    ]
    for ids, reused, max_new in requests:
        got, stats = _greedy(gen, ids, 8, max_new)
        expected, fresh = _greedy(Generator(ours, tok), ids, 8)
        assert stats.reused_tokens == reused and fresh.reused_tokens == 0
        assert got == expected, (ids, reused)
    assert gen.cache.length == 1024  # grown by the first of them

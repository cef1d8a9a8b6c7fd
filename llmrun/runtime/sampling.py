"""Next-token choice from one row of logits: greedy at temperature 0, else temperature,
top-k, top-p, min-p, with a repetition penalty, drawn from a seeded generator."""

from __future__ import annotations

import torch

from llmrun.errors import LlmrunError
from llmrun.runtime.types import SamplingSettings

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


def validate(s: SamplingSettings) -> None:
    problems = []
    if s.temperature < 0:
        problems.append(f"temperature {s.temperature} must be >= 0")
    if not 0 < s.top_p <= 1:
        problems.append(f"top-p {s.top_p} must be in (0, 1]")
    if not 0 <= s.min_p < 1:
        problems.append(f"min-p {s.min_p} must be in [0, 1)")
    if s.top_k < 0:
        problems.append(f"top-k {s.top_k} must be >= 0")
    if s.repetition_penalty <= 0:
        problems.append(f"repetition penalty {s.repetition_penalty} must be > 0")
    if s.logprobs is not None and not 0 <= s.logprobs <= MAX_TOP_LOGPROBS:
        problems.append(f"logprobs {s.logprobs} must be in [0, {MAX_TOP_LOGPROBS}]")
    if s.max_new_tokens < 1:
        problems.append(f"max new tokens {s.max_new_tokens} must be >= 1")
    if problems:
        raise LlmrunError("invalid sampling settings: " + "; ".join(problems))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    # logits: (vocab,) float32; seen: (n,) token ids. transformers' rule: shrink toward zero.
    scores = logits.gather(0, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen, scores)


def sample(logits: torch.Tensor, s: SamplingSettings, generator: torch.Generator | None,
           seen: torch.Tensor | None = None) -> int:
    """logits: (vocab,) float32 -> token id."""
    if s.repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
    if s.temperature == 0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if s.min_p > 0:
        probs = probs.masked_fill(probs < s.min_p * probs.max(), 0.0)
    if s.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > s.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))

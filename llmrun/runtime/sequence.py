"""One request's generation state, whatever runs its steps: its sampling settings and seeded
generator, repetition history, stop tokens, incremental detokenizer and stats. The single
stream (llmrun.runtime.generator) and the batched scheduler (llmrun.runtime.scheduler) both
drive it: they feed it each step's logits row and pass on the chunks it returns."""

from __future__ import annotations

import time

import torch

from llmrun.errors import LlmrunError
from llmrun.runtime.memory import peak_rss_bytes
from llmrun.runtime.sampling import sample, validate
from llmrun.runtime.types import GenerationChunk, GenerationStats, SamplingSettings


def check_prompt(n_prompt: int, context: int) -> None:
    if n_prompt == 0:
        raise LlmrunError("the prompt is empty: give some text to continue from")
    if n_prompt >= context:
        raise LlmrunError(f"the prompt has {n_prompt} tokens but the context is {context}: "
                          "shorten the prompt")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def reusable(cached: list[int], prompt: list[int]) -> int:
    """How many of `prompt`'s first tokens a cache holding `cached` can keep: the common
    prefix, leaving at least two tokens to feed (the last one's logits give the first new
    token) unless the prompt has one. See prefill_end for why never one alone."""
    return max(0, min(common_prefix(cached, prompt), len(prompt) - 2))


def prefill_end(lo: int, n: int, chunk: int) -> int:
    """Where a prefill chunk that starts at `lo` of an n-token prompt ends: at most `chunk`
    tokens, and never leaving one token for a chunk of its own. A one-token step attends
    through the decode kernel, whose rounding differs from the prefill kernel's, and a prompt
    would then give other logits (and greedy tokens) depending on how it was split or reused;
    chunks of two or more give every position the same result whatever the split."""
    hi = min(lo + chunk, n)
    return hi - 1 if n - hi == 1 and hi - lo > 1 else hi


class Sequence:
    """Call `start_prefill(reused)`, then `first(logits)` once the prompt is in the cache, then
    `next(logits)` after each decode step; each returns the chunk to pass on. `token` is the
    id to feed the next decode step, at position `pos`; `finished` says when to stop."""

    def __init__(self, tokenizer, prompt_ids: list[int], settings: SamplingSettings,
                 context: int, ignore_eos: bool = False):
        validate(settings)
        check_prompt(len(prompt_ids), context)
        self.prompt = list(prompt_ids)
        self.settings = settings
        self.max_new = min(settings.max_new_tokens, context - len(prompt_ids))
        self.context_limited = self.max_new < settings.max_new_tokens
        self.generator = None
        if settings.seed is not None:
            self.generator = torch.Generator().manual_seed(settings.seed)
        self.eos = set() if ignore_eos else set(tokenizer.eos_ids)
        # control tokens are not text: a model that emits one goes on, but nothing is printed
        # for it (as llama.cpp and transformers' skip_special_tokens); context keeps a leading space
        self.decoder = tokenizer.stream_decoder(prompt_ids[-4:], skip_special_tokens=True)
        self.seen = torch.tensor(prompt_ids, dtype=torch.long)
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.generated: list[int] = []
        self.token: int | None = None
        self.finished = False
        self.decode_steps = 0
        self._start = self._first = 0.0
        self._logprobs = None  # (logits row, sampled id) while settings.logprobs asks for them

    @property
    def pos(self) -> int:
        """The position of `token`, the next id to feed."""
        return len(self.prompt) + len(self.generated) - 1

    def start_prefill(self, reused: int) -> None:
        self.stats.reused_tokens = reused
        self._start = time.perf_counter()

    def first(self, logits: torch.Tensor) -> GenerationChunk | None:
        """logits: (vocab,) after the prompt's last position -> the first token's chunk."""
        self._first = time.perf_counter()
        self.stats.ttft_s = self._first - self._start
        self.stats.prefill_tps = (len(self.prompt) - self.stats.reused_tokens) / self.stats.ttft_s
        return self._take(self._sample(logits))

    def next(self, logits: torch.Tensor) -> GenerationChunk | None:
        """logits: (vocab,) after feeding `token` -> the next token's chunk."""
        self.decode_steps += 1
        if self.settings.repetition_penalty != 1.0:
            self.seen = torch.cat([self.seen, torch.tensor([self.token])])
        return self._take(self._sample(logits))

    def finish(self, reason: str | None = None) -> GenerationChunk:
        """The last chunk: what the detokenizer held back, and the stats."""
        if reason is not None:
            self.stats.finish_reason = reason
        self.finished = True
        end = time.perf_counter()
        self.stats.generated_tokens = len(self.generated)
        if self.decode_steps:  # the first token came from prefill
            self.stats.decode_tps = self.decode_steps / (end - self._first)
        self.stats.peak_rss_bytes = peak_rss_bytes()
        return GenerationChunk(text=self.decoder.flush(), stats=self.stats, finished=True)

    def _sample(self, logits: torch.Tensor) -> int:
        token = sample(logits, self.settings, self.generator, self.seen)
        self._logprobs = None if self.settings.logprobs is None else (logits, token)
        return token

    def _logprob_fields(self) -> dict:
        """The sampled token's log-probability under the model's distribution (before sampling
        settings), and the settings.logprobs likeliest tokens'."""
        if self._logprobs is None:
            return {}
        logits, token = self._logprobs
        logp = logits.float().log_softmax(-1)  # (vocab,)
        top = torch.topk(logp, self.settings.logprobs) if self.settings.logprobs else None
        return {"logprob": float(logp[token]),
                "top_logprobs": () if top is None else
                tuple(zip(top.indices.tolist(), top.values.tolist()))}

    def _take(self, token: int) -> GenerationChunk | None:
        if token in self.eos:
            self.stats.finish_reason = "stop"
            self.finished = True
            return None
        self.token = token
        self.generated.append(token)
        if len(self.generated) >= self.max_new:
            self.stats.finish_reason = "context" if self.context_limited else "length"
            self.finished = True
        return GenerationChunk(text=self.decoder.push(token), token=token, **self._logprob_fields())

"""The one streaming generator. gpt-fast shape: `prefill` and `decode_one` are separate
functions over a static KV cache written by index (the compile layer wraps them); the
Generator owns that cache (llmrun.kv_cache) and `stream` drives the steps, samples,
detokenizes incrementally and yields chunks."""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable, Iterator

import torch

from llmrun.errors import LlmrunError
from llmrun.generation_types import GenerationChunk, GenerationStats, SamplingSettings
from llmrun.kv_cache import KVCache
from llmrun.models import Transformer
from llmrun.sampling import sample, validate

PREFILL_CHUNK = 512  # long prompts prefill in chunks: bounded activation memory
MIN_CACHE = 512  # KV cache lengths are powers of two from this: few compiled shapes


def prefill(model: Transformer, cache: KVCache, ids: torch.Tensor, input_pos: torch.Tensor,
            slots: torch.Tensor) -> torch.Tensor:
    # ids: (B, T); input_pos: (B, T); slots: (B,) -> logits of each row's last position (B, 1, vocab)
    return model(ids, input_pos, cache, slots, last_only=True)


def decode_one(model: Transformer, cache: KVCache, token: torch.Tensor, input_pos: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
    # token: (B, 1); input_pos: (B, 1); slots: (B,) -> (B, 1, vocab)
    return model(token, input_pos, cache, slots)


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, not getrusage: ru_maxrss survives exec, so a
    process started by a big parent (a test runner, a notebook) would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cache_length(needed: int, context: int) -> int:
    length = MIN_CACHE
    while length < needed:
        length *= 2
    return min(context, length)


SLOT = torch.zeros(1, dtype=torch.long)  # the one stream's cache slot


class Generator:
    """Holds a model, its step functions and the KV cache they write (one slot)."""

    def __init__(self, model: Transformer, tokenizer,
                 prefill_fn: Callable = prefill, decode_fn: Callable = decode_one):
        self.model, self.tokenizer = model, tokenizer
        self.prefill_fn, self.decode_fn = prefill_fn, decode_fn
        self.context = model.config.max_seq_len
        self.cache: KVCache | None = None

    def ensure_cache(self, needed: int) -> KVCache:
        """A cache of at least `needed` positions (a power of two from MIN_CACHE, at most the
        context): the one there when it has that length, else a new one."""
        length = cache_length(needed, self.context)
        if self.cache is None or self.cache.length != length:
            self.cache = None  # the old one is freed before the new one is allocated
            self.cache = KVCache(self.model.config, 1, length, self.model.model.norm.weight.dtype)
        return self.cache

    @torch.inference_mode()
    def warm_up(self, prompt_len: int = 8, max_new: int = 256) -> None:
        """Run prefill and two decode steps on dummy ids for the cache size of a typical
        request, so compilation happens here and not inside a timed generation."""
        cache = self.ensure_cache(prompt_len + max_new)
        ids = torch.zeros((1, prompt_len), dtype=torch.long)
        self.prefill_fn(self.model, cache, ids, torch.arange(prompt_len)[None], SLOT)
        for pos in (prompt_len, prompt_len + 1):
            self.decode_fn(self.model, cache, torch.zeros((1, 1), dtype=torch.long), torch.tensor([[pos]]), SLOT)

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], settings: SamplingSettings,
               stop: threading.Event | None = None, ignore_eos: bool = False
               ) -> Iterator[GenerationChunk]:
        validate(settings)
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise LlmrunError("the prompt is empty: give some text to continue from")
        if n_prompt >= self.context:
            raise LlmrunError(f"the prompt has {n_prompt} tokens but the model's context is "
                              f"{self.context}: shorten the prompt")
        max_new = min(settings.max_new_tokens, self.context - n_prompt)
        context_limited = max_new < settings.max_new_tokens
        cache = self.ensure_cache(n_prompt + max_new)
        generator = None
        if settings.seed is not None:
            generator = torch.Generator().manual_seed(settings.seed)
        eos = set() if ignore_eos else set(self.tokenizer.eos_ids)
        stats = GenerationStats(prompt_tokens=n_prompt)
        # control tokens are not text: a model that emits one goes on, but nothing is printed
        # for it (as llama.cpp and transformers' skip_special_tokens); context keeps a leading space
        decoder = self.tokenizer.stream_decoder(prompt_ids[-4:], skip_special_tokens=True)
        seen = torch.tensor(prompt_ids, dtype=torch.long)

        start = time.perf_counter()
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        for lo in range(0, n_prompt, PREFILL_CHUNK):
            if stop is not None and stop.is_set():
                stats.finish_reason = "cancelled"
                yield GenerationChunk(text="", stats=stats, finished=True)
                return
            hi = min(lo + PREFILL_CHUNK, n_prompt)
            logits = self.prefill_fn(self.model, cache, ids[:, lo:hi], torch.arange(lo, hi)[None], SLOT)
        token = sample(logits[0, -1], settings, generator, seen)
        first = time.perf_counter()
        stats.ttft_s = first - start
        stats.prefill_tps = n_prompt / stats.ttft_s
        stats.finish_reason = "length"
        pos = n_prompt
        generated: list[int] = []
        decode_steps = 0
        while True:
            if stop is not None and stop.is_set():
                stats.finish_reason = "cancelled"
                break
            if token in eos:
                stats.finish_reason = "stop"
                break
            generated.append(token)
            yield GenerationChunk(text=decoder.push(token), token=token)
            if len(generated) >= max_new:
                stats.finish_reason = "context" if context_limited else "length"
                break
            logits = self.decode_fn(self.model, cache, torch.tensor([[token]]), torch.tensor([[pos]]), SLOT)
            pos += 1
            decode_steps += 1
            if settings.repetition_penalty != 1.0:
                seen = torch.cat([seen, torch.tensor([token])])
            token = sample(logits[0, -1], settings, generator, seen)
        end = time.perf_counter()
        stats.generated_tokens = len(generated)
        if decode_steps:  # the first token came from prefill
            stats.decode_tps = decode_steps / (end - first)
        stats.peak_rss_bytes = peak_rss_bytes()
        yield GenerationChunk(text=decoder.flush(), stats=stats, finished=True)

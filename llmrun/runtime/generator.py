"""The one streaming generator. gpt-fast shape: `prefill` and `decode_one` are separate
functions over a static KV cache written by index (the compile layer wraps them); the
Generator owns that cache (llmrun.runtime.kv_cache) and `stream` drives the steps, hands each
step's logits to the request's llmrun.runtime.sequence.Sequence and yields its chunks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import torch

from llmrun.models import Transformer
from llmrun.runtime.kv_cache import KVCache
from llmrun.runtime.sequence import Sequence, prefill_end, reusable
from llmrun.runtime.types import GenerationChunk, SamplingSettings

PREFILL_CHUNK = 512  # long prompts prefill in chunks: bounded activation memory
MIN_CACHE = 512  # KV cache lengths are powers of two from this: few compiled shapes
# compiled decode steps are built for these batch sizes; a batch pads up to the next one
DECODE_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def prefill(model: Transformer, cache: KVCache, ids: torch.Tensor, input_pos: torch.Tensor,
            slots: torch.Tensor) -> torch.Tensor:
    # ids: (B, T); input_pos: (B, T); slots: (B,) -> logits of each row's last position (B, 1, vocab)
    return model(ids, input_pos, cache, slots, last_only=True)


def decode_one(model: Transformer, cache: KVCache, token: torch.Tensor, input_pos: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
    # token: (B, 1); input_pos: (B, 1); slots: (B,) -> (B, 1, vocab)
    return model(token, input_pos, cache, slots)


def padded_batch(rows: int, batch_sizes: tuple[int, ...] | None) -> int:
    """The batch size a step of `rows` sequences runs at: the next of `batch_sizes` (compiled
    steps' static sizes), or `rows` itself when any size runs (None) or none is that large."""
    if batch_sizes is None:
        return rows
    return next((b for b in batch_sizes if b >= rows), rows)


def cache_length(needed: int, context: int) -> int:
    length = MIN_CACHE
    while length < needed:
        length *= 2
    return min(context, length)


SLOT = torch.zeros(1, dtype=torch.long)  # the one stream's cache slot


class Generator:
    """Holds a model, its step functions, the KV cache they write (one slot) and which tokens
    that slot holds: a prompt that begins with them (the next turn of a chat, a regenerated
    answer) prefills only the rest."""

    def __init__(self, model: Transformer, tokenizer,
                 prefill_fn: Callable = prefill, decode_fn: Callable = decode_one,
                 kv_dtype: torch.dtype | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.prefill_fn, self.decode_fn = prefill_fn, decode_fn
        self.context = model.config.max_seq_len
        self.kv_dtype = kv_dtype or model.compute_dtype  # the cache's: see kv_cache.KV_DTYPES
        self.cache: KVCache | None = None
        self.cached: list[int] = []  # the tokens whose K and V the slot holds, from position 0

    def ensure_cache(self, needed: int) -> KVCache:
        """A cache of at least `needed` positions, for a caller that writes its own positions:
        what the slot held is forgotten."""
        self.cached = []
        return self._cache_for(needed, keep=0)

    def _cache_for(self, needed: int, keep: int) -> KVCache:
        """The cache there when it has `needed` positions, else a longer one (a power of two
        from MIN_CACHE, at most the context) holding the old one's first `keep` positions."""
        length = cache_length(needed, self.context)
        old = self.cache
        if old is not None and old.length >= length:
            return old
        self.cache = None
        if not keep:
            old = None  # freed before the new one is allocated
        self.cache = KVCache(self.model.config, 1, length, self.kv_dtype)
        if keep:
            self.cache.copy_prefix(old, keep)
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
        seq = Sequence(self.tokenizer, prompt_ids, settings, self.context, ignore_eos)
        n_prompt = len(prompt_ids)
        reused = reusable(self.cached, seq.prompt)
        cache = self._cache_for(n_prompt + seq.max_new, keep=reused)
        del self.cached[reused:]
        seq.start_prefill(reused)
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        lo = reused
        while lo < n_prompt:
            if stop is not None and stop.is_set():
                yield seq.finish("cancelled")
                return
            hi = prefill_end(lo, n_prompt, PREFILL_CHUNK)
            logits = self.prefill_fn(self.model, cache, ids[:, lo:hi], torch.arange(lo, hi)[None], SLOT)
            self.cached = seq.prompt[:hi]
            lo = hi
        chunk = seq.first(logits[0, -1])
        while True:
            if chunk is not None:  # None: the model ended the answer
                yield chunk
            if seq.finished:
                break
            if stop is not None and stop.is_set():
                seq.stats.finish_reason = "cancelled"
                break
            logits = self.decode_fn(self.model, cache, torch.tensor([[seq.token]]),
                                    torch.tensor([[seq.pos]]), SLOT)
            self.cached.append(seq.token)
            chunk = seq.next(logits[0, -1])
        yield seq.finish()

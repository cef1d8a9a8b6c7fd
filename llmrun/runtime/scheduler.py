"""Many sequences at once (continuous batching). One engine thread owns a KV cache of several
slots: it admits waiting requests into free slots, prefills a new prompt a chunk at a time
between decode steps (running streams keep flowing), runs one decode step over every decoding
sequence together (decode is bandwidth-bound: one pass over the weights serves them all) and
retires finished or cancelled sequences at once.

Each request owns a llmrun.runtime.sequence.Sequence (its sampling settings, seed, repetition state,
stop tokens): the scheduler only chooses which steps run, so a request's tokens do not depend
on what else runs (the int4 kernels compute every row alike whatever the batch). A retired
sequence's slot keeps its tokens' K and V: a later prompt that begins with them (the next turn
of a conversation) takes that slot and prefills only the rest."""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator

import torch

from llmrun.models import Transformer
from llmrun.runtime.generator import PREFILL_CHUNK, decode_one, padded_batch, prefill
from llmrun.runtime.kv_cache import KVCache
from llmrun.runtime.sequence import Sequence, prefill_end, reusable
from llmrun.runtime.threads import release_openmp_pool
from llmrun.runtime.types import GenerationChunk, SamplingSettings

INTERLEAVED_CHUNK = 128  # prefill chunk while others decode: their tokens wait at most this long


class Request:
    """A submitted prompt. Iterate it for its chunks (the last one carries the stats; an error
    in its steps is raised here), unless it was submitted with a `deliver` callback, which then
    gets each chunk (and the error) on the scheduler's thread instead; `cancel()` ends it at the
    next step, also while it waits or prefills, and frees its slot."""

    def __init__(self, seq: Sequence, wake: Callable[[], None],
                 deliver: Callable[[GenerationChunk | BaseException], None] | None = None):
        self.seq = seq
        self.slot: int | None = None
        self.fed = 0  # prompt tokens in the slot's cache
        self.cancelled = threading.Event()
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._deliver = deliver or self._chunks.put
        self._iterable = deliver is None
        self._wake = wake

    def cancel(self) -> None:
        self.cancelled.set()
        self._wake()

    def __iter__(self) -> Iterator[GenerationChunk]:
        if not self._iterable:
            raise RuntimeError("this request delivers its chunks to its callback")
        while True:
            item = self._chunks.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.seq.prompt)


def slot_length(model: Transformer, length: int) -> int:
    """The positions of a scheduler's slot asked for `length`: at most the model's context."""
    return min(length, model.config.max_seq_len)


class Scheduler:
    """`submit` from any thread; the steps run on the scheduler's own thread. `batch_sizes`:
    the decode batch sizes the steps are built for (compiled steps have static shapes): a
    step's rows are padded up to the next one by repeating its last row, which writes the same
    K and V to the same place. None: any size."""

    def __init__(self, model: Transformer, tokenizer, slots: int, length: int,
                 prefill_fn: Callable = prefill, decode_fn: Callable = decode_one,
                 batch_sizes: tuple[int, ...] | None = None, kv_dtype: torch.dtype | None = None,
                 warm: bool = False, on_stop: Callable[[], None] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.prefill_fn, self.decode_fn = prefill_fn, decode_fn
        self._on_stop = on_stop  # run on the scheduler's thread as it stops (--tp: tells the other ranks)
        self.length = slot_length(model, length)
        self.cache = KVCache(model.config, slots, self.length, kv_dtype or model.compute_dtype)
        self.batch_sizes = batch_sizes
        self.held: list[list[int]] = [[] for _ in range(slots)]  # tokens each slot holds from position 0
        self._last_used = [0] * slots
        self._clock = itertools.count(1)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._wakeup = threading.Condition()
        self._closing = False
        self._warm = warm
        self.ready = threading.Event()  # set once the thread runs requests (after warm-up)
        self.warm_error: BaseException | None = None  # why warm-up failed (the steps will too)
        release_openmp_pool()  # the steps run on the scheduler's thread only (threads.py)
        self._thread = threading.Thread(target=self._run, name="llmrun-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread

    def submit(self, prompt_ids: list[int], settings: SamplingSettings, ignore_eos: bool = False,
               deliver: Callable[[GenerationChunk | BaseException], None] | None = None) -> Request:
        """Queue a prompt (bad settings or a prompt over the cache's length raise here)."""
        request = Request(Sequence(self.tokenizer, prompt_ids, settings, self.length, ignore_eos),
                          self._wake, deliver)
        with self._wakeup:
            if self._closing:
                raise RuntimeError("the scheduler is closed")
            self.waiting.append(request)
            self._wakeup.notify()
        return request

    def close(self) -> None:
        """Cancel what runs or waits and stop the thread."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        self._thread.join()

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    @property
    def counts(self) -> tuple[int, int]:
        """(waiting, running) requests, read from any thread."""
        return len(self.waiting), len(self.running)

    # ------------------------------------------------------------------ the scheduler's thread

    def _run(self) -> None:
        with torch.inference_mode():
            if self._warm:
                try:
                    self._warm_up()
                except Exception as exc:  # noqa: BLE001 - the owner reads it from warm_error
                    self.warm_error = exc
            self.ready.set()
            while True:
                with self._wakeup:
                    while not (self._closing or self.waiting or self.running):
                        self._wakeup.wait()
                    if self._closing:
                        for request in [*self.waiting, *self.running]:
                            self._retire(request, "cancelled")
                        if self._on_stop is not None:
                            self._on_stop()
                        return
                    self._admit()
                for request in [r for r in self.running if r.cancelled.is_set()]:
                    self._retire(request, "cancelled")
                prefilling = [r for r in self.running if not r.decoding]
                decoding = [r for r in self.running if r.decoding]
                if prefilling:
                    self._guarded([prefilling[0]], self._prefill_chunk, prefilling[0],
                                  INTERLEAVED_CHUNK if decoding else PREFILL_CHUNK)
                if decoding:
                    self._guarded(decoding, self._decode_step, decoding)

    def _warm_up(self) -> None:
        """Build or load every step a request can meet (compiled steps build on first use): a
        prefill chunk and each decode batch size up to the slots, on slot 0's first position,
        which no prompt reuses (slot 0 holds no tokens yet) and a prefill overwrites."""
        one = torch.zeros((1, 1), dtype=torch.long)
        self.prefill_fn(self.model, self.cache, one, one, torch.zeros(1, dtype=torch.long))
        for rows in sorted({padded_batch(n, self.batch_sizes) for n in range(1, len(self.held) + 1)}):
            zeros = torch.zeros((rows, 1), dtype=torch.long)
            self.decode_fn(self.model, self.cache, zeros, zeros, torch.zeros(rows, dtype=torch.long))

    def _admit(self) -> None:
        """Waiting requests into free slots (caller holds the lock); the cancelled ones end."""
        for request in [r for r in self.waiting if r.cancelled.is_set()]:
            self.waiting.remove(request)
            self._retire(request, "cancelled")
        busy = {r.slot for r in self.running}
        free = [s for s in range(len(self.held)) if s not in busy]
        while self.waiting and free:
            request = self.waiting.popleft()
            prompt = request.seq.prompt

            def reuse(slot: int) -> int:
                return reusable(self.held[slot], prompt)

            # the longest reuse; else the slot unused the longest (recent ones may be reused soon)
            slot = max(free, key=lambda s: (reuse(s), -self._last_used[s]))
            free.remove(slot)
            request.slot, request.fed = slot, reuse(slot)
            del self.held[slot][request.fed:]
            request.seq.start_prefill(request.fed)
            self.running.append(request)

    def _guarded(self, requests: list[Request], step: Callable, *args) -> None:
        """Run one step; if it fails, its requests end with the error (the others go on)."""
        try:
            step(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the requests' own threads
            for request in requests:
                if request in self.running:
                    self.running.remove(request)
                    request._deliver(exc)

    def _prefill_chunk(self, request: Request, chunk: int) -> None:
        seq, slot = request.seq, request.slot
        lo = request.fed
        hi = prefill_end(lo, len(seq.prompt), chunk)
        ids = torch.tensor([seq.prompt[lo:hi]], dtype=torch.long)
        # ids: (1, T), positions (1, T), slot (1,) -> logits of the last position (1, 1, vocab)
        logits = self.prefill_fn(self.model, self.cache, ids, torch.arange(lo, hi)[None],
                                 torch.tensor([slot]))
        request.fed = hi
        self.held[slot] = seq.prompt[:hi]
        if request.decoding:
            self._emit(request, seq.first(logits[0, -1]))

    def _decode_step(self, requests: list[Request]) -> None:
        rows = len(requests)
        padded = padded_batch(rows, self.batch_sizes)
        order = requests + [requests[-1]] * (padded - rows)
        tokens = torch.tensor([[r.seq.token] for r in order])  # (B, 1)
        positions = torch.tensor([[r.seq.pos] for r in order])  # (B, 1)
        slots = torch.tensor([r.slot for r in order])  # (B,)
        logits = self.decode_fn(self.model, self.cache, tokens, positions, slots)  # (B, 1, vocab)
        for i, request in enumerate(requests):
            self.held[request.slot].append(request.seq.token)
            self._emit(request, request.seq.next(logits[i, -1]))

    def _emit(self, request: Request, chunk: GenerationChunk | None) -> None:
        if chunk is not None:  # None: the model ended the answer
            request._deliver(chunk)
        if request.seq.finished:
            self._retire(request, None)

    def _retire(self, request: Request, reason: str | None) -> None:
        if request in self.running:
            self.running.remove(request)
            self._last_used[request.slot] = next(self._clock)
        request._deliver(request.seq.finish(reason))

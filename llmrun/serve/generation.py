"""One request in flight, seen from the event loop: its chunks from the scheduler's thread
arrive on an asyncio queue and come out as pieces of answer text, with stop strings held back
and cut, each token's log-probabilities, and the finish reason and usage at the end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llmrun.runtime.scheduler import Scheduler
from llmrun.runtime.stops import StopStrings
from llmrun.runtime.types import GenerationChunk, GenerationStats, SamplingSettings

FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass
class Piece:
    text: str
    tokens: list[int] = field(default_factory=list)  # the ids decoded into text (since the last piece)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # on the last piece: "stop" or "length"


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class Generation:
    """Submit on the event loop's thread; iterate `pieces()` there; `cancel()` from anywhere
    (a client that went away). `arrived` is when the request reached the server."""

    def __init__(self, scheduler: Scheduler, prompt_ids: list[int], settings: SamplingSettings,
                 stops: list[str], arrived: float):
        loop = asyncio.get_running_loop()
        self._items: asyncio.Queue = asyncio.Queue()
        self.arrived = arrived
        self.prompt_ids = prompt_ids
        self.usage = Usage(prompt_tokens=len(prompt_ids))
        self.first_token_at: float | None = None
        self.token_gaps: list[float] = []  # seconds between consecutive tokens
        self.stats: GenerationStats | None = None
        self._stops = StopStrings(stops)
        self._request = scheduler.submit(
            prompt_ids, settings, deliver=lambda item: loop.call_soon_threadsafe(self._items.put_nowait, item))

    def cancel(self) -> None:
        self._request.cancel()

    async def pieces(self) -> AsyncIterator[Piece]:
        pending: list[TokenLogprob] = []
        tokens: list[int] = []
        last = None
        try:
            while True:
                item = await self._items.get()
                if isinstance(item, BaseException):
                    raise item
                chunk: GenerationChunk = item
                if chunk.finished:
                    self.stats = chunk.stats
                    self.usage.cached_tokens = chunk.stats.reused_tokens
                    text, hit = self._stops.push(chunk.text)
                    if not hit:
                        text += self._stops.flush()
                    reason = "stop" if self._stops.stopped else FINISH_REASONS.get(chunk.stats.finish_reason, "stop")
                    yield Piece(text, tokens, pending, reason)
                    return
                if self._stops.stopped:  # tokens decoded before the cancel took effect
                    continue
                now = time.perf_counter()
                if self.first_token_at is None:
                    self.first_token_at = now
                else:
                    self.token_gaps.append(now - last)
                last = now
                self.usage.completion_tokens += 1
                tokens.append(chunk.token)
                if chunk.logprob is not None:
                    pending.append(TokenLogprob(chunk.token, chunk.logprob, chunk.top_logprobs))
                text, hit = self._stops.push(chunk.text)
                if hit:
                    self._request.cancel()  # the answer ends here; its final chunk follows
                if text or hit:
                    yield Piece(text, tokens, pending)
                    pending, tokens = [], []
        finally:
            if self.stats is None:  # left early: the client went away, or the loop is closing
                self._request.cancel()

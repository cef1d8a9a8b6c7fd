"""One answer being streamed: its text so far, the stop event its worker watches, and the
live figures the stats bar shows until the engine's own arrive with the last chunk."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from llmrun.chat.widgets import MessageView


@dataclass
class Answer:
    view: MessageView
    prompt_tokens: int
    stop: threading.Event = field(default_factory=threading.Event)
    parts: list[str] = field(default_factory=list)
    streamed: str = ""  # the answer text (no thinking) written to the markdown stream so far
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished: bool = False  # shown as done: ended, stopped by Esc, or failed

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, text: str, is_token: bool) -> None:
        if is_token:
            self.tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        self.parts.append(text)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def decode_tps(self) -> float | None:
        if self.first_token_at is None or self.tokens < 2:
            return None
        return (self.tokens - 1) / max(time.perf_counter() - self.first_token_at, 1e-9)

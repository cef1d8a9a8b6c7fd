"""What the server holds: the model once it is loaded, the scheduler running its requests, and
the limits requests are checked against. The load runs on its own thread while the server
already answers (/health says 503 until it is done)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from llmrun.runtime.engine import Engine
from llmrun.runtime.scheduler import Scheduler
from llmrun.runtime.types import SamplingSettings
from llmrun.serve.metrics import Metrics


@dataclass
class Limits:
    parallel: int = 4  # sequences decoding together (KV cache slots)
    ctx_size: int | None = None  # positions per slot (None: the model's context, at most DEFAULT_CTX)
    queue: int = 32  # requests waiting for a slot before new ones get 503
    max_body_bytes: int = 4 << 20

    def slot_positions(self, context_length: int) -> int:
        """Positions per slot for a model of `context_length`."""
        return min(self.ctx_size or DEFAULT_CTX, context_length)


DEFAULT_CTX = 4096


@dataclass
class ServerState:
    limits: Limits
    api_key: str | None = None
    names: tuple[str, ...] = ()  # model names requests may ask for (besides none)
    engine: Engine | None = None
    scheduler: Scheduler | None = None
    defaults: SamplingSettings | None = None  # sampling when a request leaves a field out
    load_error: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def model_name(self) -> str:
        return self.names[0] if self.names else "llmrun"

    def start_loading(self, load: Callable[[], tuple[Engine, SamplingSettings]],
                      report: Callable[[str], None]) -> threading.Thread:
        """Load on a thread of its own: `load()` -> (engine, default sampling); then the
        scheduler's steps are built (warm) before the server says it is ready."""

        def run() -> None:
            try:
                engine, defaults = load()
                ctx = self.limits.slot_positions(engine.context_length)
                scheduler = engine.scheduler(self.limits.parallel, ctx, report, warm=True)
                scheduler.ready.wait()
                if scheduler.warm_error is not None:
                    scheduler.close()
                    raise scheduler.warm_error
                self.engine, self.defaults, self.scheduler = engine, defaults, scheduler
                self.metrics.slots.set(self.limits.parallel)
                self.ready.set()
            except Exception as exc:  # noqa: BLE001 - /health reports it; the CLI exits
                from llmrun.errors import LlmrunError

                self.load_error = str(exc) if isinstance(exc, LlmrunError) else f"{type(exc).__name__}: {exc}"
                self.ready.set()

        thread = threading.Thread(target=run, name="llmrun-load", daemon=True)
        thread.start()
        return thread

"""What the one streaming generator yields, and the settings it takes. Every front end
(generate, chat, bench, eval) reads these."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    repetition_penalty: float = 1.0  # 1 disables
    seed: int | None = None
    logprobs: int | None = None  # None: none; N >= 0: each token's log-probability and the N likeliest


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV came from the cache, not prefilled
    generated_tokens: int = 0
    ttft_s: float = 0.0  # time to first token, from the start of prefill
    prefill_tps: float = 0.0  # prefilled (not reused) tokens per second
    decode_tps: float = 0.0
    peak_rss_bytes: int = 0
    finish_reason: str = ""  # "stop" | "length" | "context" | "cancelled"


@dataclass
class GenerationChunk:
    """One step of the stream: a printable text piece (possibly empty while a multi-byte
    character is incomplete), the token id, and on the last chunk the stats."""

    text: str
    token: int | None = None
    stats: GenerationStats | None = None  # set on the final chunk only
    finished: bool = False
    logprob: float | None = None  # the token's log-probability under the model (settings.logprobs)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (id, log-probability), likeliest first


@dataclass
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class LoadProgress:
    """Reported by the engine loader: stage is one of download, load, quantize, compile."""

    stage: str
    done: int = 0
    total: int = 0
    message: str = ""

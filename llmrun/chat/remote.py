"""The chat's engine when it talks to a running server (`llmrun chat --server URL`): the model,
its context and its chat template are the server's. The conversation is tokenized there
(POST /tokenize with messages, what a chat request's prompt would be), so the chat fits its
history to the context as it does locally, and each answer streams from POST /v1/completions
with those ids as the prompt (the server's prompt cache reuses the conversation so far)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx2 as httpx

from llmrun.errors import LlmrunError
from llmrun.runtime.types import ChatMessage, GenerationChunk, GenerationStats, LoadProgress, SamplingSettings

FINISH_REASONS = {"stop": "stop", "length": "length"}


class RemoteEngine:
    """What ChatApp asks of an engine, answered by an OpenAI-compatible llmrun server."""

    threads = None  # the server's business

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600):
        self.url = url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.name = ""
        self.context_length = 0
        self._sampling: dict = {}
        self.quant_label = f"server {urlsplit(self.url).netloc or self.url}"

    @classmethod
    def connect(cls, url: str, api_key: str | None = None,
                progress: Callable[[LoadProgress], None] | None = None, wait_s: float = 600) -> "RemoteEngine":
        """Wait (up to wait_s) while the server loads its model, then read which model it runs."""
        engine = cls(url, api_key)
        deadline = time.monotonic() + wait_s
        while True:
            response = engine._get("/health")
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            if progress:
                progress(LoadProgress("load", message=f"waiting for {engine.url} to load its model"))
            time.sleep(1)
        models = engine._json(engine._get("/v1/models"), "/v1/models")["data"]
        if not models:
            raise LlmrunError(f"{engine.url} serves no model (is it still loading?)")
        model = models[0]
        engine.name, engine.context_length = model["id"], int(model.get("context_length") or 0)
        engine._sampling = (model.get("meta") or {}).get("sampling") or {}
        if not engine.context_length:
            raise LlmrunError(f"{engine.url}/v1/models gives no context_length: is it an llmrun server?")
        return engine

    def generation_defaults(self) -> dict:
        """The server's sampling defaults (what it uses when a request leaves a field out)."""
        return dict(self._sampling)

    def _get(self, path: str) -> httpx.Response:
        try:
            return self._client.get(path)
        except httpx.HTTPError as exc:
            raise LlmrunError(f"cannot reach the server at {self.url}: {exc}") from None

    def _json(self, response: httpx.Response, what: str) -> dict:
        if response.status_code != 200:
            raise LlmrunError(f"{what} at {self.url} answered {response.status_code}: {_error_message(response)}")
        return response.json()

    def chat_prompt_ids(self, messages: list[ChatMessage], template_kwargs: dict | None = None) -> list[int]:
        body = {"messages": [{"role": m.role, "content": m.content} for m in messages]}
        if template_kwargs:
            body["chat_template_kwargs"] = template_kwargs
        try:
            response = self._client.post("/tokenize", json=body)
        except httpx.HTTPError as exc:
            raise LlmrunError(f"cannot reach the server at {self.url}: {exc}") from None
        return self._json(response, "/tokenize")["tokens"]

    def stream_generate(self, prompt_ids: list[int], settings: SamplingSettings,
                        stop: threading.Event | None = None) -> Iterator[GenerationChunk]:
        body = {"model": self.name, "prompt": prompt_ids, "max_tokens": settings.max_new_tokens,
                "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
                "min_p": settings.min_p, "repetition_penalty": settings.repetition_penalty, "seed": settings.seed,
                "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
        started = time.perf_counter()
        first_at = last_at = None
        reason, usage = "", None
        try:
            with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise LlmrunError(f"the server answered {response.status_code}: {_error_message(response)}")
                for event in _events(response.iter_lines()):
                    if "error" in event:
                        raise LlmrunError(f"the server failed: {event['error'].get('message')}")
                    usage = event.get("usage") or usage
                    for choice in event.get("choices", []):
                        reason = choice.get("finish_reason") or reason
                        text, ids = choice.get("text", ""), choice.get("token_ids") or []
                        if ids:
                            last_at = time.perf_counter()
                            first_at = first_at or last_at
                            # a chunk per token, the piece's text with the first (as the local engine)
                            yield GenerationChunk(text, ids[0])
                            yield from (GenerationChunk("", token) for token in ids[1:])
                        elif text:  # text held back (a stop string's prefix) and released at the end
                            yield GenerationChunk(text)
                    if stop is not None and stop.is_set():
                        reason = "cancelled"
                        break  # leaving the stream closes the connection: the server cancels
        except httpx.HTTPError as exc:
            raise LlmrunError(f"the connection to {self.url} failed: {exc}") from None
        yield GenerationChunk("", stats=self._stats(usage, reason, started, first_at, last_at), finished=True)

    @staticmethod
    def _stats(usage: dict | None, reason: str, started: float, first_at: float | None,
               last_at: float | None) -> GenerationStats:
        usage = usage or {}
        generated = usage.get("completion_tokens", 0)
        reused = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        prompt = usage.get("prompt_tokens", 0)
        ttft = (first_at - started) if first_at else 0.0
        decode = (generated - 1) / (last_at - first_at) if first_at and last_at and last_at > first_at else 0.0
        return GenerationStats(prompt_tokens=prompt, reused_tokens=reused, generated_tokens=generated, ttft_s=ttft,
                               prefill_tps=(prompt - reused) / ttft if ttft else 0.0, decode_tps=decode,
                               finish_reason=FINISH_REASONS.get(reason, reason))


def _events(lines: Iterator[str]) -> Iterator[dict]:
    """Server-sent events' JSON payloads, up to `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase

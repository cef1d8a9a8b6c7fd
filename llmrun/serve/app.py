"""The OpenAI-compatible HTTP API on Starlette (chosen over FastAPI: the bodies are checked by
pydantic models either way, and Starlette alone is the smaller stack; uvicorn serves it).

Routes: POST /v1/chat/completions, POST /v1/completions (both streamed as server-sent events
or not), GET /v1/models, GET /health, GET /metrics, POST /tokenize, POST /detokenize. Errors
have OpenAI's JSON shape."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmrun.errors import LlmrunError
from llmrun.runtime.types import ChatMessage, SamplingSettings
from llmrun.serve.generation import Generation, Piece, TokenLogprob
from llmrun.serve.protocol import (ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                   describe_validation, error_body)
from llmrun.serve.state import ServerState

PUBLIC_PATHS = ("/health",)  # open even with --api-key (load balancers probe it)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(str(exc), exc.kind, exc.param, exc.code), exc.status, headers=exc.headers)


async def read_body(request: Request, state: ServerState, model):
    """The JSON body as `model`, or an ApiError: 413 over the limit, 400 naming the field."""
    limit = state.limits.max_body_bytes
    if int(request.headers.get("content-length") or 0) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, field = describe_validation(exc)
        raise ApiError(400, message, param=field) from None


def require_model(state: ServerState):
    if state.load_error:
        raise ApiError(503, f"the model failed to load: {state.load_error}", "server_error")
    if not state.ready.is_set() or state.scheduler is None:
        raise ApiError(503, "the model is still loading", "server_error", headers={"Retry-After": "5"})
    return state.engine, state.scheduler


def check_model_name(state: ServerState, name: str | None) -> None:
    if name and name not in state.names:
        raise ApiError(404, f"the model '{name}' does not exist: this server runs {state.model_name}",
                       param="model", code="model_not_found")


def sampling(state: ServerState, body, prompt_len: int, context: int) -> SamplingSettings:
    d = state.defaults
    pick = lambda value, default: default if value is None else value  # noqa: E731
    room = context - prompt_len
    if room <= 0:
        raise ApiError(400, f"the prompt has {prompt_len} tokens but the context is {context}",
                       param="messages" if isinstance(body, ChatRequest) else "prompt",
                       code="context_length_exceeded")
    new = body.new_tokens()
    if new is not None and new > room:
        raise ApiError(400, f"the prompt ({prompt_len} tokens) and max_tokens ({new}) exceed the context "
                       f"({context} tokens)", param="max_tokens", code="context_length_exceeded")
    try:
        logprobs = body.top_logprobs_count()
    except ValueError as exc:
        raise ApiError(400, str(exc), param="top_logprobs") from None
    return SamplingSettings(
        max_new_tokens=new or room,
        temperature=pick(body.temperature, d.temperature),
        top_k=pick(body.top_k, d.top_k),
        top_p=pick(body.top_p, d.top_p),
        min_p=pick(body.min_p, d.min_p),
        repetition_penalty=pick(body.repetition_penalty, pick(body.repeat_penalty, d.repetition_penalty)),
        seed=body.seed, logprobs=logprobs)


def admit(state: ServerState, scheduler) -> None:
    """503 once every slot is taken and the queue is full (a request arriving for a free slot
    may briefly wait until the scheduler's next step admits it)."""
    waiting, running = scheduler.counts
    if waiting + running >= state.limits.parallel + state.limits.queue:
        raise ApiError(503, f"all {state.limits.parallel} slots are busy and {state.limits.queue} requests wait "
                       "already: try again shortly", "server_error", code="queue_full", headers={"Retry-After": "1"})


# ---------------------------------------------------------------------------------- responses


class Completion:
    """Renders one Generation in the shape of its endpoint (chat or text completion)."""

    def __init__(self, state: ServerState, gen: Generation, chat: bool, include_usage: bool, token_ids: bool):
        self.state, self.gen, self.chat, self.include_usage = state, gen, chat, include_usage
        self.token_ids = token_ids  # return_token_ids: the prompt's in the first choice, the answer's in each
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.tok = state.engine.tokenizer

    def _token_text(self, token: int) -> str:
        return self.tok.decode([token])

    def _logprobs(self, entries: list[TokenLogprob]):
        if not entries:
            return None
        if self.chat:
            def one(token, logprob):
                text = self._token_text(token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                                for e in entries]}
        return {"tokens": [self._token_text(e.token) for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token_text(t): lp for t, lp in e.top} for e in entries]}

    def _envelope(self, choices: list, usage: dict | None = None, chunk: bool = False) -> dict:
        out = {"id": self.id, "object": self.object + (".chunk" if chunk and self.chat else ""),
               "created": self.created, "model": self.state.model_name, "choices": choices}
        if usage is not None or not chunk:
            out["usage"] = usage
        return out

    def _ids(self, choice: dict, tokens: list[int], first: bool) -> dict:
        if self.token_ids:
            choice.update(({"prompt_token_ids": self.gen.prompt_ids} if first else {}), token_ids=tokens)
        return choice

    async def whole(self) -> dict:
        text, tokens, entries, reason = [], [], [], None
        async for piece in self.gen.pieces():
            text.append(piece.text)
            tokens += piece.tokens
            entries += piece.logprobs
            reason = piece.finish_reason or reason
        content = "".join(text)
        choice = {"index": 0, "logprobs": self._logprobs(entries), "finish_reason": reason}
        choice.update({"message": {"role": "assistant", "content": content}} if self.chat else {"text": content})
        return self._envelope([self._ids(choice, tokens, True)], self.gen.usage.to_dict())

    def _chunk(self, piece: Piece, first: bool) -> dict:
        if self.chat:
            delta = ({"role": "assistant", "content": piece.text} if first
                     else {"content": piece.text} if piece.text or piece.finish_reason is None else {})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": piece.text}
        choice.update(logprobs=self._logprobs(piece.logprobs), finish_reason=piece.finish_reason)
        return self._envelope([self._ids(choice, piece.tokens, first)], chunk=True)

    async def events(self) -> AsyncIterator[str]:
        first = True
        try:
            if self.chat:  # the role first, before any token (clients show the turn at once)
                yield sse(self._chunk(Piece(""), first=True))
                first = False
            async for piece in self.gen.pieces():
                yield sse(self._chunk(piece, first))
                first = False
            if self.include_usage:
                yield sse(self._envelope([], self.gen.usage.to_dict(), chunk=True))
        except LlmrunError as exc:
            yield sse(error_body(str(exc), "server_error"))
        except Exception as exc:  # noqa: BLE001 - a failed step: the stream says so and ends
            yield sse(error_body(f"{type(exc).__name__}: {exc}", "server_error"))
        yield "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------- routes


def make_app(state: ServerState, cors_origins: list[str] | None = None) -> Starlette:
    async def completions(request: Request, chat: bool) -> Response:
        arrived = time.perf_counter()
        endpoint = "chat" if chat else "completions"
        try:
            body = await read_body(request, state, ChatRequest if chat else CompletionRequest)
            engine, scheduler = require_model(state)
            check_model_name(state, body.model)
            ids = prompt_ids(engine, body)
            settings = sampling(state, body, len(ids), scheduler.length)
            admit(state, scheduler)
            try:
                gen = Generation(scheduler, ids, settings, body.stop, arrived)
            except LlmrunError as exc:
                raise ApiError(400, str(exc)) from None
        except ApiError as exc:
            state.metrics.requests.labels(endpoint, str(exc.status)).inc()
            return error_response(exc)
        except ClientDisconnect:
            return Response(status_code=499)
        request.state.generation = gen
        completion = Completion(state, gen, chat, bool(body.stream_options and body.stream_options.include_usage),
                                body.return_token_ids)
        if body.stream:
            return StreamingResponse(_observed(state, gen, endpoint, completion.events()),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, gen))
        try:
            result = await completion.whole()
        except Exception as exc:  # noqa: BLE001 - a failed step
            state.metrics.requests.labels(endpoint, "500").inc()
            return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", "server_error"), 500)
        finally:
            watcher.cancel()
        if watcher.done() and not watcher.cancelled():  # the client left: nobody reads an answer
            _record(state, gen, endpoint, "499")
            return Response(status_code=499)
        _record(state, gen, endpoint, "200")
        return JSONResponse(result)

    async def chat_completions(request: Request) -> Response:
        return await completions(request, chat=True)

    async def text_completions(request: Request) -> Response:
        return await completions(request, chat=False)

    async def models(request: Request) -> Response:
        data = []
        if state.engine is not None:
            data.append({"id": state.model_name, "object": "model", "created": 0, "owned_by": "llmrun",
                         "context_length": state.scheduler.length,
                         "meta": {"source": state.engine.source, "weights": state.engine.quant_label,
                                  "slots": state.limits.parallel, "sampling": sampling_defaults(state.defaults)}})
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, 503)
        if not state.ready.is_set():
            return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        if state.scheduler is not None:
            state.metrics.sample_scheduler(*state.scheduler.counts)
        return Response(state.metrics.text(), media_type="text/plain; version=0.0.4")

    async def tokenize(request: Request) -> Response:
        try:
            body = await read_body(request, state, TokenizeRequest)
            engine, _ = require_model(state)
        except ApiError as exc:
            return error_response(exc)
        try:
            ids = chat_ids(engine, body.messages, body.chat_template_kwargs) if body.messages is not None else \
                engine.tokenizer.encode(body.content, add_bos=body.add_special)
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse({"tokens": ids})

    async def detokenize(request: Request) -> Response:
        try:
            body = await read_body(request, state, DetokenizeRequest)
            engine, _ = require_model(state)
            check_token_ids(engine, body.tokens, "tokens")
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse({"content": engine.tokenizer.decode(body.tokens)})

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
    ]
    middleware = [Middleware(RequestLog, state=state), Middleware(ApiKey, key=state.api_key)]
    if cors_origins:  # outermost: a preflight is answered before the key is asked for
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                                        allow_headers=["authorization", "content-type"]))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={404: _not_found, 405: _not_allowed, Exception: _failed})
    return app


def sampling_defaults(d: SamplingSettings) -> dict:
    """What a request that leaves these fields out gets."""
    return {"temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p, "min_p": d.min_p,
            "repetition_penalty": d.repetition_penalty}


def chat_ids(engine, messages: list, template_kwargs: dict | None = None) -> list[int]:
    """protocol.Message list -> the prompt's ids, through the chat template (with the request's
    chat_template_kwargs as further variables, as vLLM takes them)."""
    turns = [ChatMessage("system" if m.role == "developer" else m.role, m.text()) for m in messages]
    try:
        return engine.chat_prompt_ids(turns, template_kwargs)
    except Exception as exc:  # noqa: BLE001 - a template that refuses the conversation
        raise ApiError(400, f"the chat template refused the messages: {exc}", param="messages") from None


def prompt_ids(engine, body) -> list[int]:
    if isinstance(body, ChatRequest):
        return chat_ids(engine, body.messages, body.chat_template_kwargs)
    if isinstance(body.prompt, str):
        if not body.prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return engine.tokenizer.encode(body.prompt)
    check_token_ids(engine, body.prompt, "prompt")
    return list(body.prompt)


def check_token_ids(engine, ids: list[int], param: str) -> None:
    vocab = engine.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param=param)


async def _cancel_on_disconnect(request: Request, gen: Generation) -> None:
    """A non-streaming request ends as soon as its client goes away (also during prefill)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gen.cancel()
            return


async def _observed(state: ServerState, gen: Generation, endpoint: str, events: AsyncIterator[str]):
    finished = False
    try:
        async for event in events:
            yield event
        finished = True
    finally:
        _record(state, gen, endpoint, "200" if finished else "499")


def _record(state: ServerState, gen: Generation, endpoint: str, status: str) -> None:
    m = state.metrics
    m.requests.labels(endpoint, status).inc()
    m.prompt_tokens.inc(gen.usage.prompt_tokens)
    m.cached_tokens.inc(gen.usage.cached_tokens)
    m.generation_tokens.inc(gen.usage.completion_tokens)
    if gen.first_token_at is not None:
        m.ttft.observe(gen.first_token_at - gen.arrived)
        m.e2e.observe(time.perf_counter() - gen.arrived)
    for gap in gen.token_gaps:
        m.inter_token.observe(gap)


async def _failed(request: Request, exc: Exception) -> Response:
    print(f"llmrun: {request.method} {request.url.path} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)


async def _not_found(request: Request, exc) -> Response:
    return JSONResponse(error_body(f"no route {request.method} {request.url.path}", code="not_found"), 404)


async def _not_allowed(request: Request, exc) -> Response:
    return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}"), 405)


class ApiKey:
    """401 in OpenAI's shape unless `Authorization: Bearer KEY` (when a key is set)."""

    def __init__(self, app, key: str | None):
        self.app, self.expected = app, f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.expected and scope["path"] not in PUBLIC_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if given != self.expected:
                response = JSONResponse(error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                                   code="invalid_api_key"), 401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestLog:
    """One line per request on stderr: method, path, status, its tokens and timings."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def recorded(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        finally:
            line = f"llmrun: {scope['method']} {scope['path']} {status[0] or 499} {time.perf_counter() - start:.3f}s"
            gen = scope.get("state", {}).get("generation")
            if gen is not None:
                u = gen.usage
                ttft = f" ttft {gen.first_token_at - gen.arrived:.3f}s" if gen.first_token_at else ""
                line += f" prompt {u.prompt_tokens} (cached {u.cached_tokens}) completion {u.completion_tokens}{ttft}"
            print(line, file=sys.stderr, flush=True)

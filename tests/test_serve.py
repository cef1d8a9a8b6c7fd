"""`llmrun serve`: the real server in its own process on a loopback port, with the shipped
model, driven through the official `openai` client (and httpx where a test needs raw HTTP).
One server serves the module (eager steps: the compiled ones are tested in test_scheduler)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client openai 3 ships with
psutil = pytest.importorskip("psutil")

KEY = "sk-llmrun-test"
ALLOWED = "http://allowed.test"
PARALLEL, QUEUE, CTX = 8, 4, 2048
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # the model counts on: it never ends on its own


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*flags: str):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmrun", "serve", "--no-compile", "--port", str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(proc, url: str, timeout: float = 240) -> list[int]:
    """The /health codes seen until 200 (503 while loading)."""
    codes, deadline = [], time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read()}")
        try:
            codes.append(httpx.get(f"{url}/health", timeout=2).status_code)
            if codes[-1] == 200:
                return codes
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not become ready")


class Server:
    def __init__(self):
        self.proc, self.url = _start("--parallel", str(PARALLEL), "--queue", str(QUEUE), "--ctx-size", str(CTX),
                                     "--api-key", KEY, "--cors-origin", ALLOWED)
        self.stderr: list[str] = []
        self.health_codes = _wait_ready(self.proc, self.url)
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    def http(self, method: str, path: str, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **kw.pop("headers", {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=120, **kw)

    def metric(self, name: str, labels: str = "") -> float:
        for line in self.http("GET", "/metrics").text.splitlines():
            if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name}{{")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def running(self) -> float:
        return self.metric("llmrun:num_requests_running") + self.metric("llmrun:num_requests_waiting")


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.proc.terminate()
    s.proc.wait(timeout=30)


def chat(server, content: str, **kw):
    return server.client.chat.completions.create(model="smollm2-135m", messages=[
        {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": content}],
        temperature=0, **kw)


def complete(server, prompt, **kw):
    return server.client.completions.create(model="smollm2-135m", prompt=prompt, temperature=0, **kw)


def test_health_503_while_loading_then_models(server):
    assert server.health_codes[0] == 503 and server.health_codes[-1] == 200
    assert server.http("GET", "/health", key=None).json() == {"status": "ok"}  # open without the key
    (model,) = server.client.models.list().data
    assert model.id == "smollm2-135m" and model.context_length == CTX


def test_chat_stream_and_whole_agree_with_usage(server):
    whole = chat(server, "Write a long story about a dragon.", max_tokens=12)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(chat(server, "Write a long story about a dragon.", max_tokens=12, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    # the same prompt again: all but its last two tokens came from the cache (sequence.reusable)
    assert usage.usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 2


def test_completion_prompt_as_text_or_ids_streamed_or_not(server):
    ids = server.http("POST", "/tokenize", json={"content": "The capital of France is", "add_special": True}).json()
    assert server.http("POST", "/detokenize", json={"tokens": ids["tokens"]}).json()["content"].endswith(
        "The capital of France is")
    text = complete(server, "The capital of France is", max_tokens=10).choices[0].text
    assert complete(server, ids["tokens"], max_tokens=10).choices[0].text == text
    streamed = "".join(c.choices[0].text for c in complete(server, "The capital of France is", max_tokens=10,
                                                             stream=True) if c.choices)
    assert streamed == text


def test_tokenize_messages_is_the_chat_prompt_and_token_ids_come_back(server):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Name a colour."}]
    ids = server.http("POST", "/tokenize", json={"messages": messages}).json()["tokens"]
    assert chat(server, "Name a colour.", max_tokens=1).usage.prompt_tokens == len(ids)
    # the template's own variables pass through (SmolLM2's template has no enable_thinking)
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    assert server.http("POST", "/tokenize", json={"messages": messages, **kwargs}).json()["tokens"] == ids
    assert chat(server, "Name a colour.", max_tokens=1, extra_body=kwargs).usage.prompt_tokens == len(ids)
    for body in ({"content": "x", "messages": messages}, {}):
        r = server.http("POST", "/tokenize", json=body)
        assert r.status_code == 400 and r.json()["error"]["message"] == "give either content or messages"
    # return_token_ids (vLLM's): the prompt's ids first, then each piece's; they decode to the text
    ids = server.http("POST", "/tokenize", json={"content": COUNTING, "add_special": True}).json()["tokens"]
    body = {"model": "smollm2-135m", "prompt": ids, "max_tokens": 9, "temperature": 0, "return_token_ids": True}
    whole = server.http("POST", "/v1/completions", json=body).json()["choices"][0]
    assert whole["prompt_token_ids"] == ids and len(whole["token_ids"]) == 9
    assert server.http("POST", "/detokenize", json={"tokens": whole["token_ids"]}).json()["content"] == whole["text"]
    stream = complete(server, ids, max_tokens=9, stream=True, extra_body={"return_token_ids": True})
    streamed = [c.choices[0].model_extra for c in stream if c.choices]
    assert streamed[0]["prompt_token_ids"] == ids
    assert [t for c in streamed for t in c["token_ids"]] == whole["token_ids"]


def test_chat_client_through_the_server(server, tmp_path):
    """`llmrun chat --server`: the TUI's engine is the server's model (its name, context and
    template); an answer streams token by token, equal to the same chat request's."""
    from llmrun.chat.remote import RemoteEngine
    from llmrun.errors import LlmrunError
    from llmrun.runtime.types import ChatMessage, SamplingSettings

    engine = RemoteEngine.connect(server.url, KEY)
    assert (engine.name, engine.context_length, engine.threads) == ("smollm2-135m", CTX, None)
    assert engine.generation_defaults()["temperature"] >= 0
    turns = [ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", "Write a poem about rain.")]
    chunks = list(engine.stream_generate(engine.chat_prompt_ids(turns), SamplingSettings(max_new_tokens=12)))
    assert sum(c.token is not None for c in chunks) == 12 and chunks[-1].finished
    stats = chunks[-1].stats
    assert (stats.generated_tokens, stats.finish_reason) == (12, "length") and stats.ttft_s > 0
    assert "".join(c.text for c in chunks) == chat(server, "Write a poem about rain.", max_tokens=12).choices[0].message.content
    with pytest.raises(LlmrunError, match="answered 401"):
        RemoteEngine.connect(server.url, "wrong-key")
    with pytest.raises(LlmrunError, match="cannot reach the server"):
        RemoteEngine.connect(f"http://127.0.0.1:{_free_port()}")
    # the TUI itself on the remote engine: an answer arrives, the stats bar names the server
    from llmrun.chat.app import ChatApp
    from llmrun.chat.store import ChatStore
    from llmrun.chat.widgets import MessageInput, StatsBar

    async def scenario():
        app = ChatApp(ChatStore.open(tmp_path), load_engine=lambda progress: RemoteEngine.connect(server.url, KEY),
                      default_settings=lambda e: SamplingSettings(max_new_tokens=8))
        async with app.run_test(size=(100, 32)) as pilot:
            while app.engine is None:
                await pilot.pause(0.05)
            assert f"smollm2-135m · server 127.0.0.1:{server.url.rsplit(':', 1)[1]}" in str(app.query_one(StatsBar).render())
            app.query_one(MessageInput).insert("Say hello.")
            await pilot.press("enter")
            await pilot.pause(0.1)
            while app.answer is not None:
                await pilot.pause(0.05)
            return app.last_answer.tokens, app.last_answer.text

    import asyncio

    tokens, text = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert tokens == 8 and text


def test_chat_server_flag_rejects_model_flags():
    for flags, needle in ((["--server", "http://127.0.0.1:1", "--model", "x"], "leave out --model"),
                          (["--api-key", "k"], "--api-key is for --server")):
        proc = subprocess.run([sys.executable, "-m", "llmrun", "chat", *flags], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_stop_strings_never_leak_and_say_stop(server):
    full = complete(server, COUNTING, max_tokens=30).choices[0].text  # " 11, 12, 13, ..."
    stop = "4, 1"  # across token boundaries: "4", ",", " ", "1"
    assert stop in full
    for stream in (False, True):
        if stream:
            chunks = list(complete(server, COUNTING, max_tokens=30, stop=[stop, "never"], stream=True))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            choice = complete(server, COUNTING, max_tokens=30, stop=[stop, "never"]).choices[0]
            text, reason = choice.text, choice.finish_reason
        assert text == full[:full.index(stop)] and reason == "stop"
    short = complete(server, COUNTING, max_tokens=3).choices[0]
    assert short.finish_reason == "length"


def test_seed_reproducible(server):
    kw = dict(model="smollm2-135m", max_tokens=16, temperature=1.0, top_p=0.95)
    a = server.client.completions.create(prompt="Once upon a time", seed=7, **kw).choices[0].text
    b = server.client.completions.create(prompt="Once upon a time", seed=7, **kw).choices[0].text
    others = {server.client.completions.create(prompt="Once upon a time", seed=s, **kw).choices[0].text
              for s in (8, 9, 10)}
    assert a == b and others - {a}


def test_logprobs(server):
    resp = chat(server, "Say hello.", max_tokens=6, logprobs=True, top_logprobs=3)
    entries = resp.choices[0].logprobs.content
    assert len(entries) == 6
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert e.top_logprobs[0].token == e.token and e.logprob == pytest.approx(tops[0])  # greedy
    legacy = complete(server, "Once upon a time", max_tokens=4, logprobs=2).choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == 4
    assert "".join(legacy.tokens) == complete(server, "Once upon a time", max_tokens=4).choices[0].text


@pytest.mark.parametrize("body, status, needle", [
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404, "gpt-9"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": CTX}, 400, "context"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": []}}, 400,
     "chat_template_kwargs cannot set messages"),
])
def test_bad_requests_get_openai_errors(server, body, status, needle):
    r = server.http("POST", "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"]


def test_unreadable_and_oversized_bodies(server):
    r = server.http("POST", "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = server.http("POST", "/v1/completions", json={"prompt": "x" * (5 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = server.http("POST", "/v1/completions", json={"prompt": [10 ** 9]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    long_prompt = "word " * (CTX + 100)
    r = server.http("POST", "/v1/completions", json={"prompt": long_prompt, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert server.http("GET", "/v1/nothing").status_code == 404


def test_api_key_and_cors(server):
    r = server.http("GET", "/v1/models", key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert server.http("GET", "/v1/models", key="sk-wrong").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    preflight = {"Origin": ALLOWED, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = server.http("OPTIONS", "/v1/chat/completions", key=None, headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    r = server.http("OPTIONS", "/v1/chat/completions", key=None, headers={**preflight, "Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in r.headers


def test_metrics_move(server):
    before = server.metric("llmrun:generation_tokens_total")
    requests = server.metric("llmrun:requests_total", '{endpoint="completions",status="200"}')
    complete(server, "Hello", max_tokens=5)
    assert server.metric("llmrun:generation_tokens_total") == before + 5
    assert server.metric("llmrun:requests_total", '{endpoint="completions",status="200"}') == requests + 1
    assert server.metric("llmrun:time_to_first_token_seconds_count") >= 1
    assert server.metric("llmrun:kv_slots") == PARALLEL


def test_concurrent_streams_equal_each_alone(server):
    prompts = [f"Write one sentence about the number {i}." for i in range(PARALLEL)]
    alone = [chat(server, p, max_tokens=24).choices[0].message.content for p in prompts]
    together: list[str | None] = [None] * PARALLEL

    def stream(i: int) -> None:
        together[i] = "".join(c.choices[0].delta.content or "" for c in chat(server, prompts[i], max_tokens=24,
                                                                               stream=True) if c.choices)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(PARALLEL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_queue_full_gets_503_with_retry_after(server):
    results: list[int] = []

    def one() -> None:
        r = server.http("POST", "/v1/completions", json={"prompt": COUNTING, "max_tokens": 60, "temperature": 0})
        results.append(r.status_code)
        if r.status_code == 503:
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"

    threads = [threading.Thread(target=one) for _ in range(PARALLEL + QUEUE + 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(503) >= 1 and results.count(200) >= PARALLEL


def test_clients_that_leave_cancel_their_requests(server):
    gone = server.metric("llmrun:requests_total", '{endpoint="completions",status="499"}')
    tokens = server.metric("llmrun:generation_tokens_total")
    long_prompt = "The history of the printing press is long. " * 160  # ~1600 tokens: seconds of prefill
    for stream in (False, True):  # left during prefill: no token is ever generated for it
        with pytest.raises((openai.APITimeoutError, httpx.TimeoutException)):
            quick = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=0.3)
            list(quick.completions.create(model="smollm2-135m", prompt=long_prompt, max_tokens=50, stream=True)) if stream else \
                quick.completions.create(model="smollm2-135m", prompt=long_prompt, max_tokens=50)
    storm = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=0.5)

    def leave() -> None:  # past the slots and the queue, a request gets 503 at once
        with pytest.raises((openai.APITimeoutError, httpx.TimeoutException, openai.InternalServerError)):
            storm.completions.create(model="smollm2-135m", prompt=COUNTING, max_tokens=1000)

    threads = [threading.Thread(target=leave) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.time() + 10
    while server.running() and time.time() < deadline:
        time.sleep(0.05)
    assert server.running() == 0
    assert server.metric("llmrun:requests_total", '{endpoint="completions",status="499"}') >= gone + 2
    start = time.time()
    assert complete(server, "Hello", max_tokens=5).choices[0].text
    assert time.time() - start < 10
    del tokens  # the cancelled prefills generated nothing: the storm's decodes did


def test_memory_flat_over_many_requests(server):
    proc = psutil.Process(server.proc.pid)
    for _ in range(50):
        complete(server, "Hi", max_tokens=2)
    before = proc.memory_info().rss
    for i in range(250):
        complete(server, f"Hi {i}", max_tokens=2)
    assert proc.memory_info().rss - before < 40 << 20


def test_sigterm_drains_a_running_request():
    proc, url = _start("--parallel", "1", "--ctx-size", "512")
    try:
        _wait_ready(proc, url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(model="smollm2-135m", prompt=COUNTING, max_tokens=40, temperature=0, stream=True)
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert [c.choices[0].finish_reason for c in [first, *rest] if c.choices][-1] == "length"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        proc.kill()


def test_a_model_that_fails_to_load_exits_with_one_line(tmp_path):
    proc, url = _start("--model", str(tmp_path / "missing.gguf"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("llmrun: error:")], err

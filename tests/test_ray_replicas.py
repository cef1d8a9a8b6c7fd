"""`llmrun serve --replicas 2`: the shipped model on a real local Ray cluster (loopback), two Ray
Serve replicas behind the Router, driven through the official `openai` client. One cluster
serves the module (eager steps: the replicas' compiled steps are the plain server's)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")
psutil = pytest.importorskip("psutil")

REPLICA = "x-llmrun-replica"
PARALLEL = 2
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmrun", "serve", "--no-compile", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


class Cluster:
    def __init__(self):
        port = _free_port()
        self.proc = _serve("--replicas", "2", "--threads", "1", "--parallel", str(PARALLEL), "--port", str(port))
        self.url = f"http://127.0.0.1:{port}"
        self.stderr: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.stderr.append(line)
                if "serving at" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(timeout=300)
        assert self.proc.poll() is None and any("serving at" in line for line in self.stderr), "".join(self.stderr)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=120)

    def chat(self, messages: list, **kw):
        """(the parsed completion, the replica that answered)"""
        raw = self.client.chat.completions.with_raw_response.create(
            model="smollm2-135m", messages=messages, temperature=0, **kw)
        return raw.parse(), raw.headers[REPLICA]

    def logged(self, needle: str, timeout: float = 30) -> str:
        """The first line a replica logs (through Ray's driver log) containing `needle`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.stderr):
                if needle in line and "ServeReplica" in line:
                    return line
            time.sleep(0.2)
        raise AssertionError(f"no replica logged {needle!r}: {''.join(self.stderr[-10:])}")


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    processes = psutil.Process(c.proc.pid).children(recursive=True)  # Ray's own: GCS, raylet, workers
    yield c
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(timeout=90) == 0, "".join(c.stderr[-20:])
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, f"left running: {[p.name() for p in alive]}"


def test_concurrent_requests_spread_over_both_replicas(cluster):
    questions = [f"Name a colour that starts with the letter {letter}." for letter in "BGRPYOWS"]

    def ask(question):
        return cluster.chat([SYSTEM, {"role": "user", "content": question}], max_tokens=8)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, questions))
    assert all(a.choices[0].message.content and a.usage.completion_tokens == 8 for a, _ in answers)
    assert len({replica for _, replica in answers}) == 2  # more than one replica's slots were busy

    alone, _ = ask(questions[0])  # greedy: the same answer, whatever ran beside it
    assert alone.choices[0].message.content == answers[0][0].choices[0].message.content


def test_stream_through_the_router(cluster):
    messages = [SYSTEM, {"role": "user", "content": "Write a long story about a dragon."}]
    whole, _ = cluster.chat(messages, max_tokens=12)
    chunks = list(cluster.client.chat.completions.create(
        model="smollm2-135m", messages=messages, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12


def test_a_conversation_stays_on_the_replica_holding_its_prefix(cluster):
    for topic in ("bees", "the sea", "chess"):
        first = [SYSTEM, {"role": "user", "content": f"Tell me about {topic}, in one long paragraph please."}]
        answer, replica = cluster.chat(first, max_tokens=4)
        follow_up = [*first, {"role": "assistant", "content": answer.choices[0].message.content},
                     {"role": "user", "content": "More?"}]
        second, again = cluster.chat(follow_up, max_tokens=4)
        assert again == replica
        # the whole first turn came from that replica's KV cache
        assert second.usage.prompt_tokens_details.cached_tokens >= answer.usage.prompt_tokens - 2


def _metrics(cluster) -> dict:
    """GET /metrics through the Router: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{cluster.url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_the_sums_over_the_replicas(cluster):
    """/metrics answers for the deployment: both replicas' slots, and every request whichever
    replica served it."""
    chats = ("llmrun:requests_total", (("endpoint", "chat"), ("status", "200")))
    deadline = time.time() + 30
    while (before := _metrics(cluster)).get(("llmrun:kv_slots", ())) != 2 * PARALLEL:  # both reported
        assert time.time() < deadline, before.get(("llmrun:kv_slots", ()))
        time.sleep(1)
    questions = [f"Count to {n}." for n in range(3, 9)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda q: cluster.chat([SYSTEM, {"role": "user", "content": q}], max_tokens=2),
                                questions))
    assert len({replica for _, replica in answers}) == 2
    deadline = time.time() + 30
    while (after := _metrics(cluster)).get(chats, 0) - before.get(chats, 0) != len(questions):
        assert time.time() < deadline, (before.get(chats), after.get(chats))
        time.sleep(0.5)
    generated = ("llmrun:generation_tokens_total", ())
    assert after[generated] - before[generated] == sum(a.usage.completion_tokens for a, _ in answers)


def test_errors_keep_openai_shape(cluster):
    response = httpx.get(f"{cluster.url}/v1/nothing", timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = httpx.post(f"{cluster.url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        cluster.client.chat.completions.create(model="other", messages=[SYSTEM])
    assert httpx.get(f"{cluster.url}/health", timeout=30).json() == {"status": "ok"}


def test_a_client_that_leaves_stops_its_generation(cluster):
    with httpx.stream("POST", f"{cluster.url}/v1/completions", timeout=60,
                      json={"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 2000, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # the replica's request log: the stream ended long before its 2000 tokens
    line = cluster.logged("POST /v1/completions")
    completion = int(line.split(" completion ")[1].split()[0])
    assert completion < 500, line


def test_more_cpus_than_the_cluster_has_is_one_line():
    proc = _serve("--replicas", "2", "--threads", "64", "--port", str(_free_port()))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == (f"llmrun: error: 2 replicas x 64 threads need 128 CPUs; the Ray cluster "
                                            f"has {os.cpu_count()}: lower --replicas or --threads")


def test_without_ray_installed_the_flag_says_what_to_install(monkeypatch, capsys):
    from llmrun.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError(name="ray")
    monkeypatch.delitem(sys.modules, "llmrun.serve.ray_replicas", raising=False)
    assert main(["serve", "--replicas", "2"]) == 1
    assert capsys.readouterr().err.strip() == ("llmrun: error: --replicas runs on Ray Serve, which is not "
                                               "installed: pip install 'llmrun[ray]'")


def test_serve_run_builder_refuses_unknown_arguments():
    from llmrun.errors import LlmrunError
    from llmrun.serve.ray_replicas import build

    with pytest.raises(LlmrunError, match="unknown argument model"):
        build({"model": "smollm2-135m"})
    with pytest.raises(LlmrunError, match="--replicas 0 must be >= 1"):
        build({"replicas": "0"})
    with pytest.raises(LlmrunError, match="--port is Ray's under `serve run`"):
        build({"flags": "--threads 1 --port=8001"})

"""Load on OpenAI-compatible servers, side by side: llmrun serve, and llama-cpp-python's server
on the same GGUF when it is installed (`pip install 'llama-cpp-python[server]'`). Loopback only,
bounded: at each concurrency, --requests streamed chat requests (prompts of about
--prompt-tokens tokens, --max-tokens answers) from that many clients at once. Prints requests/s,
aggregate and per-stream decode tokens/s, TTFT and inter-token latency p50/p95 per server.

    python scripts/serve_load.py [--model smollm2-135m] [--concurrency 1,2,4,8] [--requests 16]
    python scripts/serve_load.py --url http://127.0.0.1:8000/v1   # a server already running
    python scripts/serve_load.py --servers llmrun,llmrun-ray      # 1 server against 2 Ray replicas

Each server starts here in turn, alone on the machine, with the same threads and context per
sequence, is warmed up (its compiled steps built) before any timed request, and is stopped
before the next one starts.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx2 as httpx
import openai

TOPICS = ["the printing press", "bees and flowers", "the colour of the sky", "the rules of chess",
          "steam engines", "the water cycle", "bread and yeast", "compilers", "the life of stars",
          "tides", "autumn leaves", "vaccines", "volcanoes", "the first computers", "glaciers", "paper"]


@dataclass
class Result:
    ttft: float
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    decode_s: float = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, what: str, timeout: float = 1800) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:  # ready: /health says so where there is one (llmrun's lists the model while loading)
            health = httpx.get(url.removesuffix("/v1") + "/health", timeout=2).status_code
            if health == 200 or (health == 404 and httpx.get(url + "/models", timeout=2).json()["data"]):
                return
        except (httpx.TransportError, ValueError):  # not listening yet, or Ray's proxy before the app
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} did not start within {timeout:.0f} s")


def start_llmrun(args, replicas: int = 0) -> tuple[str, subprocess.Popen]:
    """llmrun serve alone, or with `replicas` Ray Serve replicas sharing its slots and threads."""
    port = free_port()
    slots = -(-max(args.concurrency) // max(1, replicas))
    cmd = [sys.executable, "-m", "llmrun", "serve", "--port", str(port), "--parallel", str(slots),
           "--ctx-size", str(args.ctx)]
    cmd += ["--model", args.model] if args.model else []
    threads = args.threads or os.cpu_count()
    cmd += ["--replicas", str(replicas), "--threads", str(max(1, threads // replicas))] if replicas else \
        ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(os.devnull, "w") if args.quiet else None)
    url = f"http://127.0.0.1:{port}/v1"
    wait_ready(url, proc, "llmrun serve")
    return url, proc


def start_llama_cpp(args) -> tuple[str, subprocess.Popen] | None:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        print("llama-cpp-python[server] is not installed: its column is left out", file=sys.stderr)
        return None
    from llmrun.sources.shipped import shipped_models

    gguf = args.gguf or str(shipped_models()["smollm2-135m"].path())
    port = free_port()
    threads = args.threads or os.cpu_count()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--host", "127.0.0.1",
           "--n_ctx", str(args.ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--chat_format", "chatml", "--interrupt_requests", "False"]  # queue requests, not cut the running one
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    wait_ready(url, proc, "llama-cpp-python's server")
    return url, proc


def prompt(i: int, tokens: int) -> str:
    sentence = f"Tell me, in great detail and with many examples, everything about {TOPICS[i % len(TOPICS)]}. "
    return sentence * max(1, tokens // 20)  # ~20 tokens per sentence


def one_request(client: openai.OpenAI, model: str, i: int, args) -> Result:
    start = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt(i, args.prompt_tokens)}],
                                            max_tokens=args.max_tokens, temperature=0, stream=True)
    result, last = None, None
    for chunk in stream:
        if not chunk.choices or not chunk.choices[0].delta.content:
            continue
        now = time.perf_counter()
        if result is None:
            result = Result(ttft=now - start)
            first = now
        else:
            result.gaps.append(now - last)
        result.tokens += 1
        last = now
    if result is None:
        return Result(ttft=time.perf_counter() - start)
    result.decode_s = last - first
    return result


def load(url: str, args, concurrency: int) -> dict:
    client = openai.OpenAI(base_url=url, api_key=os.environ.get("LLMRUN_API_KEY", "none"), max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    todo = list(range(args.requests))
    lock = threading.Lock()
    results: list[Result] = []

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            r = one_request(client, model, i, args)
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    gaps = sorted(g for r in results for g in r.gaps)
    ttfts = sorted(r.ttft for r in results)
    pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")  # noqa: E731
    streams = [(r.tokens - 1) / r.decode_s for r in results if r.decode_s > 0]
    return {"rps": len(results) / wall, "aggregate": sum(r.tokens for r in results) / wall,
            "per_stream": statistics.mean(streams) if streams else 0.0,
            "ttft50": pct(ttfts, 0.5), "ttft95": pct(ttfts, 0.95), "itl50": pct(gaps, 0.5), "itl95": pct(gaps, 0.95),
            "tokens": sum(r.tokens for r in results)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="llmrun's --model (default: the shipped SmolLM2)")
    p.add_argument("--gguf", default=None, help="the GGUF llama-cpp-python serves (default: the shipped SmolLM2's)")
    p.add_argument("--url", default=None, help="measure this running server only")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency")
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ctx", type=int, default=1024, help="positions per sequence")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--servers", type=lambda s: s.split(","), default=["llmrun", "llama-cpp-python"],
                   help="which servers to start and measure (comma list): llmrun, llmrun-ray "
                   "(llmrun serve --replicas, needs llmrun[ray]), llama-cpp-python")
    p.add_argument("--replicas", type=int, default=2, help="llmrun-ray's replicas, sharing the threads and slots")
    p.add_argument("--quiet", action="store_true", help="hide llmrun serve's log")
    args = p.parse_args()

    table: dict[str, dict[int, dict]] = {}
    starts = {"server": lambda: (args.url, None)} if args.url else \
        {name: start for name, start in (("llmrun", lambda: start_llmrun(args)),
                                         ("llmrun-ray", lambda: start_llmrun(args, args.replicas)),
                                         ("llama-cpp-python", lambda: start_llama_cpp(args)))
         if name in args.servers}
    for name, start in starts.items():  # one server at a time: each has the whole machine
        started = start()
        if started is None:
            continue
        url, proc = started
        try:
            load(url, argparse.Namespace(**{**vars(args), "requests": 2}), 1)  # warm-up, untimed
            table[name] = {}
            for c in args.concurrency:
                table[name][c] = r = load(url, args, c)
                print(f"{name} c={c}: {r['aggregate']:.1f} t/s aggregate, TTFT p95 {r['ttft95'] * 1e3:.0f} ms",
                      file=sys.stderr, flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=120)  # Ray Serve may take a while to stop its replicas

    names = list(table)
    print(f"{args.requests} streamed chat requests per concurrency; prompts of ~{args.prompt_tokens} tokens, "
          f"up to {args.max_tokens} new tokens, greedy\n")
    header = "| concurrency | server | req/s | tokens/answer | aggregate t/s | vs c=1 | per stream t/s | TTFT p50 / p95 | ITL p50 / p95 |"
    print(header + "\n|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in args.concurrency:
        for name in names:
            r, base = table[name][c], table[name][args.concurrency[0]]
            print(f"| {c} | {name} | {r['rps']:.2f} | {r['tokens'] / args.requests:.0f} | {r['aggregate']:.1f} | {r['aggregate'] / base['aggregate']:.2f}x | "
                  f"{r['per_stream']:.1f} | {r['ttft50'] * 1e3:.0f} / {r['ttft95'] * 1e3:.0f} ms | "
                  f"{r['itl50'] * 1e3:.1f} / {r['itl95'] * 1e3:.1f} ms |")
    for name in names[1:]:
        print()
        for c in args.concurrency:
            a, b = table[name][c]["aggregate"], table[names[0]][c]["aggregate"]
            print(f"concurrency {c}: {name} {a / b:.2f}x {names[0]}'s aggregate t/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

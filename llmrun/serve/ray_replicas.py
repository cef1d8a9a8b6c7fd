"""`llmrun serve`'s OpenAI app as replicas on Ray Serve (`pip install 'llmrun[ray]'`).

Three deployments:
- `ModelReplica`, N of them: each loads the model and runs `llmrun serve`'s own Starlette app
  (llmrun.serve.app) in its process, so routes, streaming, errors and limits are the plain
  server's. Each takes `--parallel` requests at once (its KV cache slots) and `--threads` CPUs.
- `Router`, the HTTP ingress behind Ray's proxy: reads a request's body, hands it to a replica
  through a deployment handle and streams the replica's response back. Requests beyond the
  replicas' slots wait at the handle (at most `--queue`, then 503), so each goes to the first
  replica that frees a slot rather than into one replica's queue. It answers GET /metrics
  itself, from the hub.
- `MetricsHub` (ray_metrics.py), one: every replica's metrics, summed for /metrics.

Ray routes with its prefix-affinity router (the one Ray Serve LLM uses): a prompt whose text
begins with one a replica served before goes to that replica, where llmrun's prefix reuse finds
it in the KV cache; a chat's later turns stay on the replica holding its history. Only replicas
with a free slot are considered, and when their loads differ by more than `--parallel / 2`
requests, Ray balances by load instead.

Started by `llmrun serve --replicas N ...` (a local Ray cluster, or the one at --ray-address /
RAY_ADDRESS), or by Ray's own CLI: `serve run llmrun.serve.ray_replicas:build replicas=2
flags="-m smollm2-135m --threads 1"`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass

from ray import serve

# Ray Serve LLM's prefix-affinity router; its public path (ray.serve.llm.request_router) needs
# `ray[llm]`, which brings vLLM, so it is imported from where that path takes it.
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmrun.errors import LlmrunError
from llmrun.serve.protocol import error_body
from llmrun.serve.ray_metrics import MetricsHub, snapshot

REPLICA_HEADER = "x-llmrun-replica"  # on every response: the replica that answered


@dataclass
class RoutedRequest:
    """One HTTP request, as the Router hands it to a replica. `prompt` and `messages` are what
    Ray's prefix-affinity router matches on (None for requests that generate nothing)."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    prompt: str | list | None = None
    messages: list | None = None

    @classmethod
    async def read(cls, request: Request) -> RoutedRequest:
        body = await request.body()
        prompt = messages = None
        if request.method == "POST" and request.url.path in ("/v1/chat/completions", "/v1/completions"):
            try:
                data = json.loads(body)
            except ValueError:  # the replica's app answers it with a 400
                data = None
            if isinstance(data, dict):
                prompt, messages = data.get("prompt"), data.get("messages")
        return cls(request.method, request.url.path, request.scope["query_string"], list(request.scope["headers"]),
                   body, prompt if isinstance(prompt, str) else None, messages if isinstance(messages, list) else None)


class ModelReplica:
    """One copy of the model behind `llmrun serve`'s app; ready once its steps are built. Its
    metrics go to the hub after each request and at each of Ray's health checks."""

    def __init__(self, flags: dict, hub: DeploymentHandle):
        from llmrun.cli.serve import prepare

        self.state, self.app, _ = prepare(argparse.Namespace(**flags))
        self.state.ready.wait()
        if self.state.load_error:
            raise LlmrunError(f"the model failed to load: {self.state.load_error}")
        self.name = serve.get_replica_context().replica_tag.encode()
        self.hub = hub

    async def __call__(self, request: RoutedRequest):
        """The app's ASGI messages for this request: its response start, then body parts."""
        try:
            async for message in _asgi_messages(self.app, request):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message["headers"], (REPLICA_HEADER.encode(), self.name)]}
                yield message
        finally:
            self._report()

    async def check_health(self) -> None:
        """Ray's health check of this replica (every 10 s): its metrics go to the hub too."""
        self._report()

    def _report(self) -> None:
        metrics = self.state.metrics
        metrics.sample_scheduler(*self.state.scheduler.counts)
        self.hub.put.remote(self.name.decode(), snapshot(metrics.registry))  # sent; its answer is not awaited


async def _asgi_messages(app, request: RoutedRequest):
    """Run `app` on `request` in this process; yield what it sends. Closing the generator (the
    client left, and Ray cancelled the call) tells the app the client disconnected."""
    sent: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_given = False

    async def receive():
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
             "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
             "query_string": request.query, "headers": request.headers, "client": None, "server": None,
             "state": {}}
    done = object()
    task = asyncio.create_task(app(scope, receive, sent.put))
    task.add_done_callback(lambda _: sent.put_nowait(done))
    try:
        while (message := await sent.get()) is not done:
            yield message
        task.result()  # the app's own failure, if it had one
    finally:
        disconnected.set()
        if not task.done():
            await asyncio.wait({task}, timeout=5)


class Router:
    """The HTTP ingress: every path goes to a model replica, its response streamed back."""

    def __init__(self, model: DeploymentHandle, hub: DeploymentHandle):
        self.model = model.options(stream=True)
        self.hub = hub

    async def __call__(self, request: Request) -> Response:
        if request.url.path == "/health" and request.method == "GET":
            # answered here, never queued behind busy slots: Ray routes to replicas once loaded
            return JSONResponse({"status": "ok"})
        if request.url.path == "/metrics" and request.method == "GET":  # the replicas' sums
            return Response(await self.hub.text.remote(), media_type="text/plain; version=0.0.4")
        routed = await RoutedRequest.read(request)
        replies = self.model.remote(routed)
        try:
            start = await replies.__anext__()
            first = await replies.__anext__()
        except BackPressureError:
            return JSONResponse(error_body("every replica is busy and the queue is full: retry later",
                                           "server_error", code="server_busy"), 503, headers={"Retry-After": "1"})
        except Exception as exc:  # noqa: BLE001 - a replica that died under the request
            return JSONResponse(error_body(f"the replica failed: {type(exc).__name__}: {exc}", "server_error"), 500)
        headers = {k.decode(): v.decode() for k, v in start["headers"] if k.lower() != b"content-length"}
        if not first.get("more_body"):
            return Response(first.get("body", b""), start["status"], headers)

        async def rest():
            try:
                yield first["body"]
                async for message in replies:
                    yield message.get("body", b"")
            finally:
                replies.cancel()  # the client left early: the replica stops generating

        return StreamingResponse(rest(), start["status"], headers)


class PromptAffinityRouter(PrefixCacheAffinityRouter):
    """Ray Serve LLM's prefix-affinity router, matching on a RoutedRequest's prompt text and
    skipping requests that have none. (Ray ships this class to the Router by value, with a copy
    of RoutedRequest: the request is read by its fields, not by its class.)"""

    def _extract_text_from_request(self, pending_request):
        for arg in pending_request.args:
            text = getattr(arg, "messages", None) or getattr(arg, "prompt", None)
            if text:
                return self._normalize_prompt_to_string(text) or None
        return None  # /health, /v1/models, ...: load balancing alone

    async def _prefix_match_best_replicas(self, pending_request, candidate_replicas):
        """Ray's choice among the replicas with a free slot. (A replica holding the prefix but
        with every slot busy would keep the request waiting while another has room; when none
        has one, Ray's load balancing picks.)"""
        queued = self._replica_queue_len_cache.get
        with_slot = [r for r in candidate_replicas if (queued(r.replica_id) or 0) < r.max_ongoing_requests]
        if not with_slot:
            return [[]]
        return await super()._prefix_match_best_replicas(pending_request, with_slot)


def application(args: argparse.Namespace):
    """The Ray Serve application: `args.replicas` ModelReplicas behind one Router, and the
    hub of their metrics."""
    flags = {k: v for k, v in vars(args).items() if not callable(v)}
    parallel, replicas = args.parallel, args.replicas
    # the prefix is followed while the replicas' loads differ by at most this many requests
    balance_at = max(1, parallel // 2)
    model = serve.deployment(ModelReplica, name="llmrun-model").options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": args.threads},
        max_ongoing_requests=parallel,  # its slots: a request beyond them waits at the Router, for any replica
        max_queued_requests=max(1, args.queue),
        max_constructor_retry_count=1,  # a model that fails to load fails the same way again
        health_check_timeout_s=60,
        request_router_config=RequestRouterConfig(request_router_class=PromptAffinityRouter,
                                                  request_router_kwargs={"imbalanced_threshold": balance_at}),
    )
    router = serve.deployment(Router, name="llmrun-router").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=replicas * parallel + args.queue + 16,
    )
    hub = serve.deployment(MetricsHub, name="llmrun-metrics").options(num_replicas=1,
                                                                      ray_actor_options={"num_cpus": 0}).bind()
    return router.bind(model.bind(flags, hub), hub)


def build(config: dict):
    """`serve run llmrun.serve.ray_replicas:build replicas=N flags="..."`: `flags` are
    `llmrun serve`'s (--model, --threads, --parallel, ...; not --host/--port, which are Ray's)."""
    from llmrun.cli import build_parser

    unknown = sorted(set(config) - {"replicas", "flags"})
    if unknown:
        raise LlmrunError(f"unknown argument {unknown[0]}: llmrun takes replicas=N and flags=\"...\"")
    try:
        replicas = int(config.get("replicas", 1))
    except ValueError:
        raise LlmrunError(f"replicas={config['replicas']} is not a number") from None
    flags = shlex.split(config.get("flags", ""))
    owned = [f for f in flags if f.split("=")[0] in ("--host", "--port", "--replicas", "--ray-address")]
    if owned:
        raise LlmrunError(f"{owned[0].split('=')[0]} is Ray's under `serve run` (its address, a Serve config's "
                          "http_options): leave it out of flags")
    args = build_parser().parse_args(["serve", *flags])
    args.replicas = replicas
    return application(checked(args))


def checked(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with each replica's threads decided: --threads, else this machine's cores shared."""
    from llmrun.cli.serve import check_flags

    check_flags(args)
    if args.replicas < 1:
        raise LlmrunError(f"--replicas {args.replicas} must be >= 1")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.replicas)
    return argparse.Namespace(**{**vars(args), "threads": threads})


def run(args: argparse.Namespace) -> int:
    """`llmrun serve --replicas N`: deploy on Ray, say where it serves, run until interrupted."""
    import ray

    args = checked(args)
    replicas = args.replicas
    report = lambda message: print(f"llmrun: {message}", file=sys.stderr, flush=True)  # noqa: E731
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    report(f"starting Ray ({'joining ' + address if address else 'a local cluster'})...")
    # a new local cluster listens on loopback only; a joined one is where its operator put it
    local = {} if address else {"_node_ip_address": "127.0.0.1"}
    ray.init(address=address, include_dashboard=False, logging_level="WARNING", **local)
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if replicas * args.threads > cpus:
            raise LlmrunError(f"{replicas} replicas x {args.threads} threads need {replicas * args.threads} CPUs; "
                              f"the Ray cluster has {cpus:g}: lower --replicas or --threads")
        quiet = {"log_level": "WARNING", "enable_access_log": False}  # the replicas log each request
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config=quiet)
        signal.signal(signal.SIGTERM, _interrupt)  # stopped like `llmrun serve`: by Ctrl-C or SIGTERM
        report(f"loading {replicas} replicas...")
        started = time.perf_counter()
        try:
            serve.run(application(args), name="llmrun", route_prefix="/", logging_config=quiet)
        except RuntimeError as exc:
            raise LlmrunError(f"the replicas failed to start: {_first_line(exc)}") from None
        threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
        report(f"serving at http://{args.host}:{args.port}/v1 ({replicas} replicas x {args.parallel} parallel, "
               f"{threads} each; ready in {time.perf_counter() - started:.1f} s)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            report("stopping")
        return 0
    finally:
        if address:  # a cluster of its own operator's: only llmrun's application goes
            serve.delete("llmrun")
        else:
            serve.shutdown()
        ray.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _first_line(exc: Exception) -> str:
    """Ray's deploy error carries the replica's traceback; the line that names the problem."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "LlmrunError" in line]
    return (named[-1].split("LlmrunError:", 1)[-1].strip() if named else lines[-1]) if lines else str(exc)

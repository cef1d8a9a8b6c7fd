"""`llmrun serve`: the OpenAI-compatible HTTP server (llmrun.serve)."""

from __future__ import annotations

import argparse
import os
import sys

from llmrun.cli.common import add_model_args, add_tp_arg
from llmrun.errors import LlmrunError

DRAIN_SECONDS = 5  # on Ctrl-C / SIGTERM: running requests get this long to finish


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve the model over an OpenAI-compatible HTTP API "
                       "(/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics).")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--parallel", "-np", type=int, default=4,
                   help="sequences decoding together, each with its own KV cache slot (default 4)")
    p.add_argument("--ctx-size", "-c", type=int, default=None,
                   help="positions per slot: prompt + answer (default: the model's context, at most 4096)")
    p.add_argument("--queue", type=int, default=32,
                   help="requests that may wait for a slot; more get 503 with Retry-After (default 32)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (not on /health)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; default: none)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: --model, or the shipped model's name)")
    for flag, kind in (("--temperature", float), ("--top-k", int), ("--top-p", float), ("--min-p", float),
                       ("--repetition-penalty", float)):
        p.add_argument(flag, type=kind, default=None, help="default for requests that leave it out")
    p.add_argument("--replicas", type=int, default=None,
                   help="serve N copies of the model on Ray Serve, requests routed by prompt prefix "
                   "(needs pip install 'llmrun[ray]'; --threads is then per replica, default: cores / N)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --replicas: the Ray cluster to join (default: RAY_ADDRESS, else a new local one)")
    add_tp_arg(p, "serve", "rank 0 serves HTTP and schedules, the others run its steps")
    p.set_defaults(run=run, max_new_tokens=1, seed=None)


def run(args: argparse.Namespace) -> int:
    if args.tp > 1 and args.replicas is not None:
        raise LlmrunError("--tp and --replicas do not go together: each replica is one process")
    if args.tp > 1:
        from llmrun.runtime.tensor_parallel import is_main

        if not is_main():
            return follow(args)
    if args.replicas is not None:
        # each replica's request log line by line (Ray merges similar lines unless told, when imported)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        try:
            from llmrun.serve import ray_replicas
        except ImportError as exc:
            if (exc.name or "").split(".")[0] != "ray":
                raise
            raise LlmrunError("--replicas runs on Ray Serve, which is not installed: "
                              "pip install 'llmrun[ray]'") from None
        return ray_replicas.run(args)
    if args.ray_address:
        raise LlmrunError("--ray-address is for --replicas")
    import uvicorn

    state, app, report = prepare(args)
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level="warning", access_log=False, timeout_graceful_shutdown=DRAIN_SECONDS)
    server = uvicorn.Server(config)
    _watch_load(state, server, report, f"http://{args.host}:{args.port}")
    try:
        server.run()  # re-raises the signal that stopped it, once drained
    finally:
        if state.scheduler is not None:
            state.scheduler.close()  # under --tp its last step tells the other ranks to stop
    if state.load_error:
        raise LlmrunError(f"the model failed to load: {state.load_error}")
    return 0


def follow(args: argparse.Namespace) -> int:
    """A rank but 0 of `serve --tp`: load this rank's share, then run the steps rank 0's
    scheduler announces until it stops. Ctrl-C and SIGTERM (torchrun passes them to every rank)
    are rank 0's to act on: it drains its requests and then stops this loop."""
    import signal

    from llmrun.cli.loading import engine_options
    from llmrun.runtime.engine import Engine
    from llmrun.serve.state import Limits

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    check_flags(args)
    engine = Engine.load(engine_options(args), stream=False)
    limits = Limits(args.parallel, args.ctx_size, args.queue)
    engine.follow_scheduler(limits.parallel, limits.slot_positions(engine.context_length))
    return 0


def check_flags(args: argparse.Namespace) -> None:
    """Refuse impossible flags before anything is loaded."""
    from llmrun.cli.loading import check_sampling_flags

    check_sampling_flags(args)
    for flag, value, low in (("--parallel", args.parallel, 1), ("--queue", args.queue, 0),
                             ("--ctx-size", args.ctx_size, 2), ("--port", args.port, 0)):
        if value is not None and value < low:
            raise LlmrunError(f"{flag} {value} must be >= {low}")


def prepare(args: argparse.Namespace):
    """(the server's state, its app, a reporter to stderr), the model loading on a thread."""
    from llmrun.cli.loading import StderrProgress, engine_options, sampling_settings
    from llmrun.runtime.engine import Engine
    from llmrun.serve.app import make_app
    from llmrun.serve.state import Limits, ServerState

    check_flags(args)
    options = engine_options(args)
    name = args.served_model_name or args.model or "smollm2-135m"
    state = ServerState(Limits(args.parallel, args.ctx_size, args.queue), api_key=args.api_key,
                        names=tuple(dict.fromkeys(n for n in (name, args.model) if n)))
    report = lambda message: print(f"llmrun: {message}", file=sys.stderr, flush=True)  # noqa: E731

    def load():
        progress = StderrProgress()
        try:
            engine = Engine.load(options, progress, stream=False)
        finally:
            progress.close()
        state.names = tuple(dict.fromkeys((*state.names, engine.source)))
        return engine, sampling_settings(args, engine)

    state.start_loading(load, report)
    return state, make_app(state, args.cors_origin), report


def _watch_load(state, server, report, url: str) -> None:
    """Say when the model is ready; stop the server if it failed to load."""
    import threading

    def watch() -> None:
        state.ready.wait()
        if state.load_error:
            server.should_exit = True
            return
        report(f"serving {state.model_name} at {url}/v1 ({state.limits.parallel} parallel, "
               f"{state.scheduler.length} positions each)")

    threading.Thread(target=watch, name="llmrun-load-watch", daemon=True).start()

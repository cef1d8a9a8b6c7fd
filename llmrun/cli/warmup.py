"""`llmrun warmup`: prepare a model ahead of time (download, quantize or repack, compile its
steps) so that its first answer runs at full speed; for scripted installs."""

from __future__ import annotations

import argparse
import sys

from llmrun.cli.common import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("warmup", help="prepare a model ahead of time: download, quantize, compile",
                       description="Download, quantize or repack, and compile a model's prefill and decode "
                       "steps for these flags, with progress, so that `llmrun generate` and `llmrun chat` "
                       "answer at full speed from their first run.")
    add_model_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    from llmrun.cli.loading import StderrProgress, engine_options
    from llmrun.runtime.engine import Engine

    start = time.perf_counter()
    progress = StderrProgress()
    try:
        engine = Engine.load(engine_options(args), progress)
    finally:
        progress.close()
    timings = "  ".join(f"{stage} {sec:.2f} s" for stage, sec in engine.timings.items())
    print(f"llmrun: {engine.name} ({engine.quant_label}) is ready in {time.perf_counter() - start:.1f} s: "
          f"{timings}", file=sys.stderr)
    return 0

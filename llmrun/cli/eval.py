"""`llmrun eval`: perplexity of a text (by default the shipped public-domain text), sliding
windows of the model's context; the result on stdout, progress on stderr."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from llmrun.cli.common import add_model_args
from llmrun.peers.llama_cpp import FORMATS as LLAMA_CPP_FORMATS

DEFAULT_CONTEXT_CAP = 1024
BUILTIN_TEXT = "alice29.txt"  # llmrun/data/: Alice's Adventures in Wonderland (see docs/eval.md)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity of a text (quality check for a quantization scheme)",
        description="Perplexity over a text in sliding windows (transformers' recipe: every token "
                    "scored once, with up to context-stride tokens of left context). Without "
                    "--text: Alice's Adventures in Wonderland, shipped with llmrun.")
    add_model_args(p)
    p.add_argument("--text", "-t", default=None, metavar="FILE",
                   help="UTF-8 text file to evaluate (default: the shipped public-domain text)")
    p.add_argument("--context", type=int, default=None,
                   help=f"window length in tokens (default: min(model context, {DEFAULT_CONTEXT_CAP}))")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: half the window)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="score at most this many tokens (from the start of the text)")
    p.add_argument("--llama-cpp", nargs="?", const="as-shipped", default=None, choices=LLAMA_CPP_FORMATS,
                   metavar="FORMAT",
                   help="also score the same windows with llama.cpp (llama-cpp-python) on the same GGUF: "
                        "as-shipped (default), or q4_0 (llama.cpp's own requantization of the file)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(run=run)


def builtin_text_path() -> Path:
    from importlib.resources import files

    return Path(str(files("llmrun.data") / BUILTIN_TEXT))


def read_text(path: str | None) -> tuple[str, str]:
    """(label, text) of --text FILE, or of the shipped text."""
    from llmrun.errors import LlmrunError

    if path is None:
        file, label = builtin_text_path(), f"builtin:{BUILTIN_TEXT}"
    else:
        file, label = Path(path), path
    if not file.exists():
        raise LlmrunError(f"text file not found: {file}")
    if not file.is_file():
        raise LlmrunError(f"--text {file} is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LlmrunError(f"{file} is not UTF-8 text (byte {exc.start}): convert it first") from None
    except OSError as exc:
        raise LlmrunError(f"cannot read {file}: {exc.strerror}") from None
    if not text.strip():
        raise LlmrunError(f"the text {file} is empty")
    return label, text


def _check_args(args: argparse.Namespace) -> None:
    from llmrun.errors import LlmrunError
    from llmrun.eval.perplexity import check_window

    if args.context is not None:
        check_window(args.context, args.stride)
    elif args.stride is not None and args.stride < 1:
        raise LlmrunError(f"--stride {args.stride} must be >= 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise LlmrunError(f"--max-tokens {args.max_tokens} must be >= 1")
    if args.llama_cpp:
        from llmrun.peers import llama_cpp

        llama_cpp.require()


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from llmrun.cli.loading import StderrProgress, engine_options
    from llmrun.errors import LlmrunError
    from llmrun.eval.perplexity import check_window, perplexity, text_ids
    from llmrun.runtime.engine import Engine

    _check_args(args)  # cheap checks first: no model load for a typo
    label, text = read_text(args.text)

    progress = StderrProgress()
    try:
        # eval runs plain full-sequence forwards: nothing to compile
        engine = Engine.load(dataclasses.replace(engine_options(args), compile=False), progress)
    finally:
        progress.close()
    if args.llama_cpp and engine.resolved.kind != "gguf":
        raise LlmrunError(f"--llama-cpp compares on a GGUF file; {engine.source} is not one")
    model_context = engine.context_length
    context = args.context if args.context is not None else min(model_context, DEFAULT_CONTEXT_CAP)
    if context > model_context:
        raise LlmrunError(f"--context {context} exceeds the model's context length ({model_context})")
    ids, bos_id = text_ids(engine.tokenizer, text)  # bos_id: the model wants BOS in front
    stride = check_window(context, args.stride, bos=bos_id is not None)
    first_scored = 0 if bos_id is not None else 1  # without BOS the first token is context only
    if len(ids) < first_scored + 1:
        raise LlmrunError(f"the text gives {len(ids)} token(s): too short to score")
    if args.max_tokens is not None:
        ids = ids[:args.max_tokens + first_scored]

    start = time.perf_counter()
    with _scoring_bar("eval", len(ids) - first_scored) as on_window:
        # a KV cache dtype named: score as generation runs, through the cache in chunks
        kv = engine.kv_dtype if args.kv_cache not in (None, "auto") else None
        result = perplexity(engine.model, ids, context, stride, bos_id, on_window=on_window, kv_dtype=kv)
    eval_s = time.perf_counter() - start
    peer = _llama_cpp(args, engine, ids, context, stride, bos_id, result) if args.llama_cpp else None

    report = {
        "model": engine.source,
        "weights": engine.quant_label,
        "dtype": engine.options.dtype,
        "kv_cache": args.kv_cache or "auto",
        "threads": engine.threads,
        "text": label,
        "text_tokens": len(ids),
        "tokens": result.tokens,
        "windows": result.windows,
        "context": result.context,
        "stride": result.stride,
        "bos_per_window": result.bos_per_window,
        "nll": round(result.mean_nll, 6),
        "ppl": round(result.ppl, 4),
        **{f"{stage}_s": round(sec, 3) for stage, sec in engine.timings.items()},
        "eval_s": round(eval_s, 3),
        "tokens_per_s": round(result.tokens / eval_s, 2) if eval_s > 0 else None,
    }
    if peer:
        report["llama_cpp"] = peer
    if args.json:
        print(json.dumps(report))
    else:
        kv = f", {args.kv_cache} KV cache" if args.kv_cache not in (None, "auto") else ""
        print(f"model     {engine.source} ({engine.quant_label}{kv}, {engine.threads} threads)\n"
              f"text      {label}\n"
              f"windows   {result.windows} of up to {context} tokens, stride {stride}"
              f"{', BOS first in each' if result.bos_per_window else ''}\n"
              f"tokens    {result.tokens}\n"
              f"ppl       {result.ppl:.4f}  (mean nll {result.mean_nll:.4f} nats)\n"
              f"time      {eval_s:.1f} s ({report['tokens_per_s']} tok/s), "
              f"load {engine.timings.get('load', 0.0):.1f} s")
        if peer:
            print(f"llama.cpp {peer['ppl']:.4f}  (mean nll {peer['nll']:.4f} nats; {peer['format']}: {peer['file']}, "
                  f"llama-cpp-python {peer['version']}, {peer['eval_s']:.1f} s)\n"
                  f"ratio     llmrun / llama.cpp = {result.ppl / peer['ppl']:.4f}")
    return 0


def _llama_cpp(args, engine, ids, context, stride, bos_id, ours) -> dict:
    """llama.cpp's perplexity of the same windows of the same token ids, on the engine's GGUF
    file (as shipped) or llama.cpp's Q4_0 requantization of it."""
    from llmrun.peers import llama_cpp

    start = time.perf_counter()
    with _scoring_bar("llama.cpp", ours.tokens) as on_window:
        result, path = llama_cpp.perplexity(engine.resolved.path, args.llama_cpp, ids, context, stride, bos_id,
                                            engine.threads, on_window,
                                            lambda msg: print(f"llmrun: {msg}", file=sys.stderr, flush=True))
    return {"format": args.llama_cpp, "file": str(path), "version": llama_cpp.version(),
            "tokens": result.tokens, "windows": result.windows, "nll": round(result.mean_nll, 6),
            "ppl": round(result.ppl, 4), "eval_s": round(time.perf_counter() - start, 3)}


@contextlib.contextmanager
def _scoring_bar(desc: str, total: int):
    """A progress bar on stderr over the scored tokens, with the running perplexity; yields
    the on_window callback for perplexity()."""
    import math

    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False, dynamic_ncols=True, disable=None)
    scored = [0, 0.0]

    def on_window(window, nll):
        scored[0] += window.targets
        scored[1] += nll
        bar.update(window.targets)
        bar.set_postfix(ppl=f"{math.exp(scored[1] / scored[0]):.3f}")

    try:
        yield on_window
    finally:
        bar.close()

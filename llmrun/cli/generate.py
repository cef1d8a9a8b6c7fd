"""`llmrun generate`: stream a completion to stdout; stats to stderr."""

from __future__ import annotations

import argparse
import json
import sys

from llmrun.cli.common import add_model_args, add_sampling_args, add_template_args, add_tp_arg, template_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate text from a prompt; text goes to stdout, stats to stderr.")
    add_model_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt; '-' reads it from stdin")
    p.add_argument("--system", default=None, help="system prompt (chat models)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    add_template_args(p)
    add_sampling_args(p)
    add_tp_arg(p, "generate", "rank 0 prints")
    p.add_argument("--json", action="store_true", help="print stats as one JSON object on stderr")
    p.set_defaults(run=run)


def read_prompt(args: argparse.Namespace) -> str:
    from llmrun.errors import LlmrunError

    if args.prompt is None or args.prompt == "-":
        if args.prompt is None and sys.stdin.isatty():
            raise LlmrunError("no prompt: pass --prompt TEXT, or --prompt - to read stdin")
        text = sys.stdin.read()
    else:
        text = args.prompt
    if not text.strip():
        raise LlmrunError("the prompt is empty: pass --prompt TEXT")
    return text


def run(args: argparse.Namespace) -> int:
    from llmrun.cli.loading import check_sampling_flags, load_engine, sampling_settings
    from llmrun.runtime.types import GenerationStats

    check_sampling_flags(args)
    from llmrun.runtime.tensor_parallel import is_main

    main = args.tp == 1 or is_main()  # under --tp, rank 0 reads, tokenizes and prints
    prompt = read_prompt(args) if main else None
    engine = load_engine(args)
    settings = sampling_settings(args, engine)
    ids = engine.prompt_ids(prompt, system=args.system, raw=args.raw, template_kwargs=template_kwargs(args)) \
        if main else None
    if engine.shard is not None:
        from llmrun.runtime.tensor_parallel import from_rank0

        ids = from_rank0(ids)
    stats = GenerationStats()
    if not main:
        for _ in engine.stream_generate(ids, settings):
            pass
        return 0
    out = sys.stdout
    for chunk in engine.stream_generate(ids, settings):
        if chunk.text:
            out.write(chunk.text)
            out.flush()
        if chunk.stats:
            stats = chunk.stats
    out.write("\n")
    out.flush()
    report = {
        "model": engine.source,
        "weights": engine.quant_label,
        "threads": engine.threads,
        **{f"{stage}_s": round(sec, 3) for stage, sec in engine.timings.items()},
        "prompt_tokens": stats.prompt_tokens,
        "reused_prompt_tokens": stats.reused_tokens,
        "generated_tokens": stats.generated_tokens,
        "ttft_s": round(stats.ttft_s, 4),
        "prefill_tps": round(stats.prefill_tps, 2),
        "decode_tps": round(stats.decode_tps, 2),
        "peak_rss_mib": round(stats.peak_rss_bytes / 2**20, 1),
        "finish_reason": stats.finish_reason,
    }
    if args.json:
        print(json.dumps(report), file=sys.stderr)
    else:
        timings = "  ".join(f"{stage} {sec:.2f} s" for stage, sec in engine.timings.items())
        reused = f" ({stats.reused_tokens} reused)" if stats.reused_tokens else ""
        print(f"{timings}\nprompt {stats.prompt_tokens} tokens{reused}  ttft {stats.ttft_s * 1000:.0f} ms  "
              f"prefill {stats.prefill_tps:.1f} t/s  decode {stats.decode_tps:.1f} t/s "
              f"({stats.generated_tokens} tokens, {stats.finish_reason})  "
              f"peak RSS {report['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    if stats.finish_reason == "context":
        print(f"llmrun: stopped at the model's context length ({engine.context_length} tokens)",
              file=sys.stderr)
    return 0

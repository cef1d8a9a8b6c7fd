"""`llmrun quantize`: write a quantized model directory (neutral packed int4 in safetensors)
that loads back without the original weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmrun.quant.schemes import (DEFAULT_GROUP_SIZE, DEFAULT_HEAD, DEFAULT_INT4, DEFAULT_WEIGHTS, HEAD_HELP,
                                  HEAD_SCHEMES, INT4_HELP, INT4_KINDS, WEIGHT_MODES, WEIGHTS_HELP)


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model to int4 and save it",
                       description="Quantize linear layers to int4 (head int8) and save the result.")
    p.add_argument("--model", "-m", default=None, help="alias, repo id, HF directory or .gguf")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help="32 (default), 64, 128, 256, or 0 = per output channel")
    p.add_argument("--head", choices=HEAD_SCHEMES, default=DEFAULT_HEAD, help=HEAD_HELP + "; none: unquantized")
    p.add_argument("--weights", choices=WEIGHT_MODES, default=DEFAULT_WEIGHTS, help=WEIGHTS_HELP)
    p.add_argument("--int4", choices=INT4_KINDS, default=DEFAULT_INT4, help=INT4_HELP)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from llmrun.cli.loading import StderrProgress
    from llmrun.errors import LlmrunError
    from llmrun.formats.quantized_dir import save_quantized
    from llmrun.quant.schemes import Scheme
    from llmrun.runtime import pipeline

    if args.out.exists() and not args.force:
        raise LlmrunError(f"{args.out} already exists; pass --force to replace it")
    progress = StderrProgress()
    try:
        loaded = pipeline.load(args.model, Scheme("int4", args.group_size, args.head, args.weights, args.int4),
                               torch.float32, progress, cache=False, prepare=False)  # saved as the layers are
    finally:
        progress.close()
    if loaded.scheme.quant == "none":
        raise LlmrunError(f"{loaded.resolved.path} holds no weights to quantize")
    resolved = loaded.resolved
    save_quantized(loaded.model, loaded.tokenizer, loaded.scheme.to_dict(f"{resolved.source}:{resolved.path}"),
                   args.out, force=args.force)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    seconds = loaded.timings.get("quantize", loaded.timings["load"])
    print(f"llmrun: quantized {resolved.source} in {seconds:.1f} s -> {args.out} ({size:.0f} MiB)", file=sys.stderr)
    return 0

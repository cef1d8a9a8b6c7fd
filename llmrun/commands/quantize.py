"""`llmrun quantize`: write a quantized model directory (neutral packed int4 in safetensors)
that loads back without the original weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmrun.head_schemes import (DEFAULT_HEAD, DEFAULT_INT4, DEFAULT_WEIGHTS, HEAD_HELP, HEAD_SCHEMES, INT4_HELP,
                                 INT4_KINDS, WEIGHT_MODES, WEIGHTS_HELP)


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model to int4 and save it",
                       description="Quantize linear layers to int4 (head int8) and save the result.")
    p.add_argument("--model", "-m", default=None, help="alias, repo id, HF directory or .gguf")
    p.add_argument("--group-size", type=int, default=32,
                   help="32 (default), 64, 128, 256, or 0 = per output channel")
    p.add_argument("--head", choices=HEAD_SCHEMES, default=DEFAULT_HEAD, help=HEAD_HELP + "; none: unquantized")
    p.add_argument("--weights", choices=WEIGHT_MODES, default=DEFAULT_WEIGHTS, help=WEIGHTS_HELP)
    p.add_argument("--int4", choices=INT4_KINDS, default=DEFAULT_INT4, help=INT4_HELP)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from llmrun.commands.loading import StderrProgress
    from llmrun.errors import LlmrunError
    from llmrun.generation_types import LoadProgress
    from llmrun.hub import resolve_model
    from llmrun.loader import load_model, open_checkpoint
    from llmrun.quant import QuantTransform
    from llmrun.quantized_format import save_quantized
    from llmrun.tokenizer import Tokenizer

    if args.out.exists() and not args.force:
        raise LlmrunError(f"{args.out} already exists; pass --force to replace it")
    transform = QuantTransform(args.group_size, head=args.head, int4=args.int4)
    resolved = resolve_model(args.model)
    tokenizer = (Tokenizer.from_gguf(resolved.path) if resolved.kind == "gguf"
                 else Tokenizer.from_hf_dir(resolved.path))
    progress = StderrProgress()
    start = time.perf_counter()
    try:
        as_shipped = args.weights == "as-shipped" and resolved.kind == "gguf"
        model = load_model(open_checkpoint(resolved.path, resolved.kind, keep_blocks=as_shipped), torch.float32,
                           transform,
                           lambda _, done, total: progress(LoadProgress("quantize", done, total)))
    finally:
        progress.close()
    quantize_s = time.perf_counter() - start
    scheme = {"quant": "int4", "group_size": args.group_size, "head": args.head,
              "weights": "as-shipped" if as_shipped else "int4", "int4": args.int4,
              "shipped_formats": _shipped_formats(resolved.path) if as_shipped else [],
              "source": resolved.source + ":" + str(resolved.path)}
    save_quantized(model, tokenizer, scheme, args.out, force=args.force)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"llmrun: quantized {resolved.source} in {quantize_s:.1f} s -> {args.out} ({size:.0f} MiB)",
          file=sys.stderr)
    return 0


def _shipped_formats(path: Path) -> list[str]:
    from llmrun.weights import gguf_file

    return gguf_file.shipped_types(gguf_file.open_reader(path))

"""Flags shared by the subcommands that load a model and generate."""

from __future__ import annotations

import argparse

from llmrun.quant.schemes import HEAD_HELP, INT4_HELP, INT4_KINDS, RUN_HEAD_SCHEMES, WEIGHT_MODES, WEIGHTS_HELP


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="alias (see `llmrun list`), Hugging Face repo id, local HF directory or .gguf file "
        "(default: the shipped SmolLM2-135M-Instruct)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="activation/compute dtype (default: float32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quant", choices=["int4", "none"], default=None,
                   help="int4 packed-weight kernels or none (default: int4 where built)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size along K: 32 (default), 64, 128, 256, or 0 = per output channel")
    p.add_argument("--head", choices=RUN_HEAD_SCHEMES, default=None,
                   help=HEAD_HELP)
    p.add_argument("--weights", choices=WEIGHT_MODES, default=None, help=WEIGHTS_HELP)
    p.add_argument("--int4", choices=INT4_KINDS, default=None, help=INT4_HELP)
    p.add_argument("--kv-cache", choices=["auto", "float32", "bfloat16"], default=None,
                   help="KV cache dtype (default auto: the compute dtype); bfloat16 halves the cache's "
                   "memory and what each decode step reads of it")
    p.add_argument("--no-compile", action="store_true", help="run eager, compile nothing")
    p.add_argument("--compile-backend", choices=["aot", "jit"], default="aot",
                   help="aot: AOTInductor packages cached per model shape (default; fastest, "
                   "sub-second warm start); jit: torch.compile")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def add_template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-think", action="store_true",
                   help="models with a thinking mode (Qwen 3): answer without thinking first "
                   "(the chat template's enable_thinking=false)")


def template_kwargs(args: argparse.Namespace) -> dict:
    """The chat template variables the flags of add_template_args ask for."""
    return {"enable_thinking": False} if args.no_think else {}


def add_tp_arg(p: argparse.ArgumentParser, command: str, rank0: str) -> None:
    """--tp N: tensor parallel over N processes started by torchrun (llmrun.runtime.tensor_parallel)."""
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help=f"tensor parallel over N processes, started by `torchrun --nproc-per-node N -m "
                   f"llmrun {command} --tp N ...` (or torchrun's rendezvous across hosts): each holds "
                   f"its share of every layer; {rank0}")

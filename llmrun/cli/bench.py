"""`llmrun bench`: llama-bench-style speed table (pp512 / tg128) of llmrun's paths beside the
plain PyTorch path and transformers; `llmrun bench --kernels ...` runs the kernel
micro-benchmark (llmrun.kernels.bench) instead. The table goes to stdout; progress, load,
quantize and compile times to stderr."""

from __future__ import annotations

import argparse
import sys

from llmrun.quant.schemes import DEFAULT_HEAD, DEFAULT_INT4, HEAD_HELP, INT4_HELP, INT4_KINDS, RUN_HEAD_SCHEMES


def add_parser(sub) -> None:
    from llmrun.bench import EXTRA_PATHS, PATHS

    p = sub.add_parser(
        "bench", help="benchmark prompt processing and generation speed",
        description="Benchmark pp (one prompt of -p tokens, prefill only) and tg (-n single-token "
        "decode steps) for each path, each in its own process, synthetic tokens, warm-up excluded. "
        "Paths: default (eager, unquantized, bf16 where the CPU has native bf16 else fp32), "
        "eager-int4, compiled-bf16, compiled-int4 (llmrun: AOTInductor packages), transformers; "
        "on request: jit-int4 (llmrun's int4 through torch.compile instead), eager-shipped and "
        "compiled-shipped (a GGUF file's weights as shipped, not re-rounded to int4); llama.cpp "
        "(llama-cpp-python on the same GGUF, where installed) and llama.cpp-q4_0 (its own Q4_0 "
        "requantization of the file).")
    p.add_argument("--model", "-m", default=None,
                   help="alias, repo id, local HF directory or .gguf (default: the shipped SmolLM2-135M)")
    p.add_argument("--synthetic", default=None, metavar="NAME",
                   help="random weights of a real model's shapes instead of a checkpoint: "
                   "llama3.2-1b, llama3.1-8b, smollm2-135m, gemma3-270m, qwen2.5-0.5b, qwen3-4b, "
                   "phi3.5-mini (or tiny, for tests)")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="pp test prompt length (0: skip pp)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="tg test decode steps (0: skip tg)")
    p.add_argument("-b", "--batch", default="1", metavar="B,...",
                   help="tg also with B sequences in each decode step (llmrun paths), e.g. 1,2,4,8: "
                   "aggregate and per-stream t/s")
    p.add_argument("--kv-cache", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="llmrun paths' KV cache dtype (default auto: the compute dtype)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions per test")
    p.add_argument("--threads", "-t", type=int, default=None, help="threads for every path (default: all cores)")
    p.add_argument("--paths", default=None, help=f"comma list (default: all): {','.join(PATHS)}; also {','.join(EXTRA_PATHS)}")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size along K: 0 = per output channel, or 32/64/128/256 "
                   "(default: llmrun's default scheme)")
    p.add_argument("--head", choices=RUN_HEAD_SCHEMES, default=DEFAULT_HEAD,
                   help=HEAD_HELP)
    p.add_argument("--int4", choices=INT4_KINDS, default=DEFAULT_INT4, help=INT4_HELP)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="dtype of default/transformers and of the int4 paths' activations (default: "
                   "bf16 where the CPU has native bf16, else fp32, for default/transformers; llmrun's "
                   "default for int4)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="also run llmrun's eager and jit paths on N tensor-parallel ranks (torchrun on this "
                   "host, --threads shared among them), each row beside its one-process row")
    p.add_argument("-o", "--output", choices=["md", "json", "csv"], default="md", help="table format on stdout")
    p.add_argument("--kernels", nargs=argparse.REMAINDER, default=None, metavar="ARGS",
                   help="run the kernel micro-benchmark instead; the rest of the line goes to it "
                   "(see python -m llmrun.kernels.bench --help)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.kernels is not None:
        return run_kernels(args)
    from llmrun.bench.report import FORMATS
    from llmrun.bench.runner import BenchOptions, parse_batches, parse_paths, run_bench

    opts = BenchOptions(model=args.model, synthetic=args.synthetic, paths=parse_paths(args.paths),
                        threads=args.threads, pp=args.n_prompt, tg=args.n_gen, reps=args.repetitions,
                        group_size=args.group_size, head=args.head, dtype=args.dtype, int4=args.int4,
                        batches=parse_batches(args.batch), kv_cache=args.kv_cache, tp=args.tp)
    report = run_bench(opts)
    print(FORMATS[args.output](report), flush=True)
    failed = [p for p, r in report["paths"].items() if r.get("error")]
    if failed:
        print(f"llmrun bench: failed paths: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run_kernels(args: argparse.Namespace) -> int:
    from llmrun.kernels import bench as kernel_bench

    argv = list(args.kernels)
    if args.threads and "--threads" not in argv:
        argv = ["--threads", str(args.threads)] + argv
    return int(kernel_bench.main(argv) or 0)

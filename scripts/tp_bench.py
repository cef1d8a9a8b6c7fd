"""Tensor-parallel decode speed on a real model's shapes (random int4 weights, llmrun bench's
--synthetic), run by torchrun: one process (--nproc-per-node 1) or N ranks, each holding its
share. Rank 0 prints decode tokens/s (eager, or --compile: torch.compile's steps, as
`--compile-backend jit` runs them), the time one token's all-reduces take alone, and each
rank's peak RSS.

    torchrun --nproc-per-node 1 scripts/tp_bench.py --synthetic llama3.2-1b --threads 2
    torchrun --nproc-per-node 2 scripts/tp_bench.py --synthetic llama3.2-1b --threads 1
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch
import torch.distributed as dist

from llmrun.bench import synthetic
from llmrun.kernels.dispatch import default_backend, require_kernels
from llmrun.models.layers import all_ranks_sum
from llmrun.quant.transform import prepare_int4_model
from llmrun.runtime import tensor_parallel
from llmrun.runtime.compiled import CompiledSteps
from llmrun.runtime.generator import decode_one, prefill
from llmrun.runtime.kv_cache import KVCache


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic", default="llama3.2-1b")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="the steps through torch.compile")
    args = p.parse_args()
    shard = tensor_parallel.Shard(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    tensor_parallel.join(shard)
    torch.set_num_threads(args.threads)
    require_kernels(default_backend())  # loaded before tracing (their loader holds a lock)
    cfg = synthetic.model_config(args.synthetic)
    if shard.world > 1:
        cfg = tensor_parallel.local_config(cfg, shard.world, 32)
    model, _ = synthetic.build_llmrun(cfg, torch.float32, True, group_size=32, seed=0, head="int4-rescored")
    prepare_int4_model(model)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    steps = CompiledSteps() if args.compile else None
    prefill_fn, decode_fn = (steps.prefill, steps.decode) if steps else (prefill, decode_one)
    slot = torch.zeros(1, dtype=torch.long)
    rates = []
    with torch.no_grad():
        for rep in range(args.reps + (1 if args.compile else 0)):  # compiled: a first run compiles
            cache = KVCache(cfg, 1, args.prompt + args.tokens, torch.float32)
            logits = prefill_fn(model, cache, ids, torch.arange(args.prompt)[None], slot)
            dist.barrier()
            start = time.perf_counter()
            for i in range(args.tokens):
                token = logits[:, -1].argmax(-1, keepdim=True)
                logits = decode_fn(model, cache, token, torch.tensor([[args.prompt + i]]), slot)
            dist.barrier()
            if rep or not args.compile:
                rates.append(args.tokens / (time.perf_counter() - start))
        x = torch.randn(1, 1, cfg.dim)
        sums = 2 * cfg.n_layers  # after o_proj and down_proj in every layer
        start = time.perf_counter()
        for _ in range(args.tokens):
            for _ in range(sums):
                x = all_ranks_sum(x) if shard.world > 1 else x
        reduce_ms = (time.perf_counter() - start) / args.tokens * 1e3
    rss = [None] * shard.world
    dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if shard.rank == 0:
        mean = sum(rates) / len(rates)
        spread = max(rates) - min(rates)
        how = "compiled" if args.compile else "eager"
        print(f"{args.synthetic}: {shard.world} rank(s) x {args.threads} thread(s), {how}: decode {mean:.2f} t/s "
              f"(+-{spread / 2:.2f}, {args.reps} runs of {args.tokens} tokens after a {args.prompt}-token prompt); "
              f"all-reduces alone {reduce_ms:.3f} ms/token ({sums} of {cfg.dim} floats); "
              f"peak RSS per rank {', '.join(f'{r:.0f}' for r in rss)} MiB")


if __name__ == "__main__":
    main()

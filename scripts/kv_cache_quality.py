"""Perplexity cost of the KV cache's storage, side by side in one run: fp32, bf16 (what
`--kv-cache bfloat16` runs) and int8 in blocks of 32 along head_dim with an fp16 scale each
(llama.cpp's q8_0 cache type, emulated: values rounded as it stores them, kept in fp32), every
window scored as generation runs (prefill chunks through the cache).

    python scripts/kv_cache_quality.py [--model M] [--quant none|int4] [--max-tokens N] [--context C]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from llmrun.eval.perplexity import cached_hidden, perplexity_of, score_window, text_ids, window_input
from llmrun.runtime.engine import Engine, EngineOptions
from llmrun.runtime.kv_cache import KVCache, LayerCache


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """x (..., D) rounded as q8_0 stores it: blocks of 32, scale absmax / 127 in fp16."""
    blocks = x.float().unflatten(-1, (-1, 32))
    scale = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    q = torch.where(scale > 0, torch.round(blocks / scale.clamp_min(1e-30)), 0).clamp(-127, 127)
    return (q * scale).flatten(-2)


class Q8Layer(LayerCache):
    def write(self, slots, input_pos, k, v):
        super().write(slots, input_pos, q8_0(k), q8_0(v))


class Q8EmulatedCache(KVCache):
    def layer(self, i):
        return Q8Layer(*super().layer(i))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quant", default="int4", choices=["none", "int4"])
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=512)
    args = p.parse_args()
    engine = Engine.load(EngineOptions(model=args.model, quant=args.quant))
    from llmrun.cli.eval import builtin_text_path

    ids, bos = text_ids(engine.tokenizer, builtin_text_path().read_text())
    ids = ids[:args.max_tokens + (0 if bos is not None else 1)]
    model, cfg = engine.model, engine.model.config
    kinds = {"fp32": lambda n: KVCache(cfg, 1, n, torch.float32),
             "bf16": lambda n: KVCache(cfg, 1, n, torch.bfloat16),
             "q8_0 (emulated)": lambda n: Q8EmulatedCache(cfg, 1, n, torch.float32)}
    rows = []
    for name, make in kinds.items():
        start = time.perf_counter()

        def nll(t, w, make=make):
            idx = window_input(t, w, bos).unsqueeze(0)
            hidden = cached_hidden(model, idx, make(idx.shape[1]))
            return score_window(lambda p0, p1: model.head(hidden[p0:p1]), t, w, bos, cfg.vocab_size)

        with torch.inference_mode():
            result = perplexity_of(nll, ids, args.context, None, bos)
        rows.append((name, result.ppl, time.perf_counter() - start))
        print(f"{name}: ppl {result.ppl:.4f} ({result.tokens} tokens)", file=sys.stderr)
    base = rows[0][1]
    bytes_per = {"fp32": 4, "bf16": 2, "q8_0 (emulated)": 34 / 32}
    print(f"{engine.source} ({engine.quant_label}), context {args.context}, {result.tokens} tokens\n")
    print("| KV cache | bytes per value | ppl | vs fp32 |\n|---|---:|---:|---:|")
    for name, ppl, _ in rows:
        print(f"| {name} | {bytes_per[name]:.3g} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

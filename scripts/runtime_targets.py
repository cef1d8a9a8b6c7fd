"""The many-sequences runtime's targets, measured in one run each (compiled int4, as users run it).

  chat   a conversation of --turns turns (each a user message and a --answer-token answer): per
         turn the prompt tokens, how many were reused from the cache, and the time to the first
         token, beside the same prompt prefilled from nothing
  batch  --requests at once through the scheduler (8 slots of --length positions) at each
         concurrency of --concurrency: aggregate and per-stream decode tokens/s, TTFT, and the
         peak RSS beside the bytes the model's tensors and the KV cache hold (the cache's pages
         are taken as positions are written: also after writing all of them)

    python scripts/runtime_targets.py chat  [--model M | --synthetic llama3.2-1b] [--turns 10]
    python scripts/runtime_targets.py batch [--model M | --synthetic llama3.2-1b] [--concurrency 1,2,4,8]

A synthetic model (random weights of a real model's shapes, llmrun bench's) has no tokenizer:
its prompts are random token ids, and its text is not decoded (IdTokenizer).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch

from llmrun.runtime.types import SamplingSettings


class IdTokenizer:
    """What a Sequence asks of a tokenizer, for models that have none: no end token, no text."""

    eos_ids: tuple[int, ...] = ()

    class _Silent:
        def push(self, token: int) -> str:
            return ""

        def flush(self) -> str:
            return ""

    def stream_decoder(self, context, skip_special_tokens=True):
        return self._Silent()


def load(args):
    """(model, tokenizer, compiled steps factory, user turn ids (turn -> ids), label)."""
    from llmrun.runtime.engine import compile_steps

    report = lambda message: print(f"  {message}", file=sys.stderr, flush=True)  # noqa: E731
    if args.synthetic:
        from llmrun.bench import synthetic
        from llmrun.quant.transform import prepare_int4_model

        cfg = synthetic.model_config(args.synthetic)
        model, _ = synthetic.build_llmrun(cfg, torch.float32, True, 32, 0, "int4-rescored")
        prepare_int4_model(model)
        g = torch.Generator().manual_seed(0)
        turn_ids = lambda i, n: torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
        return model, IdTokenizer(), lambda: compile_steps("aot", report), turn_ids, f"{args.synthetic} (synthetic)"
    from llmrun.runtime.engine import Engine, EngineOptions

    engine = Engine.load(EngineOptions(model=args.model, quant="int4"))
    tok = engine.tokenizer
    topics = ["the history of the printing press", "how bees find flowers", "why the sky is blue",
              "the rules of chess", "how a steam engine works", "the water cycle", "what makes bread rise",
              "how compilers optimise loops", "the life of a star", "how tides happen", "why leaves change colour",
              "how vaccines train the immune system"]

    def turn_ids(i, n):  # a user message of about n tokens
        text = f"Tell me more, in detail, about {topics[i % len(topics)]}. " * max(1, n // 12)
        return tok.encode(text)[:n]

    return engine.model, tok, lambda: compile_steps("aot", report), turn_ids, engine.source


def chat(args) -> None:
    from llmrun.runtime.generator import Generator

    model, tok, steps_of, turn_ids, label = load(args)
    settings = SamplingSettings(max_new_tokens=args.answer_tokens, temperature=0)
    # the conversation, and the same prompts prefilled from nothing (fresh): each its own steps
    # and a cache of the whole conversation's length, built or loaded here, not in a timed turn
    gens = []
    for _ in range(2):
        steps = steps_of()
        gens.append(Generator(model, tok, steps.prefill, steps.decode))
        gens[-1].ensure_cache(args.turns * (args.user_tokens + args.answer_tokens) + args.answer_tokens)
        gens[-1].warm_up()
    gen, fresh = gens
    history: list[int] = []
    rows = []
    for turn in range(args.turns):
        prompt = history + turn_ids(turn, args.user_tokens)
        if len(prompt) + args.answer_tokens >= model.config.max_seq_len:
            break
        fresh.ensure_cache(len(prompt) + args.answer_tokens)  # forgets what it holds
        full = _first_token(fresh, prompt, settings)
        stats, answer = _run(gen, prompt, settings)
        rows.append((turn + 1, len(prompt), stats.reused_tokens, stats.ttft_s, full.ttft_s))
        history = prompt + answer
        print(f"turn {turn + 1}: prompt {len(prompt)} ({stats.reused_tokens} reused)  ttft {stats.ttft_s * 1e3:.0f} ms"
              f"  full prefill {full.ttft_s * 1e3:.0f} ms", file=sys.stderr)
    first = rows[0][3]
    print(f"{label}, int4, {torch.get_num_threads()} threads, answers of {args.answer_tokens} tokens\n")
    print("| turn | prompt tokens | reused | TTFT | vs turn 1 | TTFT without reuse |\n|---:|---:|---:|---:|---:|---:|")
    for turn, n, reused, ttft, full in rows:
        print(f"| {turn} | {n} | {reused} | {ttft * 1e3:.0f} ms | {ttft / first:.2f}x | {full * 1e3:.0f} ms |")


def _first_token(gen, prompt, settings):
    stop = threading.Event()
    stats = None
    for chunk in gen.stream(prompt, settings, stop, ignore_eos=True):
        stop.set()
        stats = chunk.stats or stats
    return stats


def _run(gen, prompt, settings):
    answer, stats = [], None
    for chunk in gen.stream(prompt, settings, ignore_eos=True):
        if chunk.token is not None:
            answer.append(chunk.token)
        stats = chunk.stats or stats
    return stats, answer


def held_bytes(model) -> int:
    """The bytes of every tensor the model holds, each storage once (the tables a step reads only
    rows of, such as the embedding and the rescored head's exact table, in full)."""
    from llmrun.bench.worker import module_tensors

    storages = {}
    for module in model.modules():
        for _, t in module_tensors(module):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def batch(args) -> None:
    from llmrun.runtime.memory import peak_rss_bytes
    from llmrun.runtime.scheduler import Scheduler

    model, tok, steps_of, turn_ids, label = load(args)
    steps = steps_of()
    scheduler = Scheduler(model, tok, args.slots, args.length, steps.prefill, steps.decode, steps.batch_sizes)
    settings = SamplingSettings(max_new_tokens=args.tokens, temperature=0)
    prompts = [turn_ids(i, args.prompt_tokens) for i in range(max(args.concurrency))]
    rows = []
    try:
        # the first round runs every batch size up to the largest (requests start one prefill
        # apart and end so too): the packages are built or loaded there, untimed
        for n in [max(args.concurrency), *args.concurrency]:
            start = time.perf_counter()
            requests = [scheduler.submit(prompts[i], settings, ignore_eos=True) for i in range(n)]
            finals = [list(r)[-1].stats for r in requests]
            wall = time.perf_counter() - start
            rows.append((n, wall, finals))
            print(f"concurrency {n}: {n * args.tokens / wall:.1f} t/s aggregate", file=sys.stderr)
    finally:
        scheduler.close()
    rows = rows[1:]
    weights = held_bytes(model)
    cache = scheduler.cache.nbytes
    rss = peak_rss_bytes()
    for t in scheduler.cache.buffers():  # every position of every slot written: the cache in full
        t.fill_(0)
    full_rss = peak_rss_bytes()
    with open("/proc/self/status") as f:  # what stays resident after the run (the peak: also the load's)
        resident = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    print(f"{label}, int4, {torch.get_num_threads()} threads; {args.slots} slots x {args.length} positions; "
          f"prompts of {args.prompt_tokens} tokens, {args.tokens} new tokens each\n")
    print("| concurrency | aggregate t/s | per stream t/s | vs 1 | TTFT mean |\n|---:|---:|---:|---:|---:|")
    base = None
    for n, wall, finals in rows:
        aggregate = n * args.tokens / wall
        base = base or aggregate
        per_stream = sum(s.decode_tps for s in finals) / n
        ttft = sum(s.ttft_s for s in finals) / n
        print(f"| {n} | {aggregate:.1f} | {per_stream:.1f} | {aggregate / base:.2f}x | {ttft * 1e3:.0f} ms |")
    total = weights + cache
    print(f"\nweights {weights / 2**20:.0f} MiB + KV cache {cache / 2**20:.0f} MiB = {total / 2**20:.0f} MiB; "
          f"peak RSS {rss / 2**20:.0f} MiB ({rss / total:.2f}x) with the positions these requests reached, "
          f"{full_rss / 2**20:.0f} MiB ({full_rss / total:.2f}x) with every position written, of which "
          f"{resident / 2**20:.0f} MiB ({resident / total:.2f}x) stay resident")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["chat", "batch"])
    p.add_argument("--model", default=None)
    p.add_argument("--synthetic", default=None, metavar="NAME", help="e.g. llama3.2-1b (llmrun bench's shapes)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--user-tokens", type=int, default=60)
    p.add_argument("--answer-tokens", type=int, default=140)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.inference_mode():
        (chat if args.what == "chat" else batch)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

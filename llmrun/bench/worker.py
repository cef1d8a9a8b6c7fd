"""One benchmark path in its own process: `python -m llmrun.bench.worker SPEC.json OUT.json`
(under `--tp N`, N processes started by torchrun, each holding its share; rank 0 writes OUT).

Builds the path's model, then times (warm-up excluded, `reps` repetitions):
  pp  one prefill of `pp` synthetic tokens (chunks of generator.PREFILL_CHUNK, as generate does)
  tg  `tg` single-token decode steps after a short synthetic prompt
calling only the model's step functions (Generator.prefill_fn / decode_fn, or the
transformers model's forward): no tokenizer, no sampling. Then, for real models, the greedy
tokens of a fixed prompt (checked against the default path by the parent). Progress goes to
stderr; the result is written as one JSON object to OUT (peak RSS is this process's own).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from llmrun.bench import is_quantized
from llmrun.bench.llama_cpp_path import FORMAT_OF_PATH, run_llama_cpp
from llmrun.quant.schemes import DEFAULT_HEAD, DEFAULT_INT4
from llmrun.runtime.memory import peak_rss_bytes

TG_PROMPT = 8  # tokens before the tg test's decode steps
WARMUP_DECODE = 4  # untimed decode steps before tg
QUALITY_PROMPT = "The capital of France is"
QUALITY_TOKENS = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


@dataclass
class Spec:
    path: str  # llmrun.bench.PATHS + EXTRA_PATHS
    model: str | None = None  # as --model; None: the shipped default
    synthetic: str | None = None  # a llmrun.bench.synthetic name instead of a checkpoint
    threads: int = 1
    pp: int = 512
    tg: int = 128
    reps: int = 5
    group_size: int = 32
    head: str = DEFAULT_HEAD  # int4 paths: the output head's scheme (llmrun.quant.schemes)
    dtype: str = "bfloat16"  # compute dtype of the path (int4 paths: of the activations)
    int4: str = DEFAULT_INT4  # int4 paths: asymmetric or symmetric groups
    quality_tokens: int = QUALITY_TOKENS
    seed: int = 0
    batches: tuple[int, ...] = (1,)  # tg also with this many sequences in each decode step
    kv_cache: str = "auto"  # the KV cache's dtype (llmrun.runtime.kv_cache.kv_dtype)
    tp: int = 1  # tensor-parallel ranks (started by torchrun; `threads` is then per rank)

    @property
    def quantized(self) -> bool:
        return is_quantized(self.path)

    @property
    def as_shipped(self) -> bool:
        return self.path.endswith("shipped")

    @property
    def backend(self) -> str | None:
        """The compile backend of the path (llmrun.runtime.engine.COMPILE_BACKENDS), None if eager."""
        return "aot" if self.path.startswith("compiled") else "jit" if self.path.startswith("jit") else None

    @property
    def compiled(self) -> bool:
        return self.backend is not None


def log(spec: Spec, msg: str) -> None:
    from llmrun.runtime.tensor_parallel import is_main

    if is_main():  # under --tp, rank 0 speaks for the ranks
        print(f"llmrun bench: [{run_label(spec.path, spec.tp)}] {msg}", file=sys.stderr, flush=True)


def run_label(path: str, tp: int) -> str:
    """A path as the table names it: with its ranks under --tp."""
    return path if tp == 1 else f"{path} ({tp} ranks)"


def weights_label(spec: Spec, scheme=None) -> str:
    """The path's weights, KV cache and activations; scheme: the loaded quant.schemes.Scheme, where
    it may differ from what the spec asked (a quantized directory's own)."""
    kv = "" if spec.kv_cache == "auto" else f"{SHORT[spec.kv_cache]} KV"
    if not spec.quantized:
        return SHORT[spec.dtype] + (f" ({kv})" if kv else "")
    group_size, int4, head = (spec.group_size, spec.int4, spec.head) if scheme is None else \
        (scheme.group_size, scheme.int4, scheme.head)
    as_shipped = spec.as_shipped if scheme is None else scheme.weights == "as-shipped"
    gs = "pc" if group_size == 0 else f"g{group_size}{'-sym' if int4 == 'symmetric' else ''}"
    layers = "as shipped" if as_shipped else f"int4-{gs}"
    return f"{layers}+{head} head ({SHORT[spec.dtype]} act{', ' + kv if kv else ''})"


# ------------------------------------------------------------------ llmrun paths
def load_llmrun(spec: Spec, shard=None):
    """(model as it runs, tokenizer or None, timings, model name, the weights' label); shard:
    this rank's share only (llmrun.runtime.tensor_parallel.Shard)."""
    from llmrun.errors import LlmrunError
    from llmrun.quant.transform import prepare_int4_model

    dtype = DTYPES[spec.dtype]
    if spec.synthetic:
        from llmrun.bench import synthetic

        if spec.as_shipped:
            raise LlmrunError(f"{spec.path} runs a GGUF file's weights as shipped; synthetic models have none")
        cfg = synthetic.model_config(spec.synthetic)
        if shard is not None:
            from llmrun.runtime.tensor_parallel import local_config

            cfg = local_config(cfg, shard.world, spec.group_size if spec.quantized else 1)
        model, timings = synthetic.build_llmrun(cfg, dtype, spec.quantized, spec.group_size, spec.seed, spec.head,
                                                spec.int4)
        if spec.quantized:  # as the engine runs it (pipeline.load), its kernels loaded before any tracing
            from llmrun.kernels.dispatch import default_backend, require_kernels

            prepare_int4_model(model)
            require_kernels(default_backend())
        return model, None, timings, f"{spec.synthetic} (synthetic)", weights_label(spec)
    from llmrun.quant.schemes import Scheme
    from llmrun.runtime import pipeline
    from llmrun.sources.hub import resolve_model

    resolved = resolve_model(spec.model)
    if spec.as_shipped and resolved.kind != "gguf":
        raise LlmrunError(f"{spec.path} runs a GGUF file's weights as shipped; {resolved.path} is not one")
    asked = Scheme("int4" if spec.quantized else "none", spec.group_size, spec.head,
                            "as-shipped" if spec.as_shipped else "int4", spec.int4)
    loaded = pipeline.load(spec.model, asked, dtype, cache=False, shard=shard)  # quantized here: timed
    if loaded.scheme.quant != asked.quant:
        raise LlmrunError("the model is stored quantized: it has no float weights for this path")
    timings = {"load_s": loaded.timings["load"], "quantize_s": loaded.timings.get("quantize", 0.0)}
    return (loaded.model, loaded.tokenizer, timings, model_name(loaded.resolved),
            weights_label(spec, loaded.scheme))  # a quantized directory brings its own scheme


def model_name(resolved) -> str:
    return resolved.source.split(":", 1)[1] if resolved.source.startswith("shipped:") else resolved.path.name


def module_tensors(module):
    """(name, tensor) of a module's own parameters, buffers and plain tensor attributes (the
    int4/int8 kernels keep their packed weights as attributes, not buffers)."""
    own = {**{k: v for k, v in module._parameters.items() if v is not None},
           **{k: v for k, v in module._buffers.items() if v is not None}}
    for key, value in vars(module).items():
        if isinstance(value, torch.Tensor) and key not in own:
            own[key] = value
    return list(own.items())


def mean_tg_context(spec) -> float:
    """The mean number of positions a tg test's steps attend to (the context grows by one a step)."""
    return TG_PROMPT + spec.tg / 2


def stored_bytes(model, cache=None, attended: float | None = None) -> dict:
    """Bytes a decode step reads: every weight tensor once, the embedding table one row (unless
    it is also the head), a rescored head's exact table its k picked rows, and the KV
    cache (llmrun.runtime.kv_cache.KVCache): all of it (masked attention), or `attended` of its
    positions on average (the decode attention kernel reads only the filled ones)."""
    from llmrun.kernels import RescoredLinear
    from llmrun.models.rope import Rope

    weights = 0
    seen = set()
    rows_read = {f"{prefix}.exact": m.exact_fraction_read() for prefix, m in model.named_modules()
                 if isinstance(m, RescoredLinear)}
    tensors = [(f"{prefix}.{name}", rows_read.get(prefix, 1.0), t)
               for prefix, module in model.named_modules(remove_duplicate=False) if not isinstance(module, Rope)
               for name, t in module_tensors(module)]
    tensors.sort(key=lambda item: "embed_tokens" in item[0])  # a tied head counts in full first
    for name, fraction, t in tensors:
        key = (t.untyped_storage().data_ptr(), t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        if "embed_tokens" in name:
            weights += nbytes // max(1, t.shape[0])  # one row (or one scale) per token
        else:
            weights += int(nbytes * fraction)
    kv = 0 if cache is None else cache.nbytes
    if cache is not None and attended is not None:
        kv = int(kv * min(1.0, attended / cache.length))
    return {"weights_bytes": weights, "kv_bytes": kv}


def run_llmrun(spec: Spec, result: dict, shard=None) -> None:
    from llmrun.runtime.generator import PREFILL_CHUNK, SLOT, Generator
    from llmrun.runtime.kv_cache import kv_dtype

    log(spec, "loading" + (" and quantizing" if spec.quantized else ""))
    model, tokenizer, timings, name, weights = load_llmrun(spec, shard)
    result.update(model=name, weights=weights, **timings)
    log(spec, f"load {timings['load_s']:.2f} s" + (f"  quantize {timings['quantize_s']:.2f} s" if spec.quantized else ""))
    gen = Generator(model, tokenizer, kv_dtype=kv_dtype(spec.kv_cache, model.compute_dtype))
    if spec.compiled:
        from llmrun.runtime.engine import compile_steps

        steps = compile_steps(spec.backend, lambda message: log(spec, message))
        gen.prefill_fn, gen.decode_fn = steps.prefill, steps.decode
        if spec.backend == "aot":
            result["packages_built"] = steps.built  # one per step and cache length; more = a rebuild
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(spec.seed)
    compile_s = 0.0
    with torch.inference_mode():
        if spec.pp:
            cache = gen.ensure_cache(spec.pp)
            ids = torch.randint(0, vocab, (1, spec.pp), generator=g)
            chunks = [(ids[:, lo:min(lo + PREFILL_CHUNK, spec.pp)], torch.arange(lo, min(lo + PREFILL_CHUNK, spec.pp))[None])
                      for lo in range(0, spec.pp, PREFILL_CHUNK)]

            def prefill_once():
                logits = None
                for chunk, pos in chunks:
                    logits = gen.prefill_fn(model, cache, chunk, pos, SLOT)
                return logits

            first, logits = _timed(prefill_once)
            if spec.compiled:
                log(spec, f"first prefill (compiling it, if not cached) {first:.1f} s")
            samples = _repeat(spec, "pp", prefill_once)
            compile_s += max(0.0, first - min(samples)) if spec.compiled else 0.0
            result["tests"]["pp"] = {"n": spec.pp, "samples_s": samples}
            result["pp_argmax"] = int(prefill_once()[0, -1].argmax())
        quality_len = spec.quality_tokens + 32 if tokenizer is not None else 0
        needed = max(TG_PROMPT + spec.tg if spec.tg else 0, quality_len)
        if needed:
            cache = gen.ensure_cache(needed)
            result["tg_cache_len"] = cache.length
        if spec.tg:
            prompt = torch.randint(0, vocab, (TG_PROMPT,), generator=g)
            tokens = [t.view(1, 1) for t in torch.randint(0, vocab, (spec.tg,), generator=g)]
            positions = [torch.tensor([[TG_PROMPT + i]]) for i in range(spec.tg)]

            def decode_once():
                for tok, pos in zip(tokens, positions):
                    gen.decode_fn(model, cache, tok, pos, SLOT)

            # untimed: the short prompt, through decode steps too (one compiled graph for tg),
            # then a few warm-up steps; the first call compiles
            start = time.perf_counter()
            for i in range(TG_PROMPT):
                gen.decode_fn(model, cache, prompt[i].view(1, 1), torch.tensor([[i]]), SLOT)
            warm = min(WARMUP_DECODE, spec.tg)
            for i in range(warm):
                gen.decode_fn(model, cache, tokens[i], positions[i], SLOT)
            first = time.perf_counter() - start
            if spec.compiled:
                log(spec, f"first decode steps (compile) {first:.1f} s")
            samples = _repeat(spec, "tg", decode_once)
            steady = min(samples) / spec.tg * (TG_PROMPT + warm)
            compile_s += max(0.0, first - steady) if spec.compiled else 0.0
            result["tests"]["tg"] = {"n": spec.tg, "samples_s": samples}
            attended = mean_tg_context(spec) if model.attention.kernels else None
            result.update(stored_bytes(model, cache, attended))
        for batch in (b for b in spec.batches if b > 1 and spec.tg):
            result["tests"][f"tg_b{batch}"] = _batched_decode(gen, model, spec, batch, g)
        for batch in (b for b in spec.batches if b > 1 and spec.pp):
            result["tests"][f"pp_b{batch}"] = _prefill_beside_decode(gen, model, spec, batch, g)
        if tokenizer is not None:
            result["greedy_tokens"] = _greedy_llmrun(gen, model, tokenizer, spec)
        if shard is not None:
            result["allreduce_ms_per_token"] = _allreduce_ms(model, spec)
    result["compile_s"] = compile_s if spec.compiled else None
    if spec.backend == "jit":  # a recompiling step would hide inside the t/s: count the graphs
        from torch._dynamo.utils import counters

        result["graphs_compiled"] = int(counters["stats"]["unique_graphs"])


def _batched_decode(gen, model, spec: Spec, batch: int, g: torch.Generator) -> dict:
    """tg with `batch` sequences, each in its own slot of one cache, in every decode step (as
    llmrun.runtime.scheduler runs them): the timed steps, and the bytes such a step reads."""
    from llmrun.runtime.generator import cache_length
    from llmrun.runtime.kv_cache import KVCache

    vocab = model.config.vocab_size
    cache = KVCache(model.config, batch, cache_length(TG_PROMPT + spec.tg, model.config.max_seq_len),
                    gen.kv_dtype)
    slots = torch.arange(batch)
    tokens = [torch.randint(0, vocab, (batch, 1), generator=g) for _ in range(TG_PROMPT + spec.tg)]
    positions = [torch.full((batch, 1), i) for i in range(TG_PROMPT + spec.tg)]

    def steps(lo, hi):
        for i in range(lo, hi):
            gen.decode_fn(model, cache, tokens[i], positions[i], slots)

    start = time.perf_counter()
    steps(0, TG_PROMPT + min(WARMUP_DECODE, spec.tg))  # untimed: the prompt, a warm-up, compiling
    if spec.compiled:
        log(spec, f"first decode steps of {batch} sequences (compile) {time.perf_counter() - start:.1f} s")
    samples = _repeat(spec, "tg", lambda: steps(TG_PROMPT, TG_PROMPT + spec.tg), label=f" x{batch}")
    attended = mean_tg_context(spec) if model.attention.kernels else None
    return {"n": spec.tg, "batch": batch, "samples_s": samples,
            "kv_bytes": stored_bytes(model, cache, attended)["kv_bytes"]}


def _prefill_beside_decode(gen, model, spec: Spec, batch: int, g: torch.Generator) -> dict:
    """pp while batch - 1 other sequences decode, interleaved as llmrun.runtime.scheduler runs
    them: a prefill chunk of INTERLEAVED_CHUNK tokens, then one decode step of the others
    (padded to a compiled batch size), until the prompt is in. Timed: the whole prompt; the
    others' decode steps per second follow from `decode_steps`."""
    from llmrun.runtime.generator import DECODE_BATCH_SIZES, cache_length, padded_batch
    from llmrun.runtime.kv_cache import KVCache
    from llmrun.runtime.scheduler import INTERLEAVED_CHUNK

    vocab = model.config.vocab_size
    chunks = [(lo, min(lo + INTERLEAVED_CHUNK, spec.pp)) for lo in range(0, spec.pp, INTERLEAVED_CHUNK)]
    cache = KVCache(model.config, batch, cache_length(max(spec.pp, TG_PROMPT + len(chunks)), model.config.max_seq_len),
                    gen.kv_dtype)
    prompt = torch.randint(0, vocab, (1, spec.pp), generator=g)
    others = batch - 1
    rows = padded_batch(others, DECODE_BATCH_SIZES if spec.compiled else None)
    slots = torch.arange(1, batch)[torch.arange(rows).clamp(max=others - 1)]  # (rows,): slots 1.., repeats
    tokens = torch.randint(0, vocab, (rows, 1), generator=g)
    for i in range(TG_PROMPT):  # the others' prompts, untimed
        gen.decode_fn(model, cache, tokens, torch.full((rows, 1), i), slots)

    def interleaved():
        for step, (lo, hi) in enumerate(chunks):
            gen.prefill_fn(model, cache, prompt[:, lo:hi], torch.arange(lo, hi)[None], torch.zeros(1, dtype=torch.long))
            gen.decode_fn(model, cache, tokens, torch.full((rows, 1), TG_PROMPT + step), slots)

    start = time.perf_counter()
    interleaved()  # untimed: compiles what is new
    if spec.compiled:
        log(spec, f"first prefill beside {others} decoding (compile) {time.perf_counter() - start:.1f} s")
    samples = _repeat(spec, "pp", interleaved, label=f" beside {others} decoding")
    return {"n": spec.pp, "batch": batch, "samples_s": samples, "decode_steps": len(chunks)}


def _allreduce_ms(model, spec: Spec) -> float:
    """The time one token's all-reduces take alone under --tp: one after o_proj and one after
    down_proj in every layer, each of the model's width in the activations' dtype."""
    from llmrun.models.layers import all_ranks_sum

    x = torch.zeros(1, 1, model.config.dim, dtype=model.compute_dtype)
    start = time.perf_counter()
    for _ in range(spec.tg or 16):
        for _ in range(2 * model.config.n_layers):
            x = all_ranks_sum(x)
    return (time.perf_counter() - start) / (spec.tg or 16) * 1e3


def _greedy_llmrun(gen, model, tokenizer, spec: Spec) -> list[int]:
    """Greedy tokens of QUALITY_PROMPT, through the same decode step that tg timed."""
    from llmrun.runtime.generator import SLOT

    ids = tokenizer.encode(QUALITY_PROMPT)[:32]
    cache = gen.cache
    logits = None
    for i, t in enumerate(ids):
        logits = gen.decode_fn(model, cache, torch.tensor([[t]]), torch.tensor([[i]]), SLOT)
    out = []
    pos = len(ids)
    for _ in range(spec.quality_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        logits = gen.decode_fn(model, cache, torch.tensor([[token]]), torch.tensor([[pos]]), SLOT)
        pos += 1
    return out


# ------------------------------------------------------------------ transformers
def load_transformers(spec: Spec):
    dtype = DTYPES[spec.dtype]
    if spec.synthetic:
        from llmrun.bench import synthetic

        model, seconds = synthetic.build_transformers(spec.synthetic, dtype, spec.seed)
        return model, None, seconds, f"{spec.synthetic} (synthetic)"
    from transformers import AutoModelForCausalLM

    from llmrun.sources.hub import resolve_model
    from llmrun.tokenizer import Tokenizer

    resolved = resolve_model(spec.model)
    start = time.perf_counter()
    if resolved.kind == "gguf":
        tokenizer = Tokenizer.from_gguf(resolved.path)
        extra = {}
        try:  # dense weights in `dtype`, like the default path, not transformers' packed GGUF kernels
            from transformers import GgufConfig

            extra["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantize GGUF
            pass
        model = AutoModelForCausalLM.from_pretrained(str(resolved.path.parent), gguf_file=resolved.path.name,
                                                     dtype=dtype, **extra)
    else:
        tokenizer = Tokenizer.from_hf_dir(resolved.path)
        model = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=dtype)
    model.eval()
    return model, tokenizer, time.perf_counter() - start, model_name(resolved)


def run_transformers(spec: Spec, result: dict) -> None:
    from transformers import DynamicCache

    log(spec, "loading")
    model, tokenizer, load_s, name = load_transformers(spec)
    result.update(model=name, load_s=load_s, quantize_s=0.0, compile_s=None,
                  attn_implementation=getattr(model.config, "_attn_implementation", None))
    log(spec, f"load {load_s:.2f} s")
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(spec.seed)
    cache = lambda: DynamicCache(config=model.config)  # noqa: E731
    with torch.inference_mode():
        if spec.pp:
            ids = torch.randint(0, vocab, (1, spec.pp), generator=g)

            def prefill_once():
                return model(input_ids=ids, past_key_values=cache(), use_cache=True, logits_to_keep=1).logits

            _timed(prefill_once)
            result["tests"]["pp"] = {"n": spec.pp, "samples_s": _repeat(spec, "pp", prefill_once)}
            result["pp_argmax"] = int(prefill_once()[0, -1].argmax())
        if spec.tg:
            prompt = torch.randint(0, vocab, (1, TG_PROMPT), generator=g)
            tokens = [t.view(1, 1) for t in torch.randint(0, vocab, (spec.tg,), generator=g)]
            state = {}

            def setup():  # untimed: a fresh cache holding the prompt
                state["cache"] = cache()
                model(input_ids=prompt, past_key_values=state["cache"], use_cache=True, logits_to_keep=1)

            def decode_once():
                c = state["cache"]
                for tok in tokens:
                    model(input_ids=tok, past_key_values=c, use_cache=True)

            setup()
            for tok in tokens[:WARMUP_DECODE]:
                model(input_ids=tok, past_key_values=state["cache"], use_cache=True)
            result["tests"]["tg"] = {"n": spec.tg, "samples_s": _repeat(spec, "tg", decode_once, setup)}
            cfg = model.config
            params = {(p.data_ptr(), p.numel()): p for p in model.parameters()}.values()
            emb = model.get_input_embeddings().weight
            weights = sum(p.numel() * p.element_size() for p in params)
            if model.get_output_embeddings().weight is not emb:  # untied: one row of the table
                weights -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            # DynamicCache grows: the mean context of the test
            kv = int(cfg.num_hidden_layers * 2 * kv_heads * head_dim * emb.element_size() * mean_tg_context(spec))
            result.update(weights_bytes=weights, kv_bytes=kv)
        if tokenizer is not None:
            ids = tokenizer.encode(QUALITY_PROMPT)[:32]
            c = cache()
            logits = model(input_ids=torch.tensor([ids]), past_key_values=c, use_cache=True, logits_to_keep=1).logits
            out = []
            for _ in range(spec.quality_tokens):
                token = int(logits[0, -1].argmax())
                out.append(token)
                logits = model(input_ids=torch.tensor([[token]]), past_key_values=c, use_cache=True).logits
            result["greedy_tokens"] = out


# ------------------------------------------------------------------ timing
def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _repeat(spec: Spec, test: str, fn, setup=None, label: str = "") -> list[float]:
    samples = []
    n = spec.pp if test == "pp" else spec.tg
    for r in range(spec.reps):
        if setup is not None:
            setup()
        seconds, _ = _timed(fn)
        samples.append(seconds)
        log(spec, f"{test}{n}{label} rep {r + 1}/{spec.reps}: {n / seconds:.2f} t/s"
            + (" per sequence" if label and test == "tg" else ""))
    return samples


def run(spec: Spec, shard=None) -> dict:
    torch.set_num_threads(spec.threads)
    result = {"path": spec.path, "dtype": spec.dtype, "weights": weights_label(spec), "threads": spec.threads,
              "tp": spec.tp, "tests": {}, "greedy_tokens": None, "pp_argmax": None, "error": None}
    if spec.path == "transformers":
        run_transformers(spec, result)
    elif spec.path in FORMAT_OF_PATH:
        run_llama_cpp(spec, result, lambda msg: log(spec, msg), lambda test, fn, setup=None: _repeat(spec, test, fn, setup),
                      _timed, TG_PROMPT, WARMUP_DECODE, QUALITY_PROMPT)
    else:
        run_llmrun(spec, result, shard)
    result["peak_rss_bytes"] = peak_rss_bytes()
    if shard is not None:
        _gather_ranks(result)
    return result


def _gather_ranks(result: dict) -> None:
    """Under --tp, what rank 0 reports for the host: each rank's peak RSS, and the bytes a
    step reads summed over the ranks (each reads its shares and the whole head)."""
    import torch.distributed as dist

    mine = torch.tensor([result["peak_rss_bytes"], result.get("weights_bytes", 0), result.get("kv_bytes", 0)],
                        dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    result["peak_rss_per_rank"] = [int(t[0]) for t in every]
    result["peak_rss_bytes"] = max(result["peak_rss_per_rank"])
    if "weights_bytes" in result:
        result["weights_bytes"], result["kv_bytes"] = (int(sum(t[i] for t in every)) for i in (1, 2))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m llmrun.bench.worker SPEC.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = Spec(**json.load(f))
    shard = None
    try:
        if spec.tp > 1:  # one rank of torchrun's: only rank 0 writes the result
            from llmrun.runtime import tensor_parallel

            shard = tensor_parallel.shard_from_env(spec.tp)
            tensor_parallel.join(shard)
        result = run(spec, shard)
        rc = 0
    except Exception as exc:  # the parent reports it in the table and carries on
        from llmrun.errors import LlmrunError

        if not isinstance(exc, LlmrunError):
            traceback.print_exc()
        result = {"path": spec.path, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                  "peak_rss_bytes": peak_rss_bytes()}
        rc = 1
    if shard is None or shard.rank == 0:
        with open(argv[1], "w") as f:
            json.dump(result, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())

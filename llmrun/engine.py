"""Engine: resolve a model spec, load weights and tokenizer, optionally quantize and compile,
and expose the one streaming generator (and beside it a scheduler for many sequences at once).
Every front end (generate, chat, bench, eval) uses it."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llmrun.errors import LlmrunError
from llmrun.generation_types import ChatMessage, GenerationChunk, LoadProgress, SamplingSettings
from llmrun.generate import Generator
from llmrun.head_schemes import DEFAULT_HEAD, DEFAULT_INT4, DEFAULT_WEIGHTS, INT4_KINDS, WEIGHT_MODES
from llmrun.kv_cache import kv_dtype
from llmrun.scheduler import Scheduler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPILE_BACKENDS = ("aot", "jit")


@dataclass
class EngineOptions:
    model: str | None = None  # alias, repo id, local dir or .gguf; None: the shipped default
    dtype: str = "float32"
    threads: int | None = None
    quant: str = "none"  # none | int4
    group_size: int = 32  # int4: 0 = per output channel; see quant.DEFAULT_GROUP_SIZE
    head: str = DEFAULT_HEAD  # int4: the output head's scheme (llmrun.head_schemes)
    weights: str = DEFAULT_WEIGHTS  # int4: a GGUF's quantized tensors as-shipped, or re-rounded to int4
    int4: str = DEFAULT_INT4  # int4 groups: asymmetric or symmetric (llmrun.head_schemes.INT4_KINDS)
    compile: bool = False
    compile_backend: str = "aot"  # aot: AOTInductor packages (llmrun.aot); jit: torch.compile
    kv_cache: str = "auto"  # the KV cache's dtype: auto (the compute dtype) or a kv_cache.KV_DTYPES key


class Engine:
    def __init__(self, model, tokenizer, options: EngineOptions, resolved, timings: dict,
                 shipped_formats: tuple[str, ...] = ()):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.resolved = resolved
        source = resolved.source
        self.config = model.config
        self.source = source
        self.name = source
        self.timings = timings  # stage -> seconds (download, load, quantize, compile)
        self.shipped_formats = shipped_formats  # GGUF block formats that run as shipped, most bytes first
        self.kv_dtype = kv_dtype(options.kv_cache, model.compute_dtype)
        self.generator = Generator(model, tokenizer, kv_dtype=self.kv_dtype)
        self.steps = None  # the generator's compiled steps, when compiled

    @property
    def context_length(self) -> int:
        return self.config.max_seq_len

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    @property
    def quant_label(self) -> str:
        """Which weights ran: the dtype, the int4 scheme, or a GGUF's formats as shipped."""
        if self.options.quant == "none":
            return self.options.dtype
        if self.shipped_formats:
            return f"as shipped ({', '.join(self.shipped_formats)})"
        gs = self.options.group_size
        return "int4 per-channel" if gs == 0 else f"int4 g{gs} {self.options.int4}"

    @classmethod
    def load(cls, options: EngineOptions,
             progress: Callable[[LoadProgress], None] | None = None) -> "Engine":
        from llmrun import quantized_format
        from llmrun.hub import resolve_model
        from llmrun.loader import load_model, open_checkpoint
        from llmrun.tokenizer import Tokenizer

        if options.threads:
            if options.threads < 1:
                raise LlmrunError(f"--threads {options.threads} must be >= 1")
            torch.set_num_threads(options.threads)
        if options.compile_backend not in COMPILE_BACKENDS:
            raise LlmrunError(f"compile backend {options.compile_backend!r} is not one of "
                              f"{', '.join(COMPILE_BACKENDS)}")
        if options.dtype not in DTYPES:
            raise LlmrunError(f"dtype {options.dtype!r} is not one of {', '.join(DTYPES)}")
        if options.weights not in WEIGHT_MODES:
            raise LlmrunError(f"weights {options.weights!r} is not one of {', '.join(WEIGHT_MODES)}")
        if options.int4 not in INT4_KINDS:
            raise LlmrunError(f"int4 kind {options.int4!r} is not one of {', '.join(INT4_KINDS)}")
        kv_dtype(options.kv_cache, DTYPES[options.dtype])  # a bad choice fails before the load
        report = progress or (lambda p: None)
        timings = {}
        start = time.perf_counter()
        report(LoadProgress("download", message="resolving model"))
        resolved = resolve_model(options.model)
        timings["resolve"] = time.perf_counter() - start

        start = time.perf_counter()
        if resolved.kind == "hf-dir" and not quantized_format.is_quantized_dir(resolved.path):
            # config and weight files are checked before the tokenizer: their errors say more
            open_checkpoint(resolved.path, resolved.kind)
        if resolved.kind == "gguf":
            tokenizer = Tokenizer.from_gguf(resolved.path)
        else:
            tokenizer = Tokenizer.from_hf_dir(resolved.path)
        formats: tuple[str, ...] = ()
        if quantized_format.is_quantized_dir(resolved.path):
            model = quantized_format.load_quantized(resolved.path, DTYPES[options.dtype])
            scheme = quantized_format.read_scheme(resolved.path)
            options.quant, options.group_size = scheme["quant"], int(scheme["group_size"])
            options.weights = scheme.get("weights", "int4")  # v1 directories: int4
            options.int4 = scheme.get("int4", "symmetric")  # older directories: symmetric
            formats = tuple(scheme.get("shipped_formats", ()))
        elif options.quant == "none":
            model = load_model(
                open_checkpoint(resolved.path, resolved.kind), DTYPES[options.dtype], None,
                lambda _, done, total: report(LoadProgress("load", done, total)))
        else:
            model, formats = _load_quantized_cached(resolved, tokenizer, options, report)
        if options.quant != "none":
            from llmrun.quant import prepare_int4_model

            prepare_int4_model(model)
        timings["load"] = time.perf_counter() - start
        engine = cls(model, tokenizer, options, resolved, timings, formats)
        if options.compile:
            start = time.perf_counter()
            engine.steps = compile_steps(options.compile_backend,
                                         lambda message: report(LoadProgress("compile", message=message)))
            engine.generator.prefill_fn, engine.generator.decode_fn = engine.steps.prefill, engine.steps.decode
            engine.generator.warm_up()
            timings["compile"] = time.perf_counter() - start
        return engine

    def generation_defaults(self) -> dict:
        """Sampling defaults from the checkpoint's generation_config.json, if it has one."""
        path = self.resolved.path / "generation_config.json"
        if self.resolved.kind != "hf-dir" or not path.is_file():
            return {}
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        out = {}
        if cfg.get("do_sample") is False:
            out["temperature"] = 0.0
        elif cfg.get("temperature") is not None:
            out["temperature"] = float(cfg["temperature"])
        for key, cast in (("top_k", int), ("top_p", float), ("min_p", float),
                          ("repetition_penalty", float)):
            if cfg.get(key) is not None:
                out[key] = cast(cfg[key])
        return out

    def chat_prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The conversation rendered through the model's chat template, tokenized."""
        tok = self.tokenizer
        if not tok.chat_template:
            text = "\n".join(m.content for m in messages)
            return tok.encode(text)
        rendered = tok.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True)
        return tok.encode(rendered)  # encode never doubles a BOS the template wrote

    def prompt_ids(self, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
        if raw or not self.tokenizer.chat_template:
            text = prompt if not system else f"{system}\n\n{prompt}"
            return self.tokenizer.encode(text)
        messages = ([ChatMessage("system", system)] if system else []) + [ChatMessage("user", prompt)]
        return self.chat_prompt_ids(messages)

    def stream_generate(self, prompt_ids: list[int], settings: SamplingSettings,
                        stop: threading.Event | None = None, ignore_eos: bool = False
                        ) -> Iterator[GenerationChunk]:
        return self.generator.stream(prompt_ids, settings, stop, ignore_eos)

    def scheduler(self, slots: int, length: int | None = None,
                  report: Callable[[str], None] | None = None) -> Scheduler:
        """The batch API beside stream_generate: a llmrun.scheduler.Scheduler running up to
        `slots` sequences at once, each up to `length` positions (default: the context), on
        steps compiled as this engine's are. `submit` requests to it; `close` it when done."""
        if slots < 1:
            raise LlmrunError(f"{slots} slots: a scheduler needs at least one")
        if self.options.compile:
            steps = compile_steps(self.options.compile_backend, report or (lambda message: None))
            return Scheduler(self.model, self.tokenizer, slots, length or self.context_length,
                             steps.prefill, steps.decode, steps.batch_sizes, self.kv_dtype)
        return Scheduler(self.model, self.tokenizer, slots, length or self.context_length,
                         kv_dtype=self.kv_dtype)


def compile_steps(backend: str, report: Callable[[str], None]):
    """Compiled prefill and decode steps of `backend` (see COMPILE_BACKENDS) for one Generator
    or Scheduler: llmrun.aot.AotSteps or llmrun.compiled.CompiledSteps (their .prefill, .decode
    and .batch_sizes)."""
    if backend == "jit":
        from llmrun.compiled import CompiledSteps

        report("compiling prefill and decode with torch.compile (slow once per machine, then cached)")
        return CompiledSteps()
    from llmrun.aot import AotSteps

    return AotSteps(report)


def default_threads() -> int:
    return len(os.sched_getaffinity(0))


def _load_quantized_cached(resolved, tokenizer, options: EngineOptions, report):
    """Quantize on first use and keep the result (neutral format) in llmrun's cache, keyed by
    the source file's identity and the scheme; later loads read the cache. A corrupt cache
    entry is rebuilt. Returns the model and the GGUF formats that run as shipped."""
    from llmrun import quantized_format
    from llmrun.loader import load_model, open_checkpoint
    from llmrun.quant import make_transform
    from llmrun.weights import gguf_file

    dtype = DTYPES[options.dtype]
    as_shipped = options.weights == "as-shipped" and resolved.kind == "gguf"
    cache = quantized_format.cache_path(resolved.path, options.quant, options.group_size, options.head,
                                        "as-shipped" if as_shipped else "int4", options.int4)
    if quantized_format.is_quantized_dir(cache):
        report(LoadProgress("load", message=f"loading quantized model from {cache}"))
        try:
            model = quantized_format.load_quantized(cache, dtype)
            return model, tuple(quantized_format.read_scheme(cache).get("shipped_formats", ()))
        except LlmrunError as exc:
            report(LoadProgress("load", message=f"rebuilding the quantized cache ({exc})"))
    transform = make_transform(options.quant, options.group_size, options.head, options.int4)
    ckpt = open_checkpoint(resolved.path, resolved.kind, keep_blocks=as_shipped)
    formats = tuple(gguf_file.shipped_types(gguf_file.open_reader(resolved.path))) if as_shipped else ()
    model = load_model(ckpt, dtype, transform,
                       lambda _, done, total: report(LoadProgress("quantize", done, total)))
    scheme = {"quant": options.quant, "group_size": options.group_size, "head": transform.head,
              "weights": "as-shipped" if as_shipped else "int4", "int4": options.int4,
              "shipped_formats": list(formats),
              "source": str(resolved.path)}
    try:
        quantized_format.save_quantized(model, tokenizer, scheme, cache, force=True)
    except OSError as exc:  # a cache that cannot be written costs only speed next time
        report(LoadProgress("quantize", message=f"could not cache the quantized model ({exc})"))
    return model, formats

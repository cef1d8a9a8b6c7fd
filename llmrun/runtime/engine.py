"""Engine: resolve a model spec, load weights and tokenizer, optionally quantize and compile,
and expose the one streaming generator (and beside it a scheduler for many sequences at once).
Every front end (generate, chat, bench, eval) uses it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from llmrun.errors import LlmrunError
from llmrun.runtime.generator import Generator
from llmrun.runtime.types import ChatMessage, GenerationChunk, LoadProgress, SamplingSettings
from llmrun.quant.schemes import (DEFAULT_GROUP_SIZE, DEFAULT_HEAD, DEFAULT_INT4, DEFAULT_WEIGHTS, INT4_KINDS,
                                  WEIGHT_MODES, Scheme)
from llmrun.runtime.kv_cache import kv_dtype
from llmrun.runtime.pipeline import Loaded, load
from llmrun.runtime.scheduler import Scheduler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPILE_BACKENDS = ("aot", "jit")


@dataclass
class EngineOptions:
    model: str | None = None  # alias, repo id, local dir or .gguf; None: the shipped default
    dtype: str = "float32"
    threads: int | None = None
    quant: str = "none"  # none | int4
    group_size: int = DEFAULT_GROUP_SIZE  # int4: 0 = per output channel
    head: str = DEFAULT_HEAD  # int4: the output head's scheme (llmrun.quant.schemes)
    weights: str = DEFAULT_WEIGHTS  # int4: a GGUF's quantized tensors as-shipped, or re-rounded to int4
    int4: str = DEFAULT_INT4  # int4 groups: asymmetric or symmetric (llmrun.quant.schemes.INT4_KINDS)
    compile: bool = False
    compile_backend: str = "aot"  # aot: AOTInductor packages (llmrun.runtime.aot); jit: torch.compile
    kv_cache: str = "auto"  # the KV cache's dtype: auto (the compute dtype) or a kv_cache.KV_DTYPES key
    tp: int = 1  # tensor-parallel ranks (processes started by torchrun; llmrun.runtime.tensor_parallel)


class Engine:
    def __init__(self, loaded: Loaded, options: EngineOptions, shard=None):
        model, tokenizer = loaded.model, loaded.tokenizer
        self.shard = shard  # this process's rank when tensor-parallel, else None
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.resolved = loaded.resolved
        self.scheme = loaded.scheme  # the weights that run: asked for, or a quantized directory's
        self.config = model.config
        self.source = self.name = loaded.resolved.source
        self.timings = dict(loaded.timings)  # stage -> seconds (resolve, load, quantize, compile)
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
        return self.options.dtype if self.scheme.quant == "none" else self.scheme.label

    @classmethod
    def load(cls, options: EngineOptions, progress: Callable[[LoadProgress], None] | None = None,
             stream: bool = True, background: bool = False) -> "Engine":
        """`stream`: also build stream_generate's compiled steps (a server runs its scheduler's
        steps alone). `background`: compiled steps not built yet are built by a background
        process while this one runs them eagerly (llmrun.runtime.aot.AotSteps), instead of
        before the first answer."""
        shard = None
        if options.tp < 1:
            raise LlmrunError(f"--tp {options.tp} must be >= 1")
        if options.tp > 1:
            from llmrun.runtime import tensor_parallel

            shard = tensor_parallel.shard_from_env(options.tp)
            tensor_parallel.join(shard)
            torch.set_num_threads(options.threads or tensor_parallel.threads_per_rank())
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
        loaded = load(options.model, Scheme(options.quant, options.group_size, options.head, options.weights,
                                            options.int4), DTYPES[options.dtype], report, shard=shard)
        engine = cls(loaded, options, shard)
        if options.compile and stream and shard is not None and options.compile_backend == "aot":
            report(LoadProgress("compile", message="--tp runs eagerly with --compile-backend aot (its "
                                "packages do not hold the ranks' all-reduces): --compile-backend jit compiles"))
        elif options.compile and stream:
            start = time.perf_counter()
            engine.steps = compile_steps(options.compile_backend,
                                         lambda message: report(LoadProgress("compile", message=message)),
                                         options if background else None)
            engine.generator.prefill_fn, engine.generator.decode_fn = engine.steps.prefill, engine.steps.decode
            engine.generator.warm_up()
            engine.timings["compile"] = time.perf_counter() - start
            if hasattr(engine.steps, "packages"):
                from llmrun import readiness

                readiness.record(engine.readiness_source, engine.settings_label, engine.steps.packages())
        return engine

    @property
    def readiness_source(self) -> str:
        """The model as llmrun.readiness names it: its source, or a local model's path."""
        return str(self.resolved.path.resolve()) if self.source == "local" else self.source

    @property
    def settings_label(self) -> str:
        """What decides the compiled steps beside the model: weights, dtype, KV cache, threads."""
        return f"{self.quant_label}, {self.options.dtype}, kv {self.kv_dtype}, {self.threads} threads"

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

    def chat_prompt_ids(self, messages: list[ChatMessage], template_kwargs: dict | None = None) -> list[int]:
        """The conversation rendered through the model's chat template, tokenized;
        `template_kwargs` are further template variables (e.g. enable_thinking=False)."""
        tok = self.tokenizer
        if not tok.chat_template:
            text = "\n".join(m.content for m in messages)
            return tok.encode(text)
        rendered = tok.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True,
            **(template_kwargs or {}))
        return tok.encode(rendered)  # encode never doubles a BOS the template wrote

    def prompt_ids(self, prompt: str, system: str | None = None, raw: bool = False,
                   template_kwargs: dict | None = None) -> list[int]:
        if raw or not self.tokenizer.chat_template:
            text = prompt if not system else f"{system}\n\n{prompt}"
            return self.tokenizer.encode(text)
        messages = ([ChatMessage("system", system)] if system else []) + [ChatMessage("user", prompt)]
        return self.chat_prompt_ids(messages, template_kwargs)

    def stream_generate(self, prompt_ids: list[int], settings: SamplingSettings,
                        stop: threading.Event | None = None, ignore_eos: bool = False
                        ) -> Iterator[GenerationChunk]:
        if self.shard is not None:  # every rank samples the same tokens from the same logits
            from llmrun.runtime.tensor_parallel import shared_seed

            settings = replace(settings, seed=shared_seed(settings.seed))
        return self.generator.stream(prompt_ids, settings, stop, ignore_eos)

    def scheduler(self, slots: int, length: int | None = None,
                  report: Callable[[str], None] | None = None, warm: bool = False) -> Scheduler:
        """The batch API beside stream_generate: a llmrun.runtime.scheduler.Scheduler running up to
        `slots` sequences at once, each up to `length` positions (default: the context), on
        steps compiled as this engine's are (`warm`: every step built before its `ready`).
        `submit` requests to it; `close` it when done. Under --tp this is rank 0's: it
        announces each step to the other ranks, which run follow_scheduler."""
        if slots < 1:
            raise LlmrunError(f"{slots} slots: a scheduler needs at least one")
        prefill_fn, decode_fn, batch_sizes = self._scheduler_steps(report)
        on_stop = None
        if self.shard is not None:
            from llmrun.runtime.tensor_parallel import LeaderSteps

            leader = LeaderSteps(prefill_fn, decode_fn)
            prefill_fn, decode_fn, on_stop = leader.prefill, leader.decode, leader.stop
        return Scheduler(self.model, self.tokenizer, slots, length or self.context_length, prefill_fn, decode_fn,
                         batch_sizes, self.kv_dtype, warm, on_stop)

    def follow_scheduler(self, slots: int, length: int | None = None) -> None:
        """Under --tp, on the ranks but 0: run the steps that rank 0's scheduler (of the same
        slots and length) announces, on this rank's share of the model, until it stops."""
        from llmrun.runtime.kv_cache import KVCache
        from llmrun.runtime.scheduler import slot_length
        from llmrun.runtime.tensor_parallel import follow

        prefill_fn, decode_fn, _ = self._scheduler_steps(None)
        cache = KVCache(self.config, slots, slot_length(self.model, length or self.context_length), self.kv_dtype)
        follow(self.model, cache, prefill_fn, decode_fn)

    def _scheduler_steps(self, report: Callable[[str], None] | None):
        """(prefill, decode, batch sizes) of a scheduler: compiled as this engine's steps are,
        eager without compile (and under --tp with AOT packages, as in load)."""
        from llmrun.runtime.generator import decode_one, prefill

        if not self.options.compile or (self.shard is not None and self.options.compile_backend == "aot"):
            return prefill, decode_one, None
        steps = compile_steps(self.options.compile_backend, report or (lambda message: None))
        return steps.prefill, steps.decode, steps.batch_sizes


def compile_steps(backend: str, report: Callable[[str], None], background: EngineOptions | None = None):
    """Compiled prefill and decode steps of `backend` (see COMPILE_BACKENDS) for one Generator
    or Scheduler: llmrun.runtime.aot.AotSteps or llmrun.runtime.compiled.CompiledSteps (their .prefill, .decode
    and .batch_sizes). `background`: AotSteps' (torch.compile compiles in this process)."""
    if backend == "jit":
        from llmrun.runtime.compiled import CompiledSteps

        report("compiling prefill and decode with torch.compile (slow once per machine, then cached)")
        return CompiledSteps()
    from llmrun.runtime.aot import AotSteps

    return AotSteps(report, background=background)



"""Turning parsed flags into a loaded Engine and sampling settings, with progress on stderr."""

from __future__ import annotations

import argparse
import sys

from llmrun.quant.schemes import DEFAULT_HEAD, DEFAULT_INT4, DEFAULT_WEIGHTS
from llmrun.quant.schemes import DEFAULT_GROUP_SIZE
from llmrun.runtime.engine import Engine, EngineOptions
from llmrun.runtime.types import LoadProgress, SamplingSettings

# When neither the flags nor the model's generation_config.json say: llama.cpp's defaults.
FALLBACK_SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0)


class StderrProgress:
    """tqdm bars on stderr, one per stage."""

    def __init__(self):
        self.bar = None
        self.stage = None

    def __call__(self, p: LoadProgress) -> None:
        from tqdm import tqdm

        if p.stage != self.stage:
            self.close()
            self.stage = p.stage
            if p.total:
                self.bar = tqdm(total=p.total, desc=p.stage, unit="tensor", file=sys.stderr,
                                leave=False, dynamic_ncols=True, disable=None)
                if self.bar.disable:  # not a terminal: one plain line per stage
                    print(f"llmrun: {p.stage} ({p.total} tensors)...", file=sys.stderr, flush=True)
        if p.message:
            print(f"llmrun: {p.message}...", file=sys.stderr, flush=True)
        if self.bar is not None and p.total:
            self.bar.update(p.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def engine_options(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(
        model=args.model,
        dtype=args.dtype or "float32",
        threads=args.threads,
        quant=args.quant or "int4",
        group_size=args.group_size if args.group_size is not None else DEFAULT_GROUP_SIZE,
        compile=not args.no_compile,
        head=getattr(args, "head", None) or DEFAULT_HEAD,
        weights=getattr(args, "weights", None) or DEFAULT_WEIGHTS,
        int4=getattr(args, "int4", None) or DEFAULT_INT4,
        compile_backend=getattr(args, "compile_backend", "aot"),
        kv_cache=getattr(args, "kv_cache", None) or "auto",
        tp=getattr(args, "tp", None) or 1,
    )


def load_engine(args: argparse.Namespace) -> Engine:
    from llmrun.runtime.tensor_parallel import is_main

    progress = StderrProgress() if is_main() else None  # the other ranks say nothing
    try:
        return Engine.load(engine_options(args), progress, background=True)  # an answer never waits for compiling
    finally:
        if progress is not None:
            progress.close()


def sampling_settings(args: argparse.Namespace, engine: Engine) -> SamplingSettings:
    defaults = {**FALLBACK_SAMPLING, **engine.generation_defaults()}
    pick = lambda flag, key: getattr(args, flag) if getattr(args, flag) is not None else defaults[key]  # noqa: E731
    return SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=pick("temperature", "temperature"),
        top_k=pick("top_k", "top_k"),
        top_p=pick("top_p", "top_p"),
        min_p=pick("min_p", "min_p"),
        repetition_penalty=pick("repetition_penalty", "repetition_penalty"),
        seed=args.seed,
    )


def check_sampling_flags(args: argparse.Namespace) -> None:
    """Reject impossible sampling flags before spending time on loading the model."""
    from llmrun.runtime.sampling import validate

    given = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "min_p",
                                           "repetition_penalty") if getattr(args, k) is not None}
    validate(SamplingSettings(max_new_tokens=args.max_new_tokens, **given))

"""The one way a model is loaded, for every front end (the engine, `llmrun quantize`, the bench
worker): resolve the spec, read the tokenizer, then the weights, from a quantized directory
(which brings its own scheme), a float checkpoint, or quantized on the way in (kept in llmrun's
cache when asked), and prepare them to run. Returns what was loaded with the scheme actually
used: callers' options are never written back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from llmrun.errors import LlmrunError
from llmrun.quant.schemes import Scheme
from llmrun.runtime.types import LoadProgress


@dataclass
class Loaded:
    model: torch.nn.Module  # llmrun.models.Transformer
    tokenizer: object  # llmrun.tokenizer.Tokenizer
    resolved: object  # llmrun.sources.hub.ResolvedModel
    scheme: Scheme  # what the weights are: asked for, or what a quantized directory holds
    timings: dict = field(default_factory=dict)  # stage -> seconds: resolve, load, quantize


class _TimedTransform:
    """Wraps a loader transform, adding up the seconds it spends (quantization)."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __call__(self, name, module, blocks=None):
        start = time.perf_counter()
        try:
            return self.inner(name, module, blocks)
        finally:
            self.seconds += time.perf_counter() - start


def load(spec: str | None, scheme: Scheme, dtype: torch.dtype,
         report: Callable[[LoadProgress], None] | None = None, cache: bool = True,
         prepare: bool = True) -> Loaded:
    """Load `spec` (as --model: None is the shipped default) with `scheme` (a quantized
    directory's own scheme wins) in `dtype`. cache: keep what is quantized here in llmrun's
    cache and read it back next time (else quantize every time: the bench times it, `llmrun
    quantize` writes it elsewhere). prepare: as it runs (quant.prepare_int4_model); `llmrun
    quantize` saves unprepared layers."""
    from llmrun.formats import quantized_dir
    from llmrun.formats.checkpoint import load_model, open_checkpoint
    from llmrun.sources.hub import resolve_model
    from llmrun.tokenizer import Tokenizer

    report = report or (lambda p: None)
    timings = {}
    start = time.perf_counter()
    report(LoadProgress("download", message="resolving model"))
    resolved = resolve_model(spec)
    timings["resolve"] = time.perf_counter() - start

    start = time.perf_counter()
    stored = resolved.kind == "hf-dir" and quantized_dir.is_quantized_dir(resolved.path)
    if resolved.kind == "hf-dir" and not stored:
        open_checkpoint(resolved.path, resolved.kind)  # config and weights first: their errors say more
    tokenizer = Tokenizer.from_gguf(resolved.path) if resolved.kind == "gguf" else Tokenizer.from_hf_dir(resolved.path)
    quantize_s = 0.0
    if stored:
        model = quantized_dir.load_quantized(resolved.path, dtype)
        scheme = Scheme.of_quantized_dir(resolved.path)
    elif scheme.quant == "none":
        model = load_model(open_checkpoint(resolved.path, resolved.kind), dtype, None,
                           lambda _, done, total: report(LoadProgress("load", done, total)))
        scheme = Scheme()
    else:
        model, scheme, quantize_s = _quantized(resolved, tokenizer, scheme, dtype, report, cache)
    if prepare and scheme.quant != "none":
        from llmrun.quant.transform import prepare_int4_model

        prepare_int4_model(model)
    timings["load"] = time.perf_counter() - start - quantize_s
    if quantize_s:
        timings["quantize"] = quantize_s
    return Loaded(model, tokenizer, resolved, scheme, timings)


def _quantized(resolved, tokenizer, scheme: Scheme, dtype, report, cache: bool):
    """(model, scheme, seconds spent quantizing): quantized here, or read back from llmrun's
    cache (keyed by the source file's identity and the scheme; a corrupt entry is rebuilt)."""
    from llmrun.formats import quantized_dir
    from llmrun.formats import gguf_file
    from llmrun.formats.checkpoint import load_model, open_checkpoint
    from llmrun.quant.transform import make_transform

    as_shipped = scheme.weights == "as-shipped" and resolved.kind == "gguf"
    path = quantized_dir.cache_path(resolved.path, scheme.quant, scheme.group_size, scheme.head,
                                       "as-shipped" if as_shipped else "int4", scheme.int4)
    if cache and quantized_dir.is_quantized_dir(path):
        report(LoadProgress("load", message=f"loading quantized model from {path}"))
        try:
            return quantized_dir.load_quantized(path, dtype), Scheme.of_quantized_dir(path), 0.0
        except LlmrunError as exc:
            report(LoadProgress("load", message=f"rebuilding the quantized cache ({exc})"))
    transform = _TimedTransform(make_transform(scheme.quant, scheme.group_size, scheme.head, scheme.int4))
    ckpt = open_checkpoint(resolved.path, resolved.kind, keep_blocks=as_shipped)
    formats = tuple(gguf_file.shipped_types(gguf_file.open_reader(resolved.path))) if as_shipped else ()
    model = load_model(ckpt, dtype, transform,
                       lambda _, done, total: report(LoadProgress("quantize", done, total)))
    used = replace(scheme, head=transform.inner.head, weights="as-shipped" if as_shipped else "int4",
                   shipped_formats=formats)
    if cache:
        try:
            quantized_dir.save_quantized(model, tokenizer, used.to_dict(str(resolved.path)), path, force=True)
        except OSError as exc:  # a cache that cannot be written costs only speed next time
            report(LoadProgress("quantize", message=f"could not cache the quantized model ({exc})"))
    return model, used, transform.seconds

"""The one way a model is loaded, for every front end (the engine, `llmrun quantize`, the bench
worker): resolve the spec, read the tokenizer, then the weights, from a quantized directory
(which brings its own scheme), a float checkpoint, or quantized on the way in (kept in llmrun's
cache when asked), and prepare them to run. Returns what was loaded with the scheme actually
used: callers' options are never written back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from llmrun.errors import LlmrunError
from llmrun.kernels.dispatch import default_backend, load_kernels, require_kernels
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
         prepare: bool = True, shard=None) -> Loaded:
    """Load `spec` (as --model: None is the shipped default) with `scheme` (a quantized
    directory's own scheme wins) in `dtype`. cache: keep what is quantized here in llmrun's
    cache and read it back next time, and the model as it runs on this machine (else
    quantize every time: the bench times it, `llmrun quantize` writes it elsewhere). prepare:
    as it runs (quant.prepare_int4_model); `llmrun quantize` saves unprepared layers. shard: this
    rank's share only (runtime.tensor_parallel.Shard), read from the checkpoint, never cached."""
    from llmrun.formats import quantized_dir
    from llmrun.formats.checkpoint import load_model, open_checkpoint
    from llmrun.sources.hub import resolve_model
    from llmrun.tokenizer import Tokenizer

    report = report or (lambda p: None)
    timings = {}
    start = time.perf_counter()
    # the kernels load (or build: once per machine, ~20 s) while the model is found, read,
    # quantized and packed for them
    threading.Thread(target=load_kernels, daemon=True).start()
    report(LoadProgress("download", message="resolving model"))
    resolved = resolve_model(spec)
    timings["resolve"] = time.perf_counter() - start

    start = time.perf_counter()
    stored = resolved.kind == "hf-dir" and quantized_dir.is_quantized_dir(resolved.path)
    if shard is not None and stored:
        raise LlmrunError(f"{resolved.path} is a quantized directory; --tp reads the checkpoint it "
                          "came from (a GGUF file or a Hugging Face directory), one share per rank")
    cache = cache and shard is None
    if resolved.kind == "hf-dir" and not stored:
        open_checkpoint(resolved.path, resolved.kind)  # config and weights first: their errors say more
    # the quantized directory the weights come from: the user's, or llmrun's cache entry
    source = resolved.path if stored else _cache_entry(resolved, scheme) if cache and scheme.quant != "none" else None
    runs_prepared = prepare and cache and source is not None
    if runs_prepared and (hit := _read_prepared(source, dtype, report)) is not None:
        model, tokenizer, scheme = hit
        require_kernels(default_backend())
        timings["load"] = time.perf_counter() - start
        return Loaded(model, tokenizer, resolved, scheme, timings)
    tokenizer = Tokenizer.from_gguf(resolved.path) if resolved.kind == "gguf" else Tokenizer.from_hf_dir(resolved.path)
    quantize_s = 0.0
    if stored:
        model = quantized_dir.load_quantized(resolved.path, dtype)
        scheme = Scheme.of_quantized_dir(resolved.path)
    elif scheme.quant == "none":
        model = load_model(_checkpoint(resolved, shard, scheme), dtype, None,
                           lambda _, done, total: report(LoadProgress("load", done, total)))
        scheme = Scheme()
    else:
        model, scheme, quantize_s = _quantized(resolved, tokenizer, scheme, dtype, report, source, shard)
    if prepare and scheme.quant != "none":
        from llmrun.quant.transform import prepare_int4_model

        prepare_int4_model(model)
        if runs_prepared and quantized_dir.is_quantized_dir(source):
            _write_prepared(model, tokenizer, scheme, source, dtype, report)
    require_kernels(default_backend())
    timings["load"] = time.perf_counter() - start - quantize_s
    if quantize_s:
        timings["quantize"] = quantize_s
    return Loaded(model, tokenizer, resolved, scheme, timings)


def _checkpoint(resolved, shard, scheme: Scheme, keep_blocks: bool = False):
    """The checkpoint's tensors as the model takes them: whole, or this rank's share."""
    from llmrun.formats.checkpoint import open_checkpoint
    from llmrun.runtime.tensor_parallel import shard_checkpoint

    ckpt = open_checkpoint(resolved.path, resolved.kind, keep_blocks=keep_blocks)
    if shard is None:
        return ckpt
    # a row-parallel split keeps whole quantization groups: llmrun's int4 groups, or the
    # neutral 32-column groups of a GGUF file's blocks
    return shard_checkpoint(ckpt, shard, 1 if scheme.quant == "none" else max(scheme.group_size, 32))


def _cache_entry(resolved, scheme: Scheme):
    """Where llmrun's cache keeps `resolved` quantized with `scheme`."""
    from llmrun.formats import quantized_dir

    as_shipped = scheme.weights == "as-shipped" and resolved.kind == "gguf"
    return quantized_dir.cache_path(resolved.path, scheme.quant, scheme.group_size, scheme.head,
                                    "as-shipped" if as_shipped else "int4", scheme.int4)


def _read_prepared(source, dtype, report):
    """(model, tokenizer, scheme) of the quantized directory `source` as prepared on this
    machine before, configured to run; None when there is no current entry."""
    from llmrun.formats import prepared_dir, quantized_dir
    from llmrun.quant.transform import configure_int4_model

    if not quantized_dir.is_quantized_dir(source):
        return None
    entry = prepared_dir.entry_path(source, dtype, default_backend())
    if not prepared_dir.is_current(entry, prepared_dir.entry_key(source, dtype)):
        return None
    report(LoadProgress("load", message=f"mapping the prepared model {entry}"))
    try:
        model, tokenizer, scheme = prepared_dir.load_prepared(entry)
    except (LlmrunError, OSError, ValueError, KeyError) as exc:  # damaged: prepared again from source
        report(LoadProgress("load", message=f"preparing the model again ({type(exc).__name__}: {exc})"))
        return None
    configure_int4_model(model)
    return model, tokenizer, Scheme.from_dict(scheme)


def _write_prepared(model, tokenizer, scheme: Scheme, source, dtype, report) -> None:
    from llmrun.formats import prepared_dir

    entry = prepared_dir.entry_path(source, dtype, default_backend())
    try:
        prepared_dir.save_prepared(model, tokenizer, scheme.to_dict(str(source)), entry,
                                   prepared_dir.entry_key(source, dtype))
    except (OSError, prepared_dir.NotPreparable) as exc:  # costs only the next run's speed
        report(LoadProgress("load", message=f"could not keep the prepared model ({exc})"))


def _quantized(resolved, tokenizer, scheme: Scheme, dtype, report, path, shard=None):
    """(model, scheme, seconds spent quantizing): quantized here, or read back from llmrun's
    cache entry `path` (None: no cache; a corrupt entry is rebuilt); of this rank's share only
    with a tensor-parallel `shard`."""
    from llmrun.formats import quantized_dir
    from llmrun.formats import gguf_file
    from llmrun.formats.checkpoint import load_model
    from llmrun.quant.transform import make_transform

    as_shipped = scheme.weights == "as-shipped" and resolved.kind == "gguf"
    if path is not None and quantized_dir.is_quantized_dir(path):
        report(LoadProgress("load", message=f"loading quantized model from {path}"))
        try:
            return quantized_dir.load_quantized(path, dtype), Scheme.of_quantized_dir(path), 0.0
        except LlmrunError as exc:
            report(LoadProgress("load", message=f"rebuilding the quantized cache ({exc})"))
    transform = _TimedTransform(make_transform(scheme.quant, scheme.group_size, scheme.head, scheme.int4))
    ckpt = _checkpoint(resolved, shard, scheme, keep_blocks=as_shipped)
    formats = tuple(gguf_file.shipped_types(gguf_file.open_reader(resolved.path))) if as_shipped else ()
    model = load_model(ckpt, dtype, transform,
                       lambda _, done, total: report(LoadProgress("quantize", done, total)))
    used = replace(scheme, head=transform.inner.head, weights="as-shipped" if as_shipped else "int4",
                   shipped_formats=formats)
    if path is not None:
        try:
            quantized_dir.save_quantized(model, tokenizer, used.to_dict(str(resolved.path)), path, force=True)
        except OSError as exc:  # a cache that cannot be written costs only speed next time
            report(LoadProgress("quantize", message=f"could not cache the quantized model ({exc})"))
    return model, used, transform.seconds

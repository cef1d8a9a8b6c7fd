"""The one way a model is loaded, for every front end (the engine, `llmrun quantize`, the bench
worker): resolve the spec, read the tokenizer, then the weights, from a quantized directory
(which brings its own scheme), a float checkpoint, or quantized on the way in (kept in llmrun's
cache when asked), and prepare them to run. Returns what was loaded with the scheme actually
used: callers' options are never written back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from llmrun.errors import LlmrunError
from llmrun.generation_types import LoadProgress
from llmrun.head_schemes import DEFAULT_HEAD, DEFAULT_INT4, DEFAULT_WEIGHTS


@dataclass(frozen=True)
class Scheme:
    """How a model's weights are held: float (quant none), or int4 layers with a head scheme,
    a GGUF's own block formats run as shipped (weights as-shipped) or re-rounded to int4."""

    quant: str = "none"  # none | int4
    group_size: int = 32  # int4: 0 = per output channel
    head: str = DEFAULT_HEAD  # llmrun.head_schemes
    weights: str = DEFAULT_WEIGHTS  # as-shipped | int4
    int4: str = DEFAULT_INT4  # asymmetric | symmetric
    shipped_formats: tuple[str, ...] = ()  # the GGUF block formats run as shipped, most bytes first

    @property
    def label(self) -> str:
        """Which weights run, for people: the dtype (given), the int4 scheme, or the formats."""
        if self.shipped_formats:
            return f"as shipped ({', '.join(self.shipped_formats)})"
        return "int4 per-channel" if self.group_size == 0 else f"int4 g{self.group_size} {self.int4}"

    @classmethod
    def of_quantized_dir(cls, path) -> "Scheme":
        from llmrun import quantized_format

        s = quantized_format.read_scheme(path)
        return cls(quant=s["quant"], group_size=int(s["group_size"]), head=s.get("head", "int8"),
                   weights=s.get("weights", "int4"),  # v1 directories: int4
                   int4=s.get("int4", "symmetric"),  # older directories: symmetric
                   shipped_formats=tuple(s.get("shipped_formats", ())))

    def to_dict(self, source: str) -> dict:
        """As a quantized directory records it (quantized_format.save_quantized)."""
        return {**asdict(self), "shipped_formats": list(self.shipped_formats), "source": source}


@dataclass
class Loaded:
    model: torch.nn.Module  # llmrun.models.Transformer
    tokenizer: object  # llmrun.tokenizer.Tokenizer
    resolved: object  # llmrun.hub.ResolvedModel
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
    from llmrun import quantized_format
    from llmrun.hub import resolve_model
    from llmrun.loader import load_model, open_checkpoint
    from llmrun.tokenizer import Tokenizer

    report = report or (lambda p: None)
    timings = {}
    start = time.perf_counter()
    report(LoadProgress("download", message="resolving model"))
    resolved = resolve_model(spec)
    timings["resolve"] = time.perf_counter() - start

    start = time.perf_counter()
    stored = resolved.kind == "hf-dir" and quantized_format.is_quantized_dir(resolved.path)
    if resolved.kind == "hf-dir" and not stored:
        open_checkpoint(resolved.path, resolved.kind)  # config and weights first: their errors say more
    tokenizer = Tokenizer.from_gguf(resolved.path) if resolved.kind == "gguf" else Tokenizer.from_hf_dir(resolved.path)
    quantize_s = 0.0
    if stored:
        model = quantized_format.load_quantized(resolved.path, dtype)
        scheme = Scheme.of_quantized_dir(resolved.path)
    elif scheme.quant == "none":
        model = load_model(open_checkpoint(resolved.path, resolved.kind), dtype, None,
                           lambda _, done, total: report(LoadProgress("load", done, total)))
        scheme = Scheme()
    else:
        model, scheme, quantize_s = _quantized(resolved, tokenizer, scheme, dtype, report, cache)
    if prepare and scheme.quant != "none":
        from llmrun.quant import prepare_int4_model

        prepare_int4_model(model)
    timings["load"] = time.perf_counter() - start - quantize_s
    if quantize_s:
        timings["quantize"] = quantize_s
    return Loaded(model, tokenizer, resolved, scheme, timings)


def _quantized(resolved, tokenizer, scheme: Scheme, dtype, report, cache: bool):
    """(model, scheme, seconds spent quantizing): quantized here, or read back from llmrun's
    cache (keyed by the source file's identity and the scheme; a corrupt entry is rebuilt)."""
    from llmrun import quantized_format
    from llmrun.loader import load_model, open_checkpoint
    from llmrun.quant import make_transform
    from llmrun.weights import gguf_file

    as_shipped = scheme.weights == "as-shipped" and resolved.kind == "gguf"
    path = quantized_format.cache_path(resolved.path, scheme.quant, scheme.group_size, scheme.head,
                                       "as-shipped" if as_shipped else "int4", scheme.int4)
    if cache and quantized_format.is_quantized_dir(path):
        report(LoadProgress("load", message=f"loading quantized model from {path}"))
        try:
            return quantized_format.load_quantized(path, dtype), Scheme.of_quantized_dir(path), 0.0
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
            quantized_format.save_quantized(model, tokenizer, used.to_dict(str(resolved.path)), path, force=True)
        except OSError as exc:  # a cache that cannot be written costs only speed next time
            report(LoadProgress("quantize", message=f"could not cache the quantized model ({exc})"))
    return model, used, transform.seconds

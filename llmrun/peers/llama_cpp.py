"""llama.cpp beside llmrun, through llama-cpp-python (the optional extra `llmrun[llama-cpp]`):
the same GGUF file (or llama.cpp's own Q4_0 requantization of it) and the same token ids, for
`llmrun eval --llama-cpp` and the `llama.cpp` paths of `llmrun bench`."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from llmrun.errors import LlmrunError

INSTALL = "pip install 'llmrun[llama-cpp]'"
# What llama.cpp runs of a file: as shipped, or requantized by llama_model_quantize to Q4_0 (its
# fastest x86 format, repacked at load), the output head as llama.cpp's Q4_0 preset leaves it.
FORMATS = ("as-shipped", "q4_0")


def _module():
    try:
        import llama_cpp
    except ImportError:
        raise LlmrunError(f"llama.cpp comparisons need llama-cpp-python: {INSTALL}") from None
    return llama_cpp


def available() -> bool:
    try:
        _module()
    except LlmrunError:
        return False
    return True


def require() -> None:
    """Fail in one line, before any model loads, when llama-cpp-python is missing."""
    if not available():
        raise LlmrunError(f"llama.cpp comparisons need llama-cpp-python: {INSTALL}")


def version() -> str:
    return getattr(_module(), "__version__", "?")


def model_file(source: Path, fmt: str, progress=None) -> Path:
    """The GGUF llama.cpp runs for `fmt`: the file itself, or its Q4_0 requantization, made
    once into llmrun's cache (keyed by the source's path, size and mtime)."""
    if fmt not in FORMATS:
        raise LlmrunError(f"llama.cpp format {fmt!r} is not one of {', '.join(FORMATS)}")
    if source.suffix != ".gguf" or not source.is_file():
        raise LlmrunError(f"llama.cpp runs GGUF files only, not {source}")
    if fmt == "as-shipped":
        return source
    from llmrun.cache_dir import llmrun_cache_dir

    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}\n{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = llmrun_cache_dir() / "llama-cpp" / f"{source.stem}-q4_0-{key}.gguf"
    if target.is_file():
        return target
    lc = _module()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    if progress:
        progress(f"requantizing {source.name} to Q4_0 with llama.cpp")
    params = lc.llama_model_quantize_default_params()
    params.ftype = lc.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = len(os.sched_getaffinity(0))
    try:
        with _quiet():
            rc = lc.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if rc != 0:
            raise LlmrunError(f"llama.cpp could not requantize {source} to Q4_0 (status {rc})")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def _quiet():
    """llama.cpp logs to the process's stderr from C: silence fd 2 for the call."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load(path: Path, threads: int, n_ctx: int, logits_all: bool = False, n_batch: int = 512):
    """A llama_cpp.Llama on `path`, CPU only, quiet."""
    lc = _module()
    with _quiet():
        try:
            return lc.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_batch, 512),
                            n_threads=threads, n_threads_batch=threads, n_gpu_layers=0,
                            logits_all=logits_all, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise LlmrunError(f"llama.cpp could not load {path}: {exc}") from None


def last_logits(llm):
    """The logits (float32 numpy [vocab]) after the last eval."""
    import numpy as np

    lc = _module()
    ptr = lc.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def greedy(llm, ids: list[int], n: int) -> list[int]:
    """The `n` greedy tokens after `ids` on a fresh sequence (EOS not special)."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(last_logits(llm).argmax()))
        llm.eval([out[-1]])
    return out


def window_logits(llm, tokens: list[int]):
    """Logits of every position of a fresh sequence `tokens` (float32 numpy [T, vocab]); the
    model needs logits_all and n_ctx >= len(tokens)."""
    llm.reset()
    llm.eval(tokens)
    return llm.scores[:len(tokens)]


def perplexity(source: Path, fmt: str, ids, context: int, stride: int, bos_id: int | None, threads: int,
               on_window=None, progress=None):
    """llama.cpp's perplexity of the token stream `ids` over exactly llmrun.eval.perplexity's
    windows and scoring (the same ids, BOS handling and float32 log-softmax). Returns
    (PerplexityResult, the file llama.cpp ran)."""
    import torch

    from llmrun.eval.perplexity import perplexity_of, score_window, window_input

    path = model_file(source, fmt, progress)
    llm = load(path, threads, n_ctx=context, logits_all=True, n_batch=context)
    vocab = llm.n_vocab()

    def nll(ids_t, window):
        tokens = window_input(ids_t, window, bos_id).tolist()
        logits = torch.from_numpy(window_logits(llm, tokens))  # (L, vocab)
        return score_window(lambda p0, p1: logits[p0:p1], ids_t, window, bos_id, vocab)

    try:
        return perplexity_of(nll, ids, context, stride, bos_id, on_window), path
    finally:
        llm.close()

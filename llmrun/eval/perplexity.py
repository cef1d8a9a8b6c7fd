"""Perplexity of a text under a model, with Hugging Face's sliding-window recipe.

The token stream is cut into windows of `context` tokens whose starts are `stride` apart.
Every token after the first is scored exactly once: the first window scores all of its
tokens, each later window only the tokens past the end of the window before it, so a scored
token sees up to `context - stride` tokens of left context from the earlier windows (stride ==
context: disjoint windows, and the first token of each window is not scored). This is the
recipe of the transformers guide "Perplexity of fixed-length models"; tests/test_eval.py
checks the result against transformers' own loss on the same windows.

One departure, for models whose tokenizer puts a BOS token in front of a text (Gemma): every
window starts with BOS, followed by up to `context - 1` text tokens, and the window's first
text token is scored too (BOS is its context). The guide's recipe slices one token stream,
so only the first window would start with BOS: Gemma 3 270M's perplexity on the windows
without it came out about 1.5x higher (the model treats BOS as its attention sink). This is
what llama.cpp's perplexity does as well (it writes BOS into the first slot of each chunk).
For models without BOS (SmolLM2) the windows are exactly the guide's.

Numerics: the head runs on slices of positions (never a whole (T, vocab) matrix: Gemma 3's
262144-entry vocabulary would make that 1 GiB for a 1024-token window), log_softmax in
float32, and the negative log-likelihoods are summed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmrun.errors import LlmrunError

# Logits of at most this many (position, vocab) entries exist at once: 32 Mi floats = 128 MiB.
HEAD_CHUNK_ELEMENTS = 32 * 2**20


@dataclass(frozen=True)
class Window:
    """Tokens begin..end-1 of the text's token stream (after a BOS where the model uses one);
    the window scores tokens first_target..end-1."""

    begin: int
    end: int
    first_target: int

    @property
    def targets(self) -> int:
        return self.end - self.first_target


@dataclass
class PerplexityResult:
    tokens: int  # scored tokens
    nll: float  # sum of their negative log-likelihoods, nats
    windows: int
    context: int
    stride: int
    bos_per_window: bool = False

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)


def check_window(context: int, stride: int | None, bos: bool = False) -> int:
    """Validate --context / --stride; returns the stride (default context // 2). With a BOS
    per window, a window holds context - 1 text tokens, and stride may not exceed that."""
    if context < 2:
        raise LlmrunError(f"--context {context} is too small: a window needs at least 2 tokens")
    if stride is None:
        return context // 2
    if stride < 1:
        raise LlmrunError(f"--stride {stride} must be >= 1")
    span = context - 1 if bos else context
    if stride > span:
        what = f"the window (--context {context}" + (", one slot of it BOS)" if bos else ")")
        raise LlmrunError(f"--stride {stride} is larger than {what}: tokens between windows "
                          "would never be scored")
    return stride


def windows(n_tokens: int, context: int, stride: int, bos: bool = False) -> list[Window]:
    """The windows over a stream of n_tokens tokens: transformers' sliding-window recipe, or,
    with `bos`, windows of BOS + context - 1 tokens whose first token is scored too."""
    stride = check_window(context, stride, bos)
    need = 1 if bos else 2
    if n_tokens < need:
        raise LlmrunError(f"the text has {n_tokens} token(s): perplexity needs at least {need}")
    span = context - 1 if bos else context
    first_offset = 0 if bos else 1  # without BOS a window's first token has no context
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + span, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + first_offset)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def window_input(ids: torch.Tensor, window: Window, bos_id: int | None = None) -> torch.Tensor:
    """The window's input ids (L,): its slice of the stream, after BOS where the model uses one."""
    idx = ids[window.begin:window.end]
    if bos_id is not None:
        idx = torch.cat([torch.tensor([bos_id], dtype=idx.dtype), idx])
    return idx


def score_window(logits_of: Callable[[int, int], torch.Tensor], ids: torch.Tensor, window: Window,
                 bos_id: int | None, vocab: int, head_chunk: int | None = None) -> float:
    """Sum of the NLLs (float64) of the window's targets, given logits_of(p0, p1): the float32
    logits (p1 - p0, vocab) of the window's input positions p0..p1-1."""
    # Position p predicts token p+1: targets first_target..end-1 come from the positions before.
    lo = window.first_target - window.begin - (0 if bos_id is not None else 1)
    targets = ids[window.first_target:window.end]
    chunk = head_chunk or max(1, HEAD_CHUNK_ELEMENTS // vocab)
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, targets.shape[0], chunk):
        part = targets[s:s + chunk]
        logprobs = torch.log_softmax(logits_of(lo + s, lo + s + part.shape[0]), dim=-1)  # (c, V) f32
        total -= logprobs.gather(-1, part[:, None]).double().sum()
    return float(total)


def cached_hidden(model, idx: torch.Tensor, cache) -> torch.Tensor:
    """idx (1, L) -> (L, dim) as generation computes it: prefill chunks through slot 0 of
    `cache` (a kv_cache.KVCache of >= L positions), each attending to what the earlier ones
    left there."""
    from llmrun.runtime.generator import PREFILL_CHUNK

    length = idx.shape[1]
    slot = torch.zeros(1, dtype=torch.long)
    chunks = [(lo, min(lo + PREFILL_CHUNK, length)) for lo in range(0, length, PREFILL_CHUNK)]
    return torch.cat([model.hidden(idx[:, lo:hi], torch.arange(lo, hi)[None], cache, slot)[0] for lo, hi in chunks])


def window_nll(model, ids: torch.Tensor, window: Window, bos_id: int | None = None,
               head_chunk: int | None = None, kv_dtype: torch.dtype | None = None) -> float:
    """Sum of the NLLs (float64) of the window's targets under a llmrun model. ids: (N,) the
    whole token stream; bos_id: put in front of the window; kv_dtype: through a KV cache of
    that dtype (cached_hidden), else one plain forward."""
    from llmrun.runtime.kv_cache import KVCache

    idx = window_input(ids, window, bos_id).unsqueeze(0)
    if kv_dtype is None:
        hidden = model.hidden(idx)[0]  # (L, dim)
    else:
        hidden = cached_hidden(model, idx, KVCache(model.config, 1, idx.shape[1], kv_dtype))
    return score_window(lambda p0, p1: model.head(hidden[p0:p1]), ids, window, bos_id,
                        model.config.vocab_size, head_chunk)


def perplexity(model, ids: list[int] | torch.Tensor, context: int, stride: int | None = None,
               bos_id: int | None = None, head_chunk: int | None = None,
               on_window: Callable[[Window, float], None] | None = None,
               kv_dtype: torch.dtype | None = None) -> PerplexityResult:
    """Perplexity of the token stream `ids` under `model` (a llmrun Transformer), windows of
    `context` positions `stride` apart (default context // 2). With bos_id, `ids` is the text
    without BOS and every window starts with BOS. kv_dtype: score through a KV cache of it."""
    with torch.inference_mode():
        return perplexity_of(lambda t, w: window_nll(model, t, w, bos_id, head_chunk, kv_dtype), ids, context,
                             stride, bos_id, on_window)


def perplexity_of(nll: Callable[[torch.Tensor, Window], float], ids: list[int] | torch.Tensor, context: int,
                  stride: int | None = None, bos_id: int | None = None,
                  on_window: Callable[[Window, float], None] | None = None) -> PerplexityResult:
    """perplexity() for any runtime: nll(ids (N,), window) -> the window's NLL sum (e.g. from
    score_window over another runtime's logits), over exactly the same windows."""
    stride = check_window(context, stride, bos_id is not None)
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    tokens, total, n = 0, 0.0, 0
    for w in windows(int(ids_t.shape[0]), context, stride, bos=bos_id is not None):
        w_nll = nll(ids_t, w)
        tokens, total, n = tokens + w.targets, total + w_nll, n + 1
        if on_window:
            on_window(w, w_nll)
    if not math.isfinite(total):
        raise LlmrunError("the model gave a non-finite log-likelihood (NaN/inf logits)")
    return PerplexityResult(tokens=tokens, nll=total, windows=n, context=context, stride=stride,
                            bos_per_window=bos_id is not None)


def text_ids(tokenizer, text: str) -> tuple[list[int], int | None]:
    """(token stream, bos_id or None) for perplexity(): the BOS that the tokenizer would put in
    front of the text is taken off the stream and put in front of every window instead."""
    ids = tokenizer.encode(text, add_bos=True)
    bos = getattr(tokenizer, "bos_id", None)
    if bos is not None and ids and ids[0] == bos and getattr(tokenizer, "add_bos_token", False):
        return ids[1:], bos
    return ids, None

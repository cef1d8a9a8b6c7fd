"""Perplexity of a text under a model, with Hugging Face's sliding-window recipe.

The token stream is cut into windows of `context` tokens whose starts are `stride` apart.
Every token after the first is scored exactly once: the first window scores all of its
tokens, each later window only the tokens past the end of the window before it, so a scored
token sees up to `context - stride` tokens of left context from the earlier windows (stride ==
context: disjoint windows, and the first token of each window is not scored). This is the
recipe of the transformers guide "Perplexity of fixed-length models"; tests/test_eval.py
checks the result against transformers' own loss on the same windows.

Numerics: the head runs on slices of positions (never a whole (T, vocab) matrix: Gemma 3's
262144-entry vocabulary would make that 1 GiB for a 1024-token window), log_softmax in
float32, and the negative log-likelihoods are summed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llmrun.errors import LlmrunError

# Logits of at most this many (position, vocab) entries exist at once: 32 Mi floats = 128 MiB.
HEAD_CHUNK_ELEMENTS = 32 * 2**20


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window (inclusive)
    end: int  # one past its last token
    first_target: int  # first token it scores; it scores tokens first_target .. end-1

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

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)


def check_window(context: int, stride: int | None) -> int:
    """Validate --context / --stride; returns the stride (default context // 2)."""
    if context < 2:
        raise LlmrunError(f"--context {context} is too small: a window needs at least 2 tokens")
    if stride is None:
        return max(1, context // 2)
    if stride < 1:
        raise LlmrunError(f"--stride {stride} must be >= 1")
    if stride > context:
        raise LlmrunError(f"--stride {stride} is larger than the window (--context {context}): "
                          "tokens between windows would never be scored")
    return stride


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows over n_tokens tokens, as in transformers' sliding-window recipe."""
    stride = check_window(context, stride)
    if n_tokens < 2:
        raise LlmrunError(f"the text has {n_tokens} token(s): perplexity needs at least 2")
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


class _StopForward(Exception):
    pass


def final_hidden(model, idx: torch.Tensor) -> torch.Tensor:
    """The final-norm output (B, T, dim) of a plain full-sequence forward, without running
    the output head (the forward stops at the final norm)."""
    captured = []

    def hook(module, inputs, output):
        captured.append(output)
        raise _StopForward

    handle = model.model.norm.register_forward_hook(hook)
    try:
        model(idx)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the model's forward never reached its final norm")
    return captured[0]


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits for hidden states (..., dim), as Transformer.forward computes them."""
    logits = model.lm_head(hidden).float()
    softcap = model.config.final_softcap
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def window_nll(model, ids: torch.Tensor, window: Window, head_chunk: int | None = None) -> float:
    """Sum of the NLLs (float64) of the window's targets. ids: (N,) the whole token stream."""
    idx = ids[window.begin:window.end].unsqueeze(0)  # (1, L)
    hidden = final_hidden(model, idx)[0]  # (L, dim)
    # Position p predicts token p+1: targets first_target..end-1 come from the positions before.
    lo = window.first_target - window.begin - 1
    hidden = hidden[lo:lo + window.targets]  # (targets, dim)
    targets = ids[window.first_target:window.end]
    vocab = model.config.vocab_size
    chunk = head_chunk or max(1, HEAD_CHUNK_ELEMENTS // vocab)
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, targets.shape[0], chunk):
        logprobs = torch.log_softmax(head_logits(model, hidden[s:s + chunk]), dim=-1)  # (c, V) f32
        picked = logprobs.gather(-1, targets[s:s + chunk, None])  # (c, 1)
        total -= picked.double().sum()
    return float(total)


def iter_perplexity(model, ids: list[int] | torch.Tensor, context: int, stride: int,
                    head_chunk: int | None = None) -> Iterator[tuple[Window, float]]:
    """(window, its NLL sum) for each window, in order."""
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    spans = windows(int(ids_t.shape[0]), context, stride)
    with torch.inference_mode():
        for w in spans:
            yield w, window_nll(model, ids_t, w, head_chunk)


def perplexity(model, ids: list[int] | torch.Tensor, context: int, stride: int | None = None,
               head_chunk: int | None = None,
               on_window: Callable[[Window, float], None] | None = None) -> PerplexityResult:
    """Perplexity of the token stream `ids` under `model` (a llmrun Transformer without KV
    caches), windows of `context` tokens `stride` apart (default context // 2)."""
    stride = check_window(context, stride)
    tokens, nll, n = 0, 0.0, 0
    for w, w_nll in iter_perplexity(model, ids, context, stride, head_chunk):
        tokens, nll, n = tokens + w.targets, nll + w_nll, n + 1
        if on_window:
            on_window(w, w_nll)
    if not math.isfinite(nll):
        raise LlmrunError("the model gave a non-finite log-likelihood (NaN/inf logits)")
    return PerplexityResult(tokens=tokens, nll=nll, windows=n, context=context, stride=stride)

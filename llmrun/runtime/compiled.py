"""torch.compile for the generator's two steps.

- decode: fullgraph, static shapes (one token per sequence, a fixed-size KV cache written by
  index), so the graph never recompiles as positions advance; a new cache size (a power of two,
  see generator.cache_length) or batch size (one of generator.DECODE_BATCH_SIZES) compiles once
  more.
- prefill: fullgraph with a dynamic sequence length, so a new prompt length does not
  recompile; long prompts come in chunks of generator.PREFILL_CHUNK.
Compiled artifacts persist in inductor's FX graph cache under llmrun's cache directory, so a
second process skips the C++ compilation."""

from __future__ import annotations

import weakref

import torch

from llmrun.runtime.generator import DECODE_BATCH_SIZES, decode_one, prefill


def configure_inductor() -> None:
    # TORCHINDUCTOR_CACHE_DIR is set when llmrun is imported (llmrun/__init__.py)
    import logging

    import torch._inductor.config as inductor_config

    # A corrupt cache entry is skipped and recompiled by inductor itself; its log line would
    # show the user a traceback for a problem that is already handled.
    logging.getLogger("torch._inductor.codecache").setLevel(logging.ERROR)

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True


class CompiledSteps:
    """prefill_fn / decode_fn for a Generator or a Scheduler, compiled; one instance for each."""

    def __init__(self):
        configure_inductor()
        self.batch_sizes = DECODE_BATCH_SIZES
        self._decode = torch.compile(decode_one, fullgraph=True, dynamic=False)
        self._prefill = torch.compile(prefill, fullgraph=True, dynamic=None)
        self._checked = lambda: None  # (a weak reference to) the cache decode last ran guards on

    def decode(self, model, cache, token: torch.Tensor, input_pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        # token: (B, 1), input_pos: (B, 1), slots: (B,). Once a cache has run with full guard
        # checks (compiling it if new), later steps skip re-checking guards that cannot differ
        # between steps: measured +5% decode t/s on SmolLM2 (guard checks cost ~0.3 ms/token).
        if self._checked() is cache:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._decode(model, cache, token, input_pos, slots)
        logits = self._decode(model, cache, token, input_pos, slots)
        self._checked = weakref.ref(cache)
        return logits

    def prefill(self, model, cache, ids: torch.Tensor, input_pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        # ids: (1, T), input_pos: (1, T); T varies from prompt to prompt: keep it symbolic
        torch._dynamo.maybe_mark_dynamic(ids, 1)
        torch._dynamo.maybe_mark_dynamic(input_pos, 1)
        return self._prefill(model, cache, ids, input_pos, slots)


"""Model families, one module each: everything that sets a family apart from the shared
transformer (llmrun.models.layers) lives in its module, and no other file names a family.
Adding a family is adding a module here; `all_families` finds it.

A family module holds:

- `MODEL_TYPES`: the config.json `model_type` values it reads;
- `GGUF_ARCHS`: the GGUF `general.architecture` values it reads;
- `config_from_hf(d: dict) -> ModelConfig`: from a config.json dict (helpers: models.hf_config);
- `config_from_gguf(meta: GGUFMetadata) -> ModelConfig` (helpers: models.gguf_config);
- `hf_tensors(name, tensor, cfg)`: a checkpoint tensor -> the (model name, tensor) pairs it holds
  (renamed, split or dropped), like mlx-lm's `sanitize`;
- `gguf_tensors(name, tensor, cfg)`: the same for a GGUF tensor (helpers: models.gguf_names);
- `GGUF_CONTROL_TOKENS`: user-defined tokens of its GGUF files that are control tokens;
- `CHAT_TEMPLATE`: the chat template for its files that carry none (llama.cpp's built-in
  format for the family), or None."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from types import ModuleType


@functools.cache
def all_families() -> tuple[ModuleType, ...]:
    return tuple(importlib.import_module(f"{__name__}.{info.name}")
                 for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name))

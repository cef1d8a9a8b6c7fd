"""Architectures. The family comes from config.json `model_type` or GGUF
`general.architecture`, never from a path."""

from __future__ import annotations

from types import ModuleType

import torch

from llmrun.errors import LlmrunError
from llmrun.models.config import ModelConfig, RopeSpec
from llmrun.models.families import all_families
from llmrun.models.layers import Transformer


def family_for_model_type(model_type: str | None) -> ModuleType:
    for fam in all_families():
        if model_type in fam.MODEL_TYPES:
            return fam
    known = ", ".join(t for fam in all_families() for t in fam.MODEL_TYPES)
    raise LlmrunError(f"unsupported architecture model_type={model_type!r} (supported: {known})")


def family_for_gguf_arch(arch: str | None) -> ModuleType:
    for fam in all_families():
        if arch in fam.GGUF_ARCHS:
            return fam
    known = ", ".join(a for fam in all_families() for a in fam.GGUF_ARCHS)
    raise LlmrunError(f"unsupported GGUF architecture {arch!r} (supported: {known})")


def config_from_hf(d: dict) -> ModelConfig:
    return family_for_model_type(d.get("model_type")).config_from_hf(d)


def build_on_meta(cfg: ModelConfig) -> Transformer:
    """The model with no storage: weights are assigned by the loader."""
    with torch.device("meta"):
        return Transformer(cfg)


__all__ = ["ModelConfig", "RopeSpec", "Transformer", "config_from_hf", "build_on_meta",
           "family_for_model_type", "family_for_gguf_arch"]

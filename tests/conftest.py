"""Shared fixtures: the two shipped real models, loaded once per session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_path():
    from llmrun.shipped import shipped_models

    return shipped_models()["smollm2-135m"].path()


@pytest.fixture(scope="session")
def gemma3_path():
    from llmrun.shipped import shipped_models

    return shipped_models()["gemma3-270m"].path()


def _load_pair(path):
    """(llmrun model, llmrun tokenizer, transformers model) for a GGUF file, fp32."""
    transformers = pytest.importorskip("transformers")
    from llmrun.loader import load_model, open_checkpoint
    from llmrun.tokenizer import Tokenizer

    ours = load_model(open_checkpoint(path, "gguf"), torch.float32)
    tok = Tokenizer.from_gguf(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32)
    hf.eval()
    return ours, tok, hf


@pytest.fixture(scope="session")
def smollm2_pair(smollm2_path):
    return _load_pair(smollm2_path)


@pytest.fixture(scope="session")
def gemma3_pair(gemma3_path):
    return _load_pair(gemma3_path)

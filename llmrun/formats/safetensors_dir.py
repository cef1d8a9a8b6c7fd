"""Hugging Face directories: config.json + *.safetensors (single or sharded), read with
safetensors' mmap. Pickle checkpoints (*.bin, *.pt) are refused, never loaded."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from safetensors import SafetensorError, safe_open

from llmrun.errors import LlmrunError
from llmrun.models import ModelConfig, family_for_model_type


def _family_and_config(directory: Path) -> tuple[ModuleType, ModelConfig]:
    path = directory / "config.json"
    if not path.is_file():
        raise LlmrunError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LlmrunError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise LlmrunError(f"{path} does not hold a JSON object")
    try:
        family = family_for_model_type(raw.get("model_type"))
        return family, family.config_from_hf(raw)
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as exc:
        raise LlmrunError(f"{path} has an invalid value: {exc}") from None


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise LlmrunError(f"{index} is not a valid safetensors index ({exc})") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise LlmrunError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise LlmrunError(
            f"{directory} holds only pickle checkpoints ({', '.join(pickles[:3])}); llmrun never "
            "loads pickle: convert them to safetensors first"
        )
    raise LlmrunError(f"{directory} has no weights: expected model.safetensors or sharded "
                      "model-*.safetensors with model.safetensors.index.json")


def open_dir(directory: Path) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """(config, the tensors named as the model names them), every weight file checked first."""
    family, cfg = _family_and_config(directory)
    files = weight_files(directory)
    for file in files:
        with _opened(file) as f:
            f.keys()
    return cfg, _tensor_stream(files, family, cfg)


def _tensor_stream(files: list[Path], family: ModuleType, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with _opened(file) as f:
            for name in f.keys():
                yield from family.hf_tensors(name, f.get_tensor(name), cfg)


@contextlib.contextmanager
def _opened(file: Path):
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise LlmrunError(f"cannot read {file}: {exc} (the file is truncated or corrupt; "
                          "download it again)") from None

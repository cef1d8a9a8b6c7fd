"""GGUF files (read by gguf_reader.py, dequantized by the `gguf` package): config from the
metadata and tensors dequantized to float32 (or kept in their block format), both handed to
the file's family (models.families), which names them as the model does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llmrun.errors import LlmrunError
from llmrun.formats import gguf_blocks
from llmrun.kernels.blocks import BlockWeight
from llmrun.models import ModelConfig, family_for_gguf_arch
from llmrun.models.gguf_config import GGUFMetadata

SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K"}


def open_reader(path: Path):
    """The GGUF file at `path` (gguf_reader.GGUFFile: metadata, tensors mapped)."""
    from .gguf_reader import open_gguf

    return open_gguf(path)


def read_config(reader) -> ModelConfig:
    try:
        return _read_config(reader)
    except LlmrunError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        raise LlmrunError(f"GGUF metadata is invalid ({type(exc).__name__}: {exc}); the file is "
                          "corrupt or its architecture's keys are not llama.cpp's") from None


def _read_config(reader) -> ModelConfig:
    rope_factors = {t.name.rpartition(".")[0]: tuple(float(v) for v in dequantize(t).reshape(-1))
                    for t in reader.tensors if t.name.startswith("rope_")}
    meta = GGUFMetadata(reader.metadata, [t.name for t in reader.tensors], rope_factors)
    return family_for_gguf_arch(meta.arch).config_from_gguf(meta)


def dequantize(t) -> torch.Tensor:
    from gguf import quants

    qtype = t.tensor_type.name
    if qtype not in SUPPORTED_TYPES:
        raise LlmrunError(f"GGUF tensor {t.name!r} has quantization type {qtype}, which llmrun "
                          f"cannot read (supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    shape = [int(d) for d in reversed(t.shape.tolist())]
    data = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    if not data.flags.writeable:  # F32 tensors are views of the read-only memory map
        data = data.copy()
    return torch.from_numpy(np.ascontiguousarray(data).reshape(shape))


def read_tensor(t, keep_blocks: bool) -> torch.Tensor | BlockWeight:
    """A GGUF tensor as float32, or (keep_blocks, a 2-D tensor of a block format llmrun runs as
    shipped) as its exact codes and scales."""
    shape = [int(d) for d in reversed(t.shape.tolist())]
    if keep_blocks and len(shape) == 2 and t.tensor_type.name in gguf_blocks.SHIPPED_TYPES:
        return gguf_blocks.decode(t.data, t.tensor_type.name, (shape[0], shape[1]))
    return dequantize(t)


def shipped_types(reader) -> list[str]:
    """The block formats of the file's 2-D tensors that run as shipped, most bytes first."""
    size: dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) == 2 and t.tensor_type.name in gguf_blocks.SHIPPED_TYPES:
            size[t.tensor_type.name] = size.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return sorted(size, key=size.get, reverse=True)


def tensor_stream(reader, cfg: ModelConfig, path: Path,
                  keep_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | BlockWeight]]:
    family = family_for_gguf_arch(reader.metadata.get("general.architecture"))
    for t in reader.tensors:
        try:
            w = read_tensor(t, keep_blocks)
        except LlmrunError:
            raise
        except Exception as exc:  # numpy/gguf raise many types on malformed data
            raise LlmrunError(f"{path}: tensor {t.name!r} cannot be read ({exc}); the file is "
                              "truncated or corrupt") from None
        yield from family.gguf_tensors(t.name, w, cfg)

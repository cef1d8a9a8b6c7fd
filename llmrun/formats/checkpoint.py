"""Checkpoint -> model: build on the meta device, then assign tensors one at a time as the
reader streams them (converted to the compute dtype, optionally replaced by a quantized
module as soon as a layer's weights are complete). No second full copy in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmrun.errors import LlmrunError
from llmrun.kernels.blocks import BlockWeight
from llmrun.models import ModelConfig, Transformer, build_on_meta
from llmrun.runtime.memory import release_free_heap

# (qualified module name, loaded module, its block-quantized weights by leaf name) -> module to
# use instead (e.g. a quantized linear). A leaf whose weight arrived block-quantized (a GGUF
# tensor kept as shipped) is a meta tensor in the loaded module: the transform builds from the blocks.
ModuleTransform = Callable[[str, nn.Module, dict[str, BlockWeight]], nn.Module]
# (stage, done, total)
ProgressFn = Callable[[str, int, int], None]


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: Iterator[tuple[str, torch.Tensor]]  # named as the model names them
    path: Path


def open_checkpoint(path: Path, kind: str, keep_blocks: bool = False) -> Checkpoint:
    """keep_blocks: GGUF tensors of the block formats llmrun runs as shipped arrive as
    BlockWeight (exact codes and scales) instead of dequantized float32."""
    if kind == "gguf":
        from llmrun.formats import gguf_file

        reader = gguf_file.open_reader(path)
        cfg = gguf_file.read_config(reader)
        return Checkpoint(cfg, gguf_file.tensor_stream(reader, cfg, path, keep_blocks), path)
    from llmrun.formats import safetensors_dir

    cfg, tensors = safetensors_dir.open_dir(path)
    return Checkpoint(cfg, tensors, path)


def load_model(ckpt: Checkpoint, dtype: torch.dtype, transform: ModuleTransform | None = None,
               progress: ProgressFn | None = None) -> Transformer:
    model = build_on_meta(ckpt.config)
    expected = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    pending = {name: sum(1 for _ in mod.parameters(recurse=False)) for name, mod in modules.items()}
    seen: set[str] = set()
    blocks: dict[str, dict[str, BlockWeight]] = {}  # module name -> leaf -> block weights
    tied = ckpt.config.tie_embeddings
    for name, tensor in ckpt.tensors:
        if name == "lm_head.weight" and tied:
            continue  # tied heads read the embedding table
        if name not in expected:
            raise LlmrunError(f"{ckpt.path}: unexpected tensor {name!r} for a "
                              f"{ckpt.config.family} model (the checkpoint does not match its config)")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LlmrunError(f"{ckpt.path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                              f"config.json implies {tuple(expected[name].shape)}")
        module_name, _, leaf = name.rpartition(".")
        module = modules[module_name]
        if isinstance(tensor, BlockWeight) and transform is None:
            tensor = tensor.dequantize()
        if isinstance(tensor, BlockWeight):
            blocks.setdefault(module_name, {})[leaf] = tensor
            tensor = torch.empty(tensor.shape, device="meta")
        elif not tensor.is_floating_point():
            raise LlmrunError(f"{ckpt.path}: tensor {name!r} has dtype {tensor.dtype}; "
                              "expected floating point weights")
        module._parameters[leaf] = nn.Parameter(tensor.to(dtype).contiguous(), requires_grad=False)
        seen.add(name)
        pending[module_name] -= 1
        if name == "model.embed_tokens.weight" and tied:
            model.lm_head.weight = module.weight  # the head reads the same table
            seen.add("lm_head.weight")
        if progress:
            progress("load", len(seen), len(expected))
        if pending[module_name] == 0 and transform is not None and not (tied and module_name == "model.embed_tokens"):
            _transform(ckpt, model, modules, module_name, transform, blocks.pop(module_name, {}))
    if tied and transform is not None and "model.embed_tokens.weight" in seen:
        # last, the largest layer to quantize (its table stays loaded until then): the tied head,
        # then the embedding, which may read the head's table
        own = blocks.pop("model.embed_tokens", {})
        _replace(model, modules, "lm_head", transform("lm_head", model.lm_head, own))
        _transform(ckpt, model, modules, "model.embed_tokens", transform, own)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise LlmrunError(f"{ckpt.path}: missing tensors {shown} (the checkpoint is incomplete)")
    model.eval()
    return model


def _transform(ckpt: Checkpoint, model: nn.Module, modules: dict, name: str, transform: ModuleTransform,
               own: dict[str, BlockWeight]) -> None:
    """Module `name`, all its parameters loaded, replaced by what `transform` makes of it."""
    replaced = _replace(model, modules, name, transform(name, modules[name], own))
    if own and not replaced:
        raise LlmrunError(f"{ckpt.path}: {name} holds block-quantized weights that the quantization "
                          "scheme cannot take")
    if replaced:
        release_free_heap()  # the float weights and packing intermediates just freed


def _replace(model: nn.Module, modules: dict, name: str, new: nn.Module) -> bool:
    """Put `new` in the place of module `name`; False when it is the module already there."""
    if new is modules[name]:
        return False
    parent_name, _, child = name.rpartition(".")
    setattr(modules[parent_name] if parent_name else model, child, new)
    modules[name] = new
    return True


"""A quantized model as it runs on this machine, kept so that a later run maps it instead of
repacking it: the kernels' private layouts (x86 panels), the fused projections, every tensor
the forward reads. Machine-specific and never user-facing (the saved format a user keeps is
llmrun's neutral quantized directory, formats.quantized_dir): one entry per quantized
directory, dtype and kernel backend, under llmrun's cache dir, holding

  prepared.json       {"format", "key", "model_config", "scheme", "modules": {path: record}}
  model.safetensors   every tensor of the model as it runs, by its module path
  tokenizer files     as formats.quantized_dir writes them

The key (torch's version, llmrun's source, the quantized directory's identity) must match,
else the entry is rebuilt in place. Tensors are read with safetensors' memory map: a load
copies nothing, and the pages are the page cache's, shared by every process that runs the
model.

A module record holds the module's type (one of _runtime_modules(): no other class is ever
made from a file), its plain attributes as JSON, and its parameters and buffers (persistent or
not) in the module's own order. Modules of the model itself (blocks, attention, norms) are built
from the config as always; only their tensors come from the file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llmrun.errors import LlmrunError

FORMAT = "llmrun-prepared-v1"
_MODULE_STATE = frozenset(vars(nn.Module()))  # what every nn.Module holds: not the module's own attributes


def _runtime_modules() -> dict[str, type]:
    from llmrun.kernels import Int4Linear, Int8Linear, RescoredLinear
    from llmrun.kernels.block_linear import BlockLinear
    from llmrun.quant.transform import BlockEmbedding, Int8Embedding, TiedEmbedding

    return {cls.__name__: cls for cls in (Int4Linear, Int8Linear, BlockLinear, RescoredLinear, BlockEmbedding,
                                          Int8Embedding, TiedEmbedding)}


class NotPreparable(Exception):
    """A model holds something this format does not record: it runs, uncached."""


def entry_key(quantized: Path, dtype: torch.dtype) -> str:
    """What an entry's contents depend on: torch, llmrun's code, the quantized directory."""
    from llmrun.cache_dir import source_digest

    weights = quantized / "model.safetensors"
    stat = weights.stat()
    ident = [FORMAT, torch.__version__, source_digest(), str(quantized.resolve()), str(dtype),
             f"{stat.st_size}:{stat.st_mtime_ns}"]
    return hashlib.sha256("\n".join(ident).encode()).hexdigest()[:32]


def entry_path(quantized: Path, dtype: torch.dtype, backend: str) -> Path:
    """The one entry of a quantized directory for a dtype and kernel backend."""
    from llmrun.cache_dir import llmrun_cache_dir

    where = hashlib.sha256(str(quantized.resolve()).encode()).hexdigest()[:12]
    return llmrun_cache_dir() / "prepared" / f"{quantized.name}-{where}-{str(dtype).removeprefix('torch.')}-{backend}"


def is_current(directory: Path, key: str) -> bool:
    try:
        return json.loads((directory / "prepared.json").read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------- writing

def _encode(value, paths: dict[int, str]):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, list):
        return [_encode(v, paths) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, paths) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, nn.Module) and id(value) in paths:
        return {"module": paths[id(value)]}
    raise NotPreparable(f"an attribute of type {type(value).__name__}")


def _row_major(shape) -> tuple[int, ...]:
    """The strides safetensors gives a tensor of `shape` back with."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _record(module: nn.Module, paths: dict[int, str]) -> dict:
    # tensors in the module's own order: a compiled package's key lists them in it (runtime.aot)
    return {"type": type(module).__name__,
            "attrs": {k: _encode(v, paths) for k, v in vars(module).items() if k not in _MODULE_STATE},
            "parameters": [k for k, v in module._parameters.items() if v is not None],
            "buffers": [[k, k not in module._non_persistent_buffers_set] for k, v in module._buffers.items()
                        if v is not None]}


def save_prepared(model: nn.Module, tokenizer, scheme: dict, out: Path, key: str) -> None:
    """Write `model` as it runs to `out` (a temporary sibling, then renamed over any older
    entry: a reader never sees half an entry). NotPreparable if it holds what this format
    does not record."""
    from llmrun.formats.quantized_dir import config_to_dict
    from llmrun.tokenizer.files import save_tokenizer

    kinds = _runtime_modules()
    paths = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    records = {name: _record(m, paths) for name, m in model.named_modules() if type(m).__name__ in kinds
               and kinds[type(m).__name__] is type(m)}
    tensors, strides = {}, {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach()
        whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        tensors[name] = t if whole else t.clone()  # safetensors stores no views of shared memory
        if tensors[name].stride() != _row_major(t.shape):
            strides[name] = list(tensors[name].stride())  # a size-1 dim's: compiled packages are keyed by it
    if any(t.is_meta for t in tensors.values()):
        raise NotPreparable("a tensor on the meta device")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, tmp / "model.safetensors")
        save_tokenizer(tokenizer, tmp)
        meta = {"format": FORMAT, "key": key, "model_config": config_to_dict(model.config), "scheme": scheme,
                "modules": records, "strides": strides}
        (tmp / "prepared.json").write_text(json.dumps(meta))
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, backup / "entry")
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- reading

def _decode(value, modules: dict[str, nn.Module]):
    if isinstance(value, list):
        return [_decode(v, modules) for v in value]
    if isinstance(value, dict):
        if "tuple" in value:
            return tuple(_decode(v, modules) for v in value["tuple"])
        if "dtype" in value:
            return getattr(torch, value["dtype"])
        return modules[value["module"]]
    return value


def _thaw(record: dict, prefix: str, tensor) -> nn.Module:
    """A module of a recorded type, without its constructor: its attributes and tensors as they
    were when it ran (attributes that name modules are set once all modules exist)."""
    kinds = _runtime_modules()
    cls = kinds.get(record["type"])
    if cls is None:
        raise LlmrunError(f"a prepared module of unknown type {record['type']!r}")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for leaf in record["parameters"]:
        module._parameters[leaf] = nn.Parameter(tensor(f"{prefix}.{leaf}"), requires_grad=False)
    for leaf, persistent in record["buffers"]:
        module.register_buffer(leaf, tensor(f"{prefix}.{leaf}"), persistent=persistent)
    return module


def load_prepared(directory: Path) -> tuple[nn.Module, object, dict]:
    """(model, tokenizer, scheme dict) of a prepared entry; its tensors memory-mapped."""
    from llmrun.formats.quantized_dir import config_from_dict
    from llmrun.models import build_on_meta
    from llmrun.models.layers import fuse_projections
    from llmrun.tokenizer import Tokenizer

    meta = json.loads((directory / "prepared.json").read_text())
    if meta.get("format") != FORMAT:
        raise LlmrunError(f"{directory} is not a prepared model of this llmrun")
    model = build_on_meta(config_from_dict(meta["model_config"]))
    records: dict[str, dict] = meta["modules"]
    file = directory / "model.safetensors"
    try:
        f = safe_open(file, framework="pt")
    except Exception as exc:  # noqa: BLE001 - safetensors' own errors: truncated, not safetensors
        raise LlmrunError(f"cannot read {file}: {exc}") from None
    with f:
        keys = set(f.keys())
        used = set()

        def tensor(name: str) -> torch.Tensor:
            if name not in keys:
                raise LlmrunError(f"{file} lacks tensor {name!r}")
            used.add(name)
            t = f.get_tensor(name)
            return t.as_strided(t.shape, meta["strides"][name]) if name in meta["strides"] else t

        thawed = {path: _thaw(rec, path, tensor) for path, rec in records.items()}
        for path, rec in records.items():  # attributes, now that every module they name exists
            thawed[path].__dict__.update({k: _decode(v, thawed) for k, v in rec["attrs"].items()})
        placed = set()
        for path, module in thawed.items():  # a recorded module inside another is its child
            parent, _, leaf = path.rpartition(".")
            if parent in thawed:
                thawed[parent]._modules[leaf] = module
                placed.add(path)

        def fused(parts, path):
            placed.add(path)
            return thawed.get(path)

        fuse_projections(model, fused)  # the model fuses its own projections where the entry did
        for path, module in thawed.items():
            if path not in placed:
                parent, _, leaf = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, module)
        for name, module in model.named_modules():  # the model's own tensors: norms, rope tables
            if name in thawed:
                continue
            for leaf, t in list(module._parameters.items()):
                if t is not None:
                    module._parameters[leaf] = nn.Parameter(tensor(f"{name}.{leaf}" if name else leaf),
                                                            requires_grad=False)
            for leaf, t in list(module._buffers.items()):
                if t is not None:
                    module._buffers[leaf] = tensor(f"{name}.{leaf}" if name else leaf)
    if keys - used:
        raise LlmrunError(f"{file} holds tensors no module takes ({', '.join(sorted(keys - used)[:3])})")
    model.eval()
    return model, Tokenizer.from_hf_dir(directory), meta["scheme"]

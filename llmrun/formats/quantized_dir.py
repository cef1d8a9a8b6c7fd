"""The saved form of a quantized model: a directory with
  config.json         {"llmrun": {"format": ..., "model_config": ModelConfig fields}}
  model.safetensors   neutral packed tensors: X.qweight uint8 [N, ceil(K/2)] + X.scales
                      float32 [N, n_groups] for int4 layers, X.qweight int8 [N, K] + X.scales
                      [N] for int8 ones; block-quantized layers (a GGUF's formats as shipped,
                      llmrun.kernels.blocks; llmrun's asymmetric int4, a rescored
                      head's asymmetric scan) as X.codes uint8 + X.scales float32 [N, G] (+
                      X.offsets float32 [N, G] when asymmetric) + X.layout int32 [code bits,
                      group size]; plain float tensors for the rest; the scheme is in the
                      safetensors metadata too
  tokenizer files     as Hugging Face writes them
The machine-specific kernel layout is made at load time, never saved."""

from __future__ import annotations

import dataclasses
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
from llmrun.models import ModelConfig, RopeSpec, Transformer, build_on_meta
from llmrun.runtime.memory import release_free_heap

# v2: block-quantized layers; v3: a rescored head's scan may be block-quantized too. Older
# directories hold a subset of v3's tensors and read as v3; cache entries are keyed by the
# format (cache_path), so a cache written by an older llmrun is never read, but rebuilt.
FORMAT = "llmrun-quantized-v3"
READABLE_FORMATS = ("llmrun-quantized-v1", "llmrun-quantized-v2", FORMAT)


def config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    for key in ("rope", "rope_local"):
        if d.get(key) is not None:
            spec = dict(d[key])
            for factors in ("freq_factors", "long_freq_factors"):
                if spec.get(factors) is not None:
                    spec[factors] = tuple(spec[factors])
            d[key] = RopeSpec(**spec)
    d["layer_types"] = tuple(d.get("layer_types", ()))
    if "attention_bias" in d:  # written before q/k/v and o biases were told apart
        d["qkv_bias"] = d["o_bias"] = d.pop("attention_bias")
    try:
        return ModelConfig(**d)
    except TypeError as exc:
        raise LlmrunError(f"quantized model config is invalid ({exc})") from None


def is_quantized_dir(directory: Path) -> bool:
    path = directory / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("llmrun", {}).get("format") in READABLE_FORMATS
    except (OSError, ValueError, AttributeError):
        return False


def save_quantized(model: Transformer, tokenizer, scheme: dict, out: Path, force: bool = False) -> None:
    """Write to a temporary sibling directory, then rename: a failure (disk full, Ctrl-C)
    leaves any previous output intact and no half-written directory."""
    from llmrun.tokenizer.files import save_tokenizer

    out = out.resolve()
    if out.exists() and not force:
        raise LlmrunError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {name: value.contiguous() for name, value in model.state_dict().items()}
        if "lm_head.weight" in tensors and model.lm_head.weight is getattr(
                model.model.embed_tokens, "weight", None):
            del tensors["lm_head.weight"]  # tied: the embedding table is saved once
        if model.config.tie_embeddings and "lm_head.qweight" in tensors and "model.embed_tokens.qweight" in tensors:
            if torch.equal(tensors["lm_head.qweight"], tensors["model.embed_tokens.qweight"]):
                del tensors["lm_head.qweight"], tensors["lm_head.scales"]  # shared table
        metadata = {"format": FORMAT, **{k: str(v) for k, v in scheme.items()}}
        save_file(tensors, tmp / "model.safetensors", metadata=metadata)
        config = {"llmrun": {"format": FORMAT, "scheme": scheme,
                             "model_config": config_to_dict(model.config)}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_tokenizer(tokenizer, tmp)
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_quantized(directory: Path, dtype: torch.dtype, backend: str | None = None) -> Transformer:
    from llmrun.kernels import Int4Linear, Int8Linear, RescoredLinear
    from llmrun.kernels.block_linear import BlockLinear
    from llmrun.kernels.blocks import BlockWeight
    from llmrun.quant.transform import (RESCORE_GROUP, RESCORE_K, BlockEmbedding, Int8Embedding, TiedEmbedding,
                                        tied_table)

    meta = json.loads((directory / "config.json").read_text())["llmrun"]
    cfg = config_from_dict(meta["model_config"])
    file = directory / "model.safetensors"
    model = build_on_meta(cfg)
    modules = dict(model.named_modules())
    try:
        f = safe_open(file, framework="pt")
    except Exception as exc:
        raise LlmrunError(f"cannot read {file}: {exc} (truncated or corrupt; quantize again)") from None
    with f:
        keys = set(f.keys())
        used = set()

        def take(key):
            used.add(key)
            return f.get_tensor(key)

        def blocks(source: str, K: int) -> BlockWeight:
            try:
                layout = take(f"{source}.layout").reshape(-1).tolist()
                if len(layout) != 2:
                    raise ValueError(f"layout {layout} is not [code bits, group size]")
                offsets = take(f"{source}.offsets") if f"{source}.offsets" in keys else None
                return BlockWeight(take(f"{source}.codes"), int(layout[0]), int(layout[1]), take(f"{source}.scales"),
                                   offsets, K)
            except Exception as exc:  # noqa: BLE001 - missing or malformed tensors: one clear line
                raise LlmrunError(f"{file}: {source} is not a valid block-quantized layer "
                                  f"({type(exc).__name__}: {exc}); quantize again") from None

        def quantized(name: str, module: nn.Module, source: str, with_bias: bool = True,
                      group: int | None = None, rows: bool = False):
            # rows: a rescored head's exact table, kept in its neutral rows (RescoredLinear)
            bias = take(f"{name}.bias") if with_bias and f"{name}.bias" in keys else None
            if isinstance(module, nn.Embedding) and f"{source}.table.layout" in keys:
                return BlockEmbedding(blocks(f"{source}.table", module.embedding_dim), dtype)
            if f"{source}.layout" in keys:
                return BlockLinear.from_blocks(blocks(source, module.in_features), bias=bias,
                                               backend="reference" if rows else backend)
            q, s = take(f"{source}.qweight"), take(f"{source}.scales")
            if isinstance(module, nn.Embedding):
                return Int8Embedding(q, s, dtype)
            if q.dtype == torch.int8:
                return Int8Linear.from_neutral(q, s, bias=bias, backend="reference" if rows else None)
            if group is None:
                group = int(meta["scheme"]["group_size"]) if not name.endswith("lm_head") else int(
                    meta["scheme"].get("head_group_size", meta["scheme"]["group_size"]))
            return Int4Linear.from_neutral(q, s, group, module.in_features, bias=bias, backend=backend)

        def rescored(module: nn.Module) -> RescoredLinear:
            scan = quantized("lm_head", module, "lm_head.scan", with_bias=False, group=RESCORE_GROUP)
            exact = quantized("lm_head", module, "lm_head.exact", with_bias=False, rows=True)
            bias = take("lm_head.bias") if "lm_head.bias" in keys else None
            return RescoredLinear(scan, exact, RESCORE_K, bias)

        def load_module(name: str, module: nn.Module):
            if name == "lm_head" and {"lm_head.scan.qweight", "lm_head.scan.layout"} & keys:
                model.lm_head = rescored(module)
                return
            source = name
            if name == "lm_head" and cfg.tie_embeddings and not {"lm_head.qweight", "lm_head.layout"} & keys:
                source = "model.embed_tokens"
            stored = any(f"{source}.{leaf}" in keys for leaf in ("qweight", "layout", "table.layout"))
            if stored and isinstance(module, (nn.Linear, nn.Embedding)):
                new = quantized(name, module, source)
                parent, _, child = name.rpartition(".")
                setattr(modules[parent] if parent else model, child, new)
                release_free_heap()  # repacking intermediates
                return
            for leaf, param in list(module.named_parameters(recurse=False)):
                key = f"{name}.{leaf}"
                if key == "lm_head.weight" and key not in keys and cfg.tie_embeddings:
                    model.lm_head.weight = model.model.embed_tokens.weight
                    continue
                if key not in keys:
                    raise LlmrunError(f"{file} lacks tensor {key!r}: the quantized model is incomplete")
                module._parameters[leaf] = nn.Parameter(take(key).to(dtype), requires_grad=False)

        tied = cfg.tie_embeddings and "lm_head.weight" not in keys
        for name, module in list(modules.items()):
            if not (tied and name == "model.embed_tokens"):  # a tied embedding follows its head
                load_module(name, module)
        if tied and (table := tied_table(model.lm_head)) is not None:  # one table: the head's
            model.model.embed_tokens = TiedEmbedding(table, dtype)
            used.update(k for k in keys if k.startswith("model.embed_tokens."))
        elif tied:
            load_module("model.embed_tokens", modules["model.embed_tokens"])
            if isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.is_meta:
                model.lm_head.weight = model.model.embed_tokens.weight
    extra = keys - used
    if extra:
        raise LlmrunError(f"{file} holds unexpected tensors ({', '.join(sorted(extra)[:3])})")
    model.eval()
    return model


def read_scheme(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())["llmrun"]["scheme"]


def cache_path(source: Path, quant: str, group_size: int, head: str = "int8", weights: str = "int4",
               int4: str = "asymmetric") -> Path:
    """Where the quantized form of `source` is cached: keyed by the source's path, size and
    mtime (so a changed file is quantized again), the scheme and this format's version."""
    import hashlib

    from llmrun.cache_dir import llmrun_cache_dir

    files = [source] if source.is_file() else sorted(source.glob("*.safetensors"))
    ident = [str(source.resolve()), FORMAT, quant, str(group_size), weights, int4] + (
        [] if head == "int8" else [head])
    ident += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    key = hashlib.sha256("\n".join(ident).encode()).hexdigest()[:16]
    scheme = ("as-shipped" if weights == "as-shipped" else f"{quant}-g{group_size}-{int4}") + (
        "" if head == "int8" else f"-head{head}")
    return llmrun_cache_dir() / "quantized" / f"{source.name}-{scheme}-{key}"

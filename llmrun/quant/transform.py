"""Quantization as a module swap: as the loader completes each nn.Linear / nn.Embedding, the
transform returns its quantized replacement. Models never import this; kernels never see
a model. Schemes:
  as shipped     weights that arrive block-quantized (a GGUF file's Q4_0 ... Q8_0 tensors) run
                 with their own codes, scales and offsets (BlockLinear, BlockEmbedding)
  linear layers  float weights: int4 in groups, asymmetric (a scale and an offset per group,
                 BlockLinear; the default) or symmetric (Int4Linear); per output channel
                 (group_size 0) symmetric
  output head    its exact table (the file's as shipped, else int8 per channel); int4-rescored
                 (the CLI's default, schemes.DEFAULT_HEAD): an int4 g32 copy scores the
                 vocabulary and each row's top RESCORE_K are recomputed from the exact table,
                 kept in its neutral rows (RescoredLinear); int4 with the layers' scheme; or none
  embedding      as shipped, else int8 per row (rows are dequantized as they are read)
A tied head and the embedding share one exact table: the embedding reads its rows from the
head (TiedEmbedding), whatever layout the head's kernel keeps."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from llmrun.errors import LlmrunError
from llmrun.kernels import Int4Linear, Int8Linear, RescoredLinear, quantize_int4, quantize_int8
from llmrun.kernels.block_linear import BlockLinear
from llmrun.kernels.block_quant import quantize_int4_asymmetric
from llmrun.kernels.blocks import BlockWeight, concat_rows
from llmrun.quant.schemes import DEFAULT_INT4, GROUP_SIZES, HEAD_SCHEMES, INT4_KINDS
from llmrun.runtime.memory import release_free_heap

# The rescored head's int4 copy and how many outputs per row it hands to the exact table.
# Measured on Gemma 3 270M (1024 positions of alice29.txt, against the int8 head's perplexity
# 32.32): symmetric scan g32 + top 64 -> 32.88, top 256 -> 32.56, top 1024 -> 32.40; scan g64
# + top 256 -> 32.96, g128 -> 33.12, per channel + top 64 -> 34.03; the int4 g32 head alone
# 33.91. The int8 argmax was inside the scan's top 16 at every position (g32).
# The scan takes the int4 kind of the layers. Asymmetric: groups of 64 (an fp16 scale and
# offset per 64 weights: the 4.5 bits a weight of symmetric g32), which score the tail closer.
# Gemma 3 270M as shipped, 1024 tokens of alice29.txt (windows 512, stride 256; the dequantized
# fp32 model 21.254): symmetric g32 scan 21.485 (+1.09%), asymmetric g32 21.375, asymmetric g64
# 21.357 (+0.48%), the exact table alone 21.321. AVX2, the 262144 x 640 scan at M = 1: 5.8 ms
# either way (one thread), M = 8: 21.3 -> 19.2 ms.
RESCORE_GROUP, RESCORE_ASYMMETRIC_GROUP, RESCORE_K = 32, 64, 256


class Int8Embedding(nn.Module):
    """Embedding table stored int8 with one float32 scale per row."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("qweight", qweight)  # (vocab, dim) int8
        self.register_buffer("scales", scales.reshape(-1))  # (vocab,) float32
        self.dtype = dtype
        self.embedding_dim = qweight.shape[1]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.qweight).to(torch.float32)  # (..., dim)
        return (rows * self.scales[idx].unsqueeze(-1)).to(self.dtype)


def tied_table(head: nn.Module) -> nn.Module | None:
    """The table a tied embedding reads from this output head: an int8 or as-shipped head's
    own, a rescored head's exact layer; None for other heads."""
    if isinstance(head, RescoredLinear):
        return head.exact
    return head if isinstance(head, (Int8Linear, BlockLinear)) else None


class TiedEmbedding(nn.Module):
    """The embedding of a model whose output head is tied to it: rows come from the head's own
    table (Int8Linear.embed, BlockLinear.embed), so the table is stored once. The head is held
    as a plain reference, not a submodule: it stays registered once, as the model's lm_head."""

    def __init__(self, head: nn.Module, dtype: torch.dtype):
        super().__init__()
        self._head = (head,)
        self.dtype = dtype
        self.embedding_dim = head.in_features

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._head[0].embed(idx, self.dtype)  # (..., dim)


class BlockEmbedding(nn.Module):
    """An embedding table kept as shipped (block-quantized): rows are dequantized exactly as
    they are read."""

    def __init__(self, bw: BlockWeight, dtype: torch.dtype):
        super().__init__()
        self.table = BlockLinear.from_blocks(bw, backend="reference")  # neutral rows, no panels
        self.dtype = dtype
        self.embedding_dim = bw.in_features

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table.embed(idx, self.dtype)  # (..., dim)


def float_rows(weight: torch.Tensor, blocks: BlockWeight | None, rows: int = 4096):
    """A layer's float weight in slices of `rows` rows: block weights are dequantized one slice
    at a time (no float copy of a whole table)."""
    n = weight.shape[0] if blocks is None else blocks.out_features
    for n0 in range(0, n, rows):
        yield weight[n0:n0 + rows].detach() if blocks is None else blocks.rows(n0, n0 + rows).dequantize()


def int4_of(weight: torch.Tensor, blocks: BlockWeight | None, group_size: int):
    """quantize_int4 of a float weight, or of block weights, a slice of rows at a time."""
    parts = [quantize_int4(w, group_size) for w in float_rows(weight, blocks)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class QuantTransform:
    """Callable (module name, loaded module, its block weights) -> module, for
    llmrun.formats.checkpoint.load_model. Weights that arrive block-quantized (a GGUF file's, as shipped)
    run as they are (BlockLinear, BlockEmbedding, the head's exact table); float weights take
    the int4 scheme."""

    def __init__(self, group_size: int = 0, head: str = "int8", embedding: bool = True,
                 backend: str | None = None, int4: str = DEFAULT_INT4):
        if group_size not in GROUP_SIZES:
            raise LlmrunError(f"--group-size {group_size} is not supported: use 0 (per channel) or "
                              "32, 64, 128, 256")
        if head not in HEAD_SCHEMES:
            raise LlmrunError(f"head scheme {head!r} is not one of {', '.join(HEAD_SCHEMES)}")
        if int4 not in INT4_KINDS:
            raise LlmrunError(f"int4 kind {int4!r} is not one of {', '.join(INT4_KINDS)}")
        self.group_size, self.head, self.embedding, self.backend = group_size, head, embedding, backend
        # per output channel is symmetric: one group spans K, and int4_mm keeps one scale per row
        self.int4 = int4
        self.asymmetric = int4 == "asymmetric" and group_size > 0
        # A tied head and its embedding are the same Parameter, met twice. Entries are keyed by
        # its id and keep a weak reference to it: an id is reused once its object is freed (an
        # untied head's weight, freed when its layer is replaced, would otherwise hand its
        # table to the embedding).
        self._int8_cache: dict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor]] = {}  # int8 table, scales
        self._tables: dict[int, tuple[weakref.ref, nn.Module]] = {}  # the head's exact table

    def _int8(self, weight: torch.Tensor):
        """The int8 table and scales of `weight`, quantized once for a tied head and embedding."""
        cached = self._int8_cache.get(id(weight))
        if cached is None or cached[0]() is not weight:
            cached = (weakref.ref(weight), *quantize_int8(weight.detach()))
            self._int8_cache[id(weight)] = cached
        return cached[1], cached[2]

    def __call__(self, name: str, module: nn.Module, blocks: dict[str, BlockWeight] | None = None) -> nn.Module:
        bw = (blocks or {}).get("weight")
        if isinstance(module, nn.Embedding):
            return self._embedding(module, bw)
        if not isinstance(module, nn.Linear):
            return module
        bias = module.bias.detach() if module.bias is not None else None
        if name.endswith("lm_head") and self.head != "int4":
            return self._head(module, bw, bias)
        if bw is not None and not name.endswith("lm_head"):
            return BlockLinear.from_blocks(bw, bias=bias, backend=self.backend)
        return self._int4(module, bw, bias)

    def _int4(self, module: nn.Linear, bw: BlockWeight | None, bias: torch.Tensor | None) -> nn.Module:
        """llmrun's int4 of a layer: asymmetric groups (BlockLinear) or symmetric (Int4Linear)."""
        if self.asymmetric:
            parts = [quantize_int4_asymmetric(w, self.group_size) for w in float_rows(module.weight, bw)]
            return BlockLinear.from_blocks(concat_rows(parts), bias=bias, backend=self.backend)
        qweight, scales = int4_of(module.weight, bw, self.group_size)
        return Int4Linear.from_neutral(qweight, scales, self.group_size, module.in_features,
                                       bias=bias, backend=self.backend)

    def _embedding(self, module: nn.Embedding, bw: BlockWeight | None) -> nn.Module:
        ref, head = self._tables.pop(id(module.weight), (None, None))  # the loader transforms a tied head first
        if head is not None and ref() is module.weight:
            self._int8_cache.pop(id(module.weight), None)
            return TiedEmbedding(head, module.weight.dtype)
        if bw is not None:
            return BlockEmbedding(bw, module.weight.dtype)
        if not self.embedding:
            return module
        q, s = self._int8(module.weight)
        return Int8Embedding(q, s, module.weight.dtype)

    def _head(self, module: nn.Linear, bw: BlockWeight | None, bias: torch.Tensor | None) -> nn.Module:
        """The output head: its exact table (the file's as shipped, else int8), rescored by an
        int4 scan, or (head "none") float."""
        if self.head == "none":
            if bw is None:
                return module
            dtype = module.weight.dtype
            head = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
            head.weight = nn.Parameter(bw.dequantize().to(dtype), requires_grad=False)
            if bias is not None:
                head.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
            return head
        if self.head == "int8":  # the table's own kernel scores every output
            if bw is not None:
                exact = BlockLinear.from_blocks(bw, bias=bias, backend=self.backend)
            else:
                exact = Int8Linear.from_neutral(*self._int8(module.weight), bias=bias)
        elif bw is not None:  # rescored: the table keeps its rows (RescoredLinear)
            exact = BlockLinear.from_blocks(bw, backend="reference")
        else:
            exact = Int8Linear.from_neutral(*self._int8(module.weight), backend="reference")
        self._tables[id(module.weight)] = (weakref.ref(module.weight), exact)
        if self.head == "int8":
            return exact
        return RescoredLinear(self._scan(module, bw), exact, RESCORE_K, bias)

    def _scan(self, module: nn.Linear, bw: BlockWeight | None) -> nn.Module:
        """The rescored head's int4 copy, of the layers' int4 kind (see RESCORE_GROUP)."""
        if self.int4 == "asymmetric":
            parts = [quantize_int4_asymmetric(w, RESCORE_ASYMMETRIC_GROUP) for w in float_rows(module.weight, bw)]
            return BlockLinear.from_blocks(concat_rows(parts), backend=self.backend)
        qweight, scales = int4_of(module.weight, bw, RESCORE_GROUP)
        return Int4Linear.from_neutral(qweight, scales, RESCORE_GROUP, module.in_features, backend=self.backend)


def make_transform(quant: str, group_size: int, head: str = "int8", int4: str = DEFAULT_INT4) -> QuantTransform:
    if quant != "int4":
        raise LlmrunError(f"quantization {quant!r} is not supported (int4, none)")
    return QuantTransform(group_size, head=head, int4=int4)


def prepare_int4_model(model: nn.Module) -> None:
    """A quantized model as it runs: q/k/v and gate/up fused into one int4 call each, and the
    prefill attention's products in bf16 where the CPU has AVX512-BF16 (SmolLM2 pp512 ~2090 ->
    ~2250 t/s). Its layers multiply activations rounded to int8 already; the rounding adds
    little to that: perplexity over 8192 tokens, fp32 -> bf16 products, unquantized SmolLM2
    19.827 -> 19.835, int4 25.131 -> 25.211; unquantized Gemma 3 270M (2048 tokens) 17.713 ->
    17.716, int4 (8192) 26.546 -> 26.386 (docs/performance.md)."""
    from llmrun.models.layers import fuse_projections

    fuse_projections(model, fuse_quantized)
    model.eval()  # the fused layers too: they are new modules
    release_free_heap()  # the unfused layers' packed tensors
    configure_int4_model(model)


def configure_int4_model(model: nn.Module) -> None:
    """How a quantized model's attention runs, whether prepared here or read back prepared
    (formats.prepared_dir): see prepare_int4_model."""
    model.configure(bf16_dots=True)


def fuse_quantized(modules: list[nn.Module], path: str = "") -> nn.Module | None:
    """One layer for several that read the same input (for models.layers.fuse_projections,
    which names the fused layer's `path`):
    int4 layers stack their panels; block-quantized layers of one code width and group size
    fuse into one (symmetric parts take explicit offsets: the same weights). Others stay apart:
    widening 4-bit codes to 8 bits, or groups of 32 to 16, would double the bytes each token
    reads (llama.cpp's Q4_K_M: Q4_K q/k beside a Q6_K v)."""
    if all(isinstance(m, Int4Linear) for m in modules):
        release_free_heap()  # the layers fused before this one (an 8B model holds ~2 GB of them)
        return Int4Linear.concat(modules)
    if all(isinstance(m, BlockLinear) for m in modules) and len({(m.bits, m.group_size) for m in modules}) == 1:
        release_free_heap()
        return BlockLinear.concat(modules)
    return None

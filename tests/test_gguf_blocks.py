"""llmrun.formats.gguf_blocks: GGUF block bytes decoded to BlockWeight must dequantize to exactly
what gguf's own dequantize gives, bit for bit (compared as int32 views, so -0.0 != +0.0)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from llmrun.formats.gguf_blocks import SHIPPED_TYPES, decode

# Byte offsets of each type's fp16 fields (d, m, dmin) within a block.
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
               "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}

# The range each type's neutral codes must fall in.
CODE_RANGE = {"Q4_0": (0, 15), "Q4_1": (0, 15), "Q4_K": (0, 15), "Q5_0": (112, 143), "Q5_1": (0, 31),
              "Q5_K": (0, 31), "Q6_K": (96, 159), "Q8_0": (0, 255)}

# Finite fp16 values for the scale fields: zeros of both signs, negatives, the smallest
# subnormal, the largest magnitudes, and ordinary small scales.
FP16_VALUES = np.array([0.0, -0.0, 6e-8, -6e-8, 1e-5, 60000.0, -65504.0, 0.0123, -0.0456, 1.0, -3.5],
                       dtype=np.float16)


def assert_bitwise_equal(ours: torch.Tensor, theirs: np.ndarray):
    theirs = torch.from_numpy(np.ascontiguousarray(theirs, dtype=np.float32))
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    mismatch = ours.view(torch.int32) != theirs.view(torch.int32)
    assert not mismatch.any(), f"{int(mismatch.sum())} weights differ, first at {mismatch.nonzero()[0].tolist()}"


def synthetic(qtype: str, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """Random block bytes [rows, bytes per row] with every fp16 field drawn from FP16_VALUES."""
    rng = np.random.default_rng(seed)
    _, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    blocks = rng.integers(0, 256, size=(rows, blocks_per_row, block_bytes), dtype=np.uint8)
    for at in FP16_FIELDS[qtype]:
        values = rng.choice(FP16_VALUES, size=(rows, blocks_per_row))
        blocks[..., at:at + 2] = values.astype("<f2").view(np.uint8).reshape(rows, blocks_per_row, 2)
    data = blocks.reshape(rows, -1)
    data.setflags(write=False)  # as GGUFReader's memmaps are
    return data


@pytest.mark.parametrize("qtype", SHIPPED_TYPES)
@pytest.mark.parametrize("rows,blocks_per_row", [(7, 3), (1, 1), (33, 2)])
def test_synthetic_blocks_match_gguf(qtype, rows, blocks_per_row):
    block_elems, _ = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    K = blocks_per_row * block_elems
    data = synthetic(qtype, rows, blocks_per_row, seed=rows * 100 + blocks_per_row)
    bw = decode(data, qtype, (rows, K))
    assert bw.shape == (rows, K)
    for t in (bw.codes, bw.scales, bw.offsets):
        assert t is None or t.is_contiguous()
    lo, hi = CODE_RANGE[qtype]
    u = bw.unpacked_codes()
    assert lo <= int(u.min()) and int(u.max()) <= hi
    assert_bitwise_equal(bw.dequantize(), gguf_dequantize(data, GGMLQuantizationType[qtype]))


@pytest.mark.parametrize("qtype", SHIPPED_TYPES)
def test_every_code_value_maps(qtype):
    """Over many blocks each code of the format's range occurs, so a misplaced bit would show."""
    block_elems, _ = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    data = synthetic(qtype, 64, 4, seed=7)
    bw = decode(data, qtype, (64, 4 * block_elems))
    lo, hi = CODE_RANGE[qtype]
    assert torch.unique(bw.unpacked_codes()).tolist() == list(range(lo, hi + 1))


def _shipped_tensors(alias: str):
    from llmrun.sources.shipped import shipped_models

    model = shipped_models()[alias]
    if not model.is_installed():
        pytest.skip(f"{alias} is not installed ({model.pip_command})")
    reader = gguf.GGUFReader(model.path())
    return [t for t in reader.tensors if t.tensor_type.name in SHIPPED_TYPES]


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_shipped_files_match_gguf(alias):
    tensors = _shipped_tensors(alias)
    assert tensors
    chunk = 8192
    for t in tensors:
        K, N = (int(x) for x in t.shape)
        bw = decode(t.data, t.tensor_type.name, (N, K))
        for n0 in range(0, N, chunk):
            ours = bw.rows(n0, n0 + chunk).dequantize()
            theirs = gguf_dequantize(t.data[n0:n0 + chunk], t.tensor_type)
            assert_bitwise_equal(ours, theirs)


def test_unsupported_type_is_a_value_error():
    with pytest.raises(ValueError, match="Q2_K cannot be decoded"):
        decode(np.zeros((1, 84), dtype=np.uint8), "Q2_K", (1, 256))
    with pytest.raises(ValueError, match="F32 cannot be decoded"):
        decode(np.zeros((1, 128), dtype=np.uint8), "F32", (1, 32))


def test_size_mismatch_is_a_value_error():
    data = synthetic("Q8_0", 4, 2, seed=0)
    with pytest.raises(ValueError, match="needs 272 bytes, got 204"):
        decode(data[:3], "Q8_0", (4, 64))
    with pytest.raises(ValueError, match="not whole blocks of 32"):
        decode(data, "Q8_0", (4, 68))
    with pytest.raises(ValueError, match="must be uint8"):
        decode(data.view(np.int8), "Q8_0", (4, 64))

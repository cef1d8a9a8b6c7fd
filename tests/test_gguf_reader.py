"""llmrun's GGUF reader (formats/gguf_reader.py) against gguf.GGUFReader, the oracle: every
metadata value, and every tensor's type, shape, sizes, offset and mapped data, on both shipped
files and on a file written with gguf's writer at a custom alignment; damaged files give one
LlmrunError."""

from __future__ import annotations

import numpy as np
import pytest

from llmrun.errors import LlmrunError
from llmrun.formats.gguf_reader import open_gguf, read_metadata

gguf = pytest.importorskip("gguf")


def _assert_same_as_gguf(path):
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == expected
    assert read_metadata(path) == expected
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, a.shape.tolist(), a.n_elements, a.n_bytes, a.data_offset) == \
            (b.tensor_type, b.shape.tolist(), b.n_elements, b.n_bytes, b.data_offset), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data, equal_nan=a.data.dtype.kind == "f"), a.name
        assert not a.data.flags.writeable


def test_shipped_files_read_as_gguf_reads_them(smollm2_path, gemma3_path):
    for path in (smollm2_path, gemma3_path):
        _assert_same_as_gguf(path)


def _written(path, alignment=None):
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_array("test.strings", ["a", "", "ünï", "x" * 300])
    writer.add_array("test.floats", [0.5, -1.25])
    writer.add_uint64("test.big", 2**40 + 3)
    writer.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((7,)).astype(np.float16))
    writer.add_tensor("i32", rng.integers(-9, 9, (2, 3, 4)).astype(np.int32))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_written_file_reads_as_gguf_reads_it(tmp_path, alignment):
    _assert_same_as_gguf(_written(tmp_path / "t.gguf", alignment))


def test_damaged_files_give_one_error(tmp_path):
    data = _written(tmp_path / "t.gguf").read_bytes()
    cases = {"truncated": data[:-40], "bad magic": b"GGUX" + data[4:], "empty": b"",
             "header only": data[:30]}
    for name, bytes_ in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(bytes_)
        with pytest.raises(LlmrunError, match=str(path)):
            open_gguf(path)

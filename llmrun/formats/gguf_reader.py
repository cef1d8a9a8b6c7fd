"""A GGUF file's key/value metadata and its tensors, read without copying.

gguf.GGUFReader (the gguf package) builds a numpy view per array element of the metadata:
~7 s for Gemma 3's 262144-token vocabulary, on every open. This reads the same sections in
well under a second and maps each tensor's data as GGUFReader does (gguf's type names, block
sizes and byte shapes), as read-only views of one memory map. Little-endian GGUF v2 and v3.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from llmrun.errors import LlmrunError

_GGUF_SCALARS = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


class GGUFTensor(NamedTuple):
    name: str
    tensor_type: Any        # gguf.GGMLQuantizationType
    shape: np.ndarray       # uint64 dims in GGUF order (innermost first)
    n_elements: int
    n_bytes: int
    data_offset: int        # from the start of the file
    data: np.ndarray        # read-only view: elements for float/int types, else bytes per row


class GGUFFile(NamedTuple):
    path: Path
    metadata: dict[str, Any]  # strings as str, numeric arrays as lists
    tensors: list[GGUFTensor]


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF file, without its tensors."""
    with _mapped(path) as buf:
        return _checked(path, lambda: _parse_kv(buf, path)[0])


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The metadata and the tensors (data mapped, not read) of a GGUF file."""
    import gguf

    with _mapped(path) as buf:
        def parse():
            meta, pos, n_tensors = _parse_kv(buf, path)
            infos, pos = _parse_tensor_infos(buf, pos, n_tensors)
            alignment = int(meta.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
            if alignment <= 0:
                raise ValueError(f"general.alignment is {alignment}")
            return meta, infos, -(-pos // alignment) * alignment, len(buf)
        meta, infos, data_start, size = _checked(path, parse)
    data = np.memmap(path, dtype=np.uint8, mode="r") if infos else np.empty(0, np.uint8)
    tensors = [_checked(path, lambda info=info: _tensor(data, data_start, size, *info)) for info in infos]
    return GGUFFile(Path(path), meta, tensors)


class _mapped:
    def __init__(self, path):
        self.path = os.fspath(path)

    def __enter__(self):
        try:
            with open(self.path, "rb") as f:
                self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise LlmrunError(f"cannot read GGUF file {self.path} ({exc}); check the path and permissions") from exc
        return self.buf

    def __exit__(self, *exc):
        self.buf.close()


def _checked(path, parse):
    try:
        return parse()
    except (struct.error, IndexError, ValueError, OverflowError, UnicodeDecodeError) as exc:
        raise LlmrunError(
            f"{os.fspath(path)} is not a valid GGUF file (damaged: {exc}); download or convert it again"
        ) from None


def _parse_kv(buf, path) -> tuple[dict[str, Any], int, int]:
    """(metadata, the offset past it, the number of tensors)."""
    if buf[:4] != b"GGUF":
        raise LlmrunError(f"{os.fspath(path)} is not a GGUF file (wrong magic bytes); pass a .gguf model file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise LlmrunError(
            f"{os.fspath(path)}: GGUF version {version} is not supported (only 2 and 3, little-endian); "
            "convert the model again with a recent llama.cpp"
        )
    pos = 24
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = _read_str(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        meta[key], pos = _read_value(buf, vtype, pos + 4)
    return meta, pos, n_tensors


def _read_str(buf, pos):
    (n,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + n
    if end > len(buf):
        raise ValueError("a string runs past the end of the file")
    return buf[pos + 8:end].decode("utf-8", errors="replace"), end


def _read_value(buf, vtype, pos):
    if vtype == _GGUF_STRING:
        return _read_str(buf, pos)
    if vtype in _GGUF_SCALARS:
        dt = np.dtype(_GGUF_SCALARS[vtype]).newbyteorder("<")
        return np.frombuffer(buf, dt, 1, pos)[0].item(), pos + dt.itemsize
    if vtype == _GGUF_ARRAY:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype == _GGUF_STRING:
            out = []
            append = out.append
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", buf, pos)
                append(buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
                pos += 8 + n
            if pos > len(buf):
                raise ValueError("a string array runs past the end of the file")
            return out, pos
        if etype in _GGUF_SCALARS:
            dt = np.dtype(_GGUF_SCALARS[etype]).newbyteorder("<")
            return np.frombuffer(buf, dt, count, pos).tolist(), pos + dt.itemsize * count
        out = []
        for _ in range(count):
            v, pos = _read_value(buf, etype, pos)
            out.append(v)
        return out, pos
    raise ValueError(f"unknown value type {vtype}")


def _parse_tensor_infos(buf, pos, n_tensors):
    """[(name, ggml type code, dims, offset in the data section)], the offset past them."""
    infos, names = [], set()
    for _ in range(n_tensors):
        name, pos = _read_str(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        if n_dims > _MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        dims = np.frombuffer(buf, np.dtype("<u8"), n_dims, pos + 4).copy()
        pos += 4 + 8 * n_dims
        qtype, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if name in names:
            raise ValueError(f"tensor {name} appears twice")
        names.add(name)
        infos.append((name, qtype, dims, offset))
    return infos, pos


def _tensor(data: np.ndarray, data_start: int, size: int, name: str, qtype: int, dims: np.ndarray,
            offset: int) -> GGUFTensor:
    import gguf

    ggml_type = gguf.GGMLQuantizationType(qtype)  # ValueError for a type gguf does not know
    n_elements = int(np.prod(dims, dtype=np.uint64)) if len(dims) else 1
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    if n_elements % block_size:
        raise ValueError(f"tensor {name}: {n_elements} elements are not whole {ggml_type.name} blocks")
    n_bytes = n_elements // block_size * type_size
    start = data_start + offset
    if start + n_bytes > size:
        raise ValueError(f"tensor {name} runs past the end of the file")
    shape = tuple(int(d) for d in reversed(dims.tolist()))
    elements = _ELEMENT_TYPES.get(ggml_type.name)
    if elements is not None:
        view = data[start:start + n_bytes].view(elements).reshape(shape)
    else:
        view = data[start:start + n_bytes].reshape(gguf.quant_shape_to_byte_shape(shape, ggml_type))
    return GGUFTensor(name, ggml_type, dims, n_elements, n_bytes, start, view)


# the types GGUFReader maps as numpy elements (others, BF16 included, as bytes)
_ELEMENT_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                  "I32": np.int32, "I64": np.int64}

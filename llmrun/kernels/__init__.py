"""Int4-weight x int8-activation matmul for CPUs, behind one interface.

Backends: "x86-avx512vnni", "x86-avxvnni", "x86-avx2" (C++ ops built on first use, with
the kernel bodies of the ISAs asked for: native.py / csrc/), "arm-kleidiai" (arm.py, torch's
KleidiAI ops) and "reference" (plain torch, integer-exact). LLMRUN_KERNEL_BACKEND forces one.
"""

from .dispatch import BACKENDS, ENV_VAR, available_backends, default_backend
from .modules import Int4Linear, Int8Linear, RescoredLinear
from .reference import (
    dequantize_int4,
    int4_group_sums_reference,
    int4_linear_reference,
    quantize_activations,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "Int4Linear",
    "Int8Linear",
    "RescoredLinear",
    "available_backends",
    "default_backend",
    "dequantize_int4",
    "int4_group_sums_reference",
    "int4_linear_reference",
    "quantize_activations",
    "quantize_int4",
    "quantize_int8",
    "unpack_int4",
]

"""Facts about the machine and the checkout that a benchmark result must carry."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

BANDWIDTH_GBPS = 34.0  # decode roofline: the int4 GEMV read bandwidth measured on the 2-thread dev machine


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (AVX512-BF16 or AMX; Arm: bf16 dot products)."""
    flags = cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_dtype() -> str:
    """The dtype of the `default` and `transformers` paths: bf16 where native, else fp32."""
    return "bfloat16" if native_bf16() else "float32"


def git_commit() -> str | None:
    """HEAD of the checkout llmrun runs from (with -dirty if modified), or None outside git."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    import torch

    from llmrun.kernels import default_backend

    from importlib import metadata

    try:
        tf_version = metadata.version("transformers")  # without importing it
    except metadata.PackageNotFoundError:
        tf_version = None
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "native_bf16": native_bf16(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa": default_backend(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "mem_available_bytes": mem_available_bytes(),
        "roofline_gbps": BANDWIDTH_GBPS,
    }

"""Which backend runs the int4 matmul: names, availability, the LLMRUN_KERNEL_BACKEND override."""

from __future__ import annotations

import functools
import importlib
import os
import platform
import warnings

from ..errors import LlmrunError

BACKENDS = ("x86-avx512vnni", "x86-avxvnni", "x86-avx2", "arm-kleidiai", "reference")
ENV_VAR = "LLMRUN_KERNEL_BACKEND"


def _is_arm() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


@functools.lru_cache(maxsize=None)
def arm_module():
    """llmrun.kernels.arm if present and supported on this machine, else None."""
    if not _is_arm():
        return None
    try:
        mod = importlib.import_module("llmrun.kernels.arm")
    except ImportError:
        return None
    try:
        return mod if mod.is_supported() else None
    except Exception:  # noqa: BLE001 - a broken probe means "not supported", never a crash
        return None


@functools.lru_cache(maxsize=None)
def available_backends() -> list[str]:
    """Backends this machine can run, fastest first; "reference" is always last."""
    out: list[str] = []
    if _is_arm():
        if arm_module() is not None:
            out.append("arm-kleidiai")
    elif platform.machine().lower() in ("x86_64", "amd64"):
        from . import native

        isas = native.runnable_isas()
        if not isas and native.built():
            warnings.warn("llmrun: this CPU lacks AVX2; the int4 kernels fall back to the slow reference",
                          stacklevel=2)
        out.extend(isas)
    out.append("reference")
    return out


def load_kernels() -> None:
    """Loads this machine's native kernels, building them first where needed (x86: once per
    machine, ~20 s on 2 cores). Run it in a thread while a model is read: the model can be
    packed for the backend before the kernels are there (available_backends() does not wait
    for them), and require_kernels() waits for them before it runs."""
    if _is_arm():
        arm_module()
    elif platform.machine().lower() in ("x86_64", "amd64"):
        from . import native

        native.built()


def require_kernels(backend: str) -> None:
    """Waits until the kernels `backend` runs on are loaded; one clear error if they could not be."""
    if backend.startswith("x86"):
        from . import native

        if not native.built():
            raise LlmrunError(f"the x86 kernels for {backend} could not be built (the warning above says why); "
                              f"{ENV_VAR}=reference runs without them, slowly")


def default_backend() -> str:
    """$LLMRUN_KERNEL_BACKEND if set (it must be available), else the fastest available."""
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced:
        return resolve_backend(forced)
    return available_backends()[0]


def resolve_backend(name: str | None) -> str:
    if name is None:
        return default_backend()
    if name not in BACKENDS:
        raise LlmrunError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name not in available_backends():
        raise LlmrunError(f"kernel backend {name!r} is not available on this machine "
                          f"(available: {', '.join(available_backends())}); unset {ENV_VAR} or pick one of those")
    return name

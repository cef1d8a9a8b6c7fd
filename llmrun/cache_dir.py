"""Where llmrun keeps what it builds (quantized models, compiled packages, the kernels, the
assembled shipped files): platformdirs' user cache dir, which honours XDG_CACHE_HOME on Linux;
~/.cache/llmrun where platformdirs is missing (the aarch64 test root has only torch)."""

from __future__ import annotations

import os
from pathlib import Path


def llmrun_cache_dir() -> Path:
    try:
        from platformdirs import user_cache_dir
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmrun"
    return Path(user_cache_dir("llmrun"))

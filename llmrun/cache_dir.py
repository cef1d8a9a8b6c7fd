"""Where llmrun keeps what it builds (quantized models, compiled packages, the kernels, the
assembled shipped files): platformdirs' user cache dir, which honours XDG_CACHE_HOME on Linux;
~/.cache/llmrun where platformdirs is missing (the aarch64 test root has only torch)."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path


def llmrun_cache_dir() -> Path:
    try:
        from platformdirs import user_cache_dir
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmrun"
    return Path(user_cache_dir("llmrun"))


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """A digest of llmrun's own source (Python and C++): what is built from it is keyed by it."""
    root = Path(__file__).parent  # the whole llmrun package
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cpp", ".inc", ".h")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()

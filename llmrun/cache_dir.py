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


# The front ends: what they hold never reaches a compiled step or a prepared model.
FRONT_ENDS = ("cli", "chat", "serve", "bench", "eval", "peers")


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """A digest of llmrun's own source (Python and C++) but its front ends: what is built from
    it (compiled steps, prepared models) is keyed by it."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cpp", ".inc", ".h")
                       and p.relative_to(root).parts[0] not in FRONT_ENDS):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()

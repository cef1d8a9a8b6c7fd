"""llmrun: run quantized Llama and Gemma models fast on a CPU, from Python."""

import os as _os

__version__ = "0.1.0"


def _inductor_cache_default() -> None:
    """Compiled graphs persist in llmrun's cache dir (not /tmp), unless the user chose one.
    Set at import, before torch's inductor first reads (and then fixes) the variable."""
    if "TORCHINDUCTOR_CACHE_DIR" not in _os.environ:
        from llmrun.cache_dir import llmrun_cache_dir

        _os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(llmrun_cache_dir() / "inductor")


_inductor_cache_default()

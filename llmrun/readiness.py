"""Which models are ready to answer at full speed, for `llmrun list` (torch-free): a run that
compiles its steps records, per model (its source: "shipped:<alias>", "hub:<repo id>", or a
local path) and settings, the packages its prefill and decode steps need (runtime.aot); a
model is ready when they all exist for this llmrun and torch, and compiling while a
background builder works on one of them."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

from llmrun.cache_dir import llmrun_cache_dir, source_digest


def _index() -> Path:
    return llmrun_cache_dir() / "ready.json"


def _build_of_llmrun() -> str:
    return f"{source_digest()[:16]}-torch-{metadata.version('torch')}"


def _read() -> dict:
    try:
        data = json.loads(_index().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(source: str, settings: str, packages: list[Path]) -> None:
    """Note the packages a run of `source` with `settings` (a label) needs."""
    data = _read()
    data.setdefault(source, {})[settings] = {"llmrun": _build_of_llmrun(),
                                                          "packages": sorted(str(p) for p in packages)}
    path = _index()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ready.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:  # costs only what `llmrun list` can say
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def state(source: str) -> str:
    """"yes" (some settings' packages all exist for this llmrun), "compiling" (a background
    builder works on one of them) or "-"."""
    from llmrun.runtime.background_build import building

    runs = _read().get(source, {})
    wanted = [run for run in runs.values() if run.get("llmrun") == _build_of_llmrun()]
    if any(run["packages"] and all(Path(p).is_file() for p in run["packages"]) for run in wanted):
        return "yes"
    awaited = {p for run in wanted for p in run["packages"]}
    dirs = {Path(p).parent for p in awaited}
    if any(job.get("package") in awaited for d in dirs for job in building(d)):
        return "compiling"
    return "-"

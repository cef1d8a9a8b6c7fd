"""The bench report as a markdown table (llama-bench's columns, plus roofline and quality),
JSON (everything, raw samples included) or CSV (one line per row)."""

from __future__ import annotations

import csv
import io
import json

COLUMNS = ("model", "weights", "path", "threads", "test", "t/s", "per stream", "vs default", "roofline",
           "greedy vs default")
CSV_FIELDS = ("model", "weights", "path", "threads", "test", "n_tokens", "batch", "tps_mean", "tps_sd",
              "per_stream_tps", "vs_default",
              "bytes_per_token", "roofline_tps", "roofline_pct", "greedy_match", "pp_argmax_match", "note",
              "samples_s")


def _tps(row: dict) -> str:
    if row["tps_mean"] is None:
        return row["note"] or "n/a"
    return f"{row['tps_mean']:.2f} ± {row['tps_sd']:.2f}"


def _per_stream(row: dict) -> str:
    return "" if row.get("per_stream_tps") is None else f"{row['per_stream_tps']:.2f}"


def _vs(row: dict) -> str:
    return "" if row["vs_default"] is None else f"{row['vs_default']:.2f}x"


def _roof(row: dict) -> str:
    if row["roofline_tps"] is None:
        return ""
    return f"{row['roofline_tps']:.1f} t/s ({row['roofline_pct']:.0f}%)"


def _greedy(row: dict) -> str:
    parts = []
    if row["greedy_match"]:
        k, n = row["greedy_match"]
        parts.append(f"{k}/{n}")
    if row["pp_argmax_match"] is not None:
        parts.append("pp top-1 same" if row["pp_argmax_match"] else "pp top-1 differs")
    return ", ".join(parts)


def cells(row: dict) -> list[str]:
    return [row["model"], row["weights"], row["path"], str(row["threads"]), row["test"], _tps(row),
            _per_stream(row), _vs(row), _roof(row), _greedy(row)]


def markdown(report: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---:" if c in ("threads", "t/s", "per stream", "vs default", "roofline") else "---"
                            for c in COLUMNS) + "|"]
    for row in report["rows"]:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells(row)) + " |")
    return "\n".join(lines)


def to_json(report: dict) -> str:
    return json.dumps(report, indent=1)


def to_csv(report: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in report["rows"]:
        flat = dict(row)
        flat["greedy_match"] = "/".join(map(str, row["greedy_match"])) if row["greedy_match"] else ""
        flat["samples_s"] = " ".join(f"{s:.6f}" for s in row["samples_s"]) if row["samples_s"] else ""
        w.writerow(flat)
    return buf.getvalue().rstrip("\n")


FORMATS = {"md": markdown, "json": to_json, "csv": to_csv}

"""`llmrun bench`: every path end to end on tiny models (-r 1, small -p/-n), each in its own
worker process; the JSON carries every field; the markdown and CSV tables parse; the
synthetic builder, memory skips, quality matching and --kernels delegation."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from llmrun.bench import PATHS
from llmrun.bench import report as bench_report
from llmrun.bench import runner, synthetic

PATH_FIELDS = ("load_s", "quantize_s", "compile_s", "peak_rss_bytes", "tests", "greedy_tokens", "weights",
               "model", "dtype", "threads")
ROW_FIELDS = ("model", "weights", "path", "threads", "test", "n_tokens", "tps_mean", "tps_sd", "samples_s",
              "samples_tps", "vs_default", "roofline_tps", "roofline_pct", "bytes_per_token", "greedy_match",
              "pp_argmax_match", "note")
META_FIELDS = ("cpu", "isa", "torch", "commit", "threads", "load_average_start", "load_average_end",
               "native_bf16", "roofline_gbps")


def _bench(*args, timeout=170):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "llmrun", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    return proc


def parse_markdown(text: str) -> list[dict]:
    lines = [l for l in text.strip().splitlines()]
    assert lines[0].startswith("| model |"), text
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace("-", "").replace(":", "")) == set(), lines[1]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells)))
    return rows


@pytest.fixture(scope="module")
def all_paths_report(tiny_hf_dir):
    """One run over every path, compiled ones included (the slow part: two compiles each)."""
    # one thread: a busy 2-core machine slows oversubscribed OpenMP threads ~30x
    proc = _bench("--model", str(tiny_hf_dir), "-p", "16", "-n", "8", "-r", "1", "-o", "json", "--threads", "1",
                  timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr


def test_every_path_end_to_end_json(all_paths_report):
    report, stderr = all_paths_report
    for key in META_FIELDS:
        assert key in report["meta"], key
    assert report["meta"]["isa"] and report["meta"]["torch"] == torch.__version__
    paths = [p for p in PATHS if p != "llama.cpp"]  # llama.cpp runs GGUF files: not this HF directory
    assert set(report["paths"]) == set(paths)
    for path, res in report["paths"].items():
        assert res.get("error") is None, (path, res.get("error"))
        for key in PATH_FIELDS:
            assert key in res, (path, key)
        assert res["load_s"] > 0 and res["peak_rss_bytes"] > 50 * 2**20
        assert res["tests"]["pp"]["n"] == 16 and len(res["tests"]["pp"]["samples_s"]) == 1
        assert res["tests"]["tg"]["n"] == 8 and len(res["tests"]["tg"]["samples_s"]) == 1
        assert len(res["greedy_tokens"]) == 16
        assert (res["compile_s"] is not None) == path.startswith("compiled")
        if path.startswith("compiled"):  # at most one prefill package (any length), one decode
            built = res["packages_built"]  # (none when an earlier run cached them)
            assert len(built) == len(set(built)) <= 2 and {b.split(":")[0] for b in built} <= {"prefill", "decode-b1"}, built
        assert (res["quantize_s"] > 0) == path.endswith("int4")
        if path.endswith("int4"):  # llmrun as it runs by default: its activation dtype and scheme
            from llmrun.runtime.engine import EngineOptions

            assert res["dtype"] == EngineOptions().dtype and res["weights"].startswith("int4-")
    assert [(r["path"], r["test"]) for r in report["rows"]] == [(p, t) for p in paths for t in ("pp16", "tg8")]
    for row in report["rows"]:
        for key in ROW_FIELDS:
            assert key in row, key
        assert row["tps_mean"] > 0 and row["note"] is None
        assert row["samples_tps"][0] == pytest.approx(row["n_tokens"] / row["samples_s"][0])
        assert row["vs_default"] > 0
        assert row["greedy_match"] is not None and row["greedy_match"][1] == 16
        if row["test"].startswith("tg"):
            assert row["bytes_per_token"] > 0 and 0 < row["roofline_pct"]
    default = [r for r in report["rows"] if r["path"] == "default"]
    assert all(r["vs_default"] == pytest.approx(1.0) and r["greedy_match"] == [16, 16] for r in default)
    # same weights, same dtype, no quantization: compiled bf16 must agree with eager on the first token
    assert next(r for r in report["rows"] if r["path"] == "compiled-bf16")["greedy_match"][0] >= 1
    # load / compile times are reported on their own lines (stderr), never in the table
    assert "compiled-int4: load" in stderr and "compile" in stderr and "roofline tg8 compiled-int4" in stderr
    # markdown rendering of the same report parses
    rows = parse_markdown(bench_report.markdown(report))
    assert len(rows) == len(report["rows"])


def test_synthetic_markdown_table_and_csv():
    proc = _bench("--synthetic", "tiny", "-p", "8", "-n", "4", "-r", "2", "--paths", "default,eager-int4",
                  "--threads", "1", "--group-size", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = parse_markdown(proc.stdout)  # stdout is just the table
    assert [(r["path"], r["test"]) for r in rows] == [("default", "pp8"), ("default", "tg4"),
                                                     ("eager-int4", "pp8"), ("eager-int4", "tg4")]
    for r in rows:
        assert r["model"] == "tiny (synthetic)" and r["threads"] == "1"
        mean, sd = r["t/s"].split(" ± ")
        assert float(mean) > 0 and float(sd) >= 0
        assert r["vs default"].endswith("x")
        assert r["greedy vs default"] == ""  # random weights: no quality claim
    assert "g32" in rows[2]["weights"]
    assert rows[1]["roofline"] and rows[3]["roofline"].endswith("%)")
    assert "load" in proc.stderr


def test_csv_and_json_formats_of_a_report():
    report = {"meta": {}, "paths": {}, "rows": [
        dict.fromkeys(ROW_FIELDS) | dict(model="m", weights="bf16", path="default", threads=2, test="tg4",
                                        n_tokens=4, tps_mean=10.0, tps_sd=0.5, samples_s=[0.4, 0.4],
                                        samples_tps=[10.0, 10.0], vs_default=1.0, greedy_match=[16, 16]),
        dict.fromkeys(ROW_FIELDS) | dict(model="m", weights="fp32", path="transformers", threads=2, test="tg4",
                                        n_tokens=4, note="skipped: no memory")]}
    rows = list(csv.DictReader(io.StringIO(bench_report.to_csv(report))))
    assert rows[0]["tps_mean"] == "10.0" and rows[0]["greedy_match"] == "16/16"
    assert rows[1]["note"] == "skipped: no memory" and rows[1]["tps_mean"] == ""
    md = parse_markdown(bench_report.markdown(report))
    assert md[0]["t/s"] == "10.00 ± 0.50" and md[0]["greedy vs default"] == "16/16"
    assert md[1]["t/s"] == "skipped: no memory"
    assert json.loads(bench_report.to_json(report)) == report


def test_greedy_match_and_summary():
    assert runner.greedy_match([1, 2, 3, 4], [1, 2, 9, 4]) == (2, 4)
    assert runner.greedy_match([1, 2], [1, 2]) == (2, 2)
    assert runner.greedy_match(None, [1]) is None
    s = runner.summarize([0.5, 1.0], 10)
    assert s["samples_tps"] == [20.0, 10.0] and s["tps_mean"] == 15.0 and s["tps_sd"] == pytest.approx(7.0710678)


@pytest.mark.parametrize("int4,head", [(False, None), (True, "int8"), (True, "int4-rescored"), (True, "int4")])
def test_synthetic_builder_true_shapes_and_forward(int4, head):
    from llmrun.kernels import Int4Linear, Int8Linear, RescoredLinear
    from llmrun.quant.transform import Int8Embedding, TiedEmbedding

    cfg = synthetic.model_config("tiny")
    model, timings = synthetic.build_llmrun(cfg, torch.bfloat16, int4, group_size=0, head=head or "int8")
    assert not any(p.is_meta for p in model.parameters())
    layer = model.model.layers[0]
    if int4:
        kind = {"int8": Int8Linear, "int4-rescored": RescoredLinear, "int4": Int4Linear}[head]
        assert isinstance(layer.mlp.down_proj, Int4Linear) and isinstance(model.lm_head, kind)
        table = {"int8": model.lm_head, "int4-rescored": getattr(model.lm_head, "exact", None)}.get(head)
        if table is None:
            assert isinstance(model.model.embed_tokens, Int8Embedding)
        else:  # tied: the embedding reads the head's int8 table
            assert isinstance(model.model.embed_tokens, TiedEmbedding) and model.model.embed_tokens._head[0] is table
        assert timings["quantize_s"] > 0
    else:
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the real model
        assert layer.self_attn.k_proj.weight.shape == (2 * 16, 64)
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()


def test_synthetic_configs_are_the_true_shapes():
    c = synthetic.model_config("llama3.1-8b")
    assert (c.n_layers, c.dim, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.tie_embeddings) == \
        (32, 4096, 14336, 32, 8, 128, 128256, False)
    c = synthetic.model_config("llama3.2-1b")
    assert (c.n_layers, c.dim, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.tie_embeddings) == \
        (16, 2048, 8192, 32, 8, 64, 128256, True)
    counts = synthetic.param_counts(synthetic.model_config("llama3.1-8b"))
    assert 7.9e9 < sum(counts.values()) < 8.1e9
    assert synthetic.estimate_bytes(synthetic.model_config("llama3.1-8b"), "int4") < 6 * 2**30


def test_rows_that_cannot_fit_are_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(runner.machine, "mem_available_bytes", lambda: 20 * 2**30)
    opts = runner.BenchOptions(synthetic="llama3.1-8b")
    assert "skipped" in runner.memory_note("default", "float32", opts)  # 32 GB of fp32
    assert runner.memory_note("default", "bfloat16", opts) is None  # 16 GB fits
    assert runner.memory_note("compiled-int4", "bfloat16", opts) is None
    assert runner.memory_note("default", "float32", runner.BenchOptions()) is None  # real models: not estimated


def test_bad_arguments_fail_with_one_line():
    proc = _bench("--synthetic", "nope", "-r", "1")
    assert proc.returncode == 1 and "unknown --synthetic" in proc.stderr
    proc = _bench("--synthetic", "tiny", "--paths", "default,fast")
    assert proc.returncode == 1 and "unknown path fast" in proc.stderr
    proc = _bench("--synthetic", "tiny", "-r", "0")
    assert proc.returncode == 1 and "repetition" in proc.stderr


def test_kernels_flag_delegates_to_the_kernel_bench(monkeypatch):
    from llmrun.cli import main
    from llmrun.kernels import bench as kernel_bench

    seen = {}
    monkeypatch.setattr(kernel_bench, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert main(["bench", "--threads", "2", "--kernels", "--shapes", "smollm2", "--m", "1"]) == 0
    assert seen["argv"] == ["--threads", "2", "--shapes", "smollm2", "--m", "1"]


def test_bytes_read_per_token_count_a_tied_head_once_and_the_kv_cache_read():
    from llmrun.bench import worker
    from llmrun.runtime.kv_cache import KVCache

    cfg = synthetic.model_config("tiny")
    model, _ = synthetic.build_llmrun(cfg, torch.bfloat16, False)
    cache = KVCache(cfg, 1, 512, torch.bfloat16)
    got = worker.stored_bytes(model, cache)
    assert got["weights_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
    assert got["kv_bytes"] == 2 * cfg.n_layers * cfg.n_kv_heads * 512 * cfg.head_dim * 2
    # the decode attention kernel reads only the filled positions: 72 of 512 on average
    assert worker.stored_bytes(model, cache, attended=72)["kv_bytes"] == got["kv_bytes"] * 72 // 512
    model, _ = synthetic.build_llmrun(cfg, torch.bfloat16, True)
    got = worker.stored_bytes(model)
    size = lambda m: sum(t.numel() * t.element_size() for _, t in worker.module_tensors(m))  # noqa: E731
    head = size(model.lm_head)
    assert head > cfg.vocab_size * cfg.dim  # the packed int8 head (an attribute, not a buffer) in full
    layers = sum(size(m) for m in model.model.layers.modules())
    assert layers > 0.5 * synthetic.param_counts(cfg)["linear"]  # packed int4: ~0.5 byte per weight
    # the tied embedding reads its rows from the head's table: no tensors of its own
    assert not list(model.model.embed_tokens.buffers())
    assert got["weights_bytes"] == head + layers + size(model.model.norm)
    # a rescored head: its int4 copy in full, k rows of its int8 table
    model, _ = synthetic.build_llmrun(cfg, torch.bfloat16, True, head="int4-rescored")
    scan, exact = model.lm_head.scan, model.lm_head.exact
    model.lm_head.k = 8  # of tiny's 512 rows: 8 picks, each read with its 16-row panel on x86
    rows = size(exact) * model.lm_head.exact_fraction_read()
    assert rows == size(exact) * (128 if model.lm_head.exact.backend.startswith("x86") else 8) / 512
    assert abs(worker.stored_bytes(model)["weights_bytes"] - (size(scan) + rows + layers + size(model.model.norm))) < 4


def test_as_shipped_path_beside_int4():
    """`--paths eager-int4,eager-shipped` on a GGUF: one table with the file's weights as shipped
    beside llmrun's int4 re-rounding, each labelled; on a synthetic model the shipped path fails
    in one line (it has no file)."""
    proc = _bench("--model", "smollm2-135m", "-p", "8", "-n", "4", "-r", "1", "-o", "json", "--threads", "1",
                  "--paths", "default,eager-int4,eager-shipped", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    shipped, int4 = report["paths"]["eager-shipped"], report["paths"]["eager-int4"]
    assert shipped["weights"].startswith("as shipped+") and int4["weights"].startswith("int4-g32+")
    assert shipped["quantize_s"] > 0 and shipped["tests"]["tg"]["n"] == 4
    row = next(r for r in report["rows"] if r["path"] == "eager-shipped" and r["test"] == "tg4")
    assert row["tps_mean"] > 0 and row["greedy_match"][1] == 16
    proc = _bench("--synthetic", "tiny", "-p", "8", "-n", "4", "-r", "1", "--paths", "eager-shipped")
    assert proc.returncode != 0 and "synthetic models have none" in proc.stderr


def test_llama_cpp_path_asked_for_on_what_it_cannot_run_is_a_skipped_row():
    proc = _bench("--synthetic", "tiny", "-p", "8", "-n", "4", "-r", "1", "-o", "json", "--paths", "llama.cpp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)["paths"]["llama.cpp"]
    assert res["skipped"] in ("skipped: llama.cpp runs GGUF files only",
                              "skipped: llama_cpp is not installed (pip install 'llmrun[llama-cpp]')")


@pytest.mark.skipif(not __import__("llmrun.peers.llama_cpp", fromlist=["x"]).available(),
                    reason="llama-cpp-python is not installed (pip install 'llmrun[llama-cpp]')")
def test_llama_cpp_paths_beside_llmrun_on_the_same_file():
    """llama.cpp on the shipped GGUF as shipped and requantized to Q4_0, in the same table as
    llmrun's as-shipped path; the same greedy tokens as llmrun as shipped (same weights)."""
    proc = _bench("--model", "smollm2-135m", "-p", "8", "-n", "4", "-r", "1", "-o", "json", "--threads", "1",
                  "--paths", "eager-shipped,llama.cpp,llama.cpp-q4_0", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    ours, peer, q4_0 = (report["paths"][p] for p in ("eager-shipped", "llama.cpp", "llama.cpp-q4_0"))
    assert peer["weights"] == "llama.cpp as-shipped" and peer["llama_cpp_file"].endswith("Q4_1.gguf")
    assert q4_0["weights"] == "llama.cpp q4_0" and "q4_0" in q4_0["llama_cpp_file"]
    assert q4_0["weights_bytes"] < peer["weights_bytes"]  # Q4_0 is 4.5 bits a weight, Q4_1 5
    for res in (peer, q4_0):
        assert res["tests"]["pp"]["n"] == 8 and res["tests"]["tg"]["n"] == 4 and len(res["greedy_tokens"]) == 16
    assert peer["greedy_tokens"][:8] == ours["greedy_tokens"][:8]
    rows = [r for r in report["rows"] if r["path"].startswith("llama.cpp")]
    assert len(rows) == 4 and all(r["tps_mean"] > 0 for r in rows)

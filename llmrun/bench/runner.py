"""The parent of `llmrun bench`: plans one row per (path, test), runs each path in a fresh
subprocess (clean peak RSS; memory returned between paths), and gathers the results."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from llmrun.bench import EXTRA_PATHS, PATHS, PEER_MODULES, is_quantized, machine
from llmrun.bench.worker import SHORT, Spec, run_label
from llmrun.errors import LlmrunError
from llmrun.quant.schemes import DEFAULT_HEAD, DEFAULT_INT4

MEMORY_MARGIN = 1.5 * 2**30  # torch, compile and activations beside the weights


@dataclass
class BenchOptions:
    model: str | None = None
    synthetic: str | None = None
    paths: tuple[str, ...] = PATHS
    threads: int | None = None
    pp: int = 512
    tg: int = 128
    reps: int = 5
    group_size: int | None = None  # None: llmrun's default scheme (quant.schemes.DEFAULT_GROUP_SIZE)
    head: str = DEFAULT_HEAD  # int4 paths: the output head's scheme (llmrun.quant.schemes)
    dtype: str | None = None  # None: see path_dtype
    int4: str = DEFAULT_INT4  # int4 paths: asymmetric or symmetric groups (llmrun.quant.schemes)
    batches: tuple[int, ...] = (1,)  # tg with this many sequences per decode step (llmrun paths)
    kv_cache: str = "auto"  # llmrun paths' KV cache dtype (llmrun.runtime.kv_cache.kv_dtype)
    tp: int = 1  # > 1: llmrun's paths also on this many ranks (torchrun), `threads` shared among them


# under --tp: the paths that can split (llmrun's own, eager or torch.compile'd: AOTInductor
# packages do not hold the ranks' all-reduces)
TP_PATHS = ("default", "eager-int4", "jit-int4", "eager-shipped")


def parse_paths(text: str | None) -> tuple[str, ...]:
    if not text:
        return PATHS
    paths = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in paths if p not in PATHS + EXTRA_PATHS]
    if unknown or not paths:
        raise LlmrunError(f"unknown path {', '.join(unknown) or '(none)'}; choose from "
                          f"{', '.join(PATHS + EXTRA_PATHS)}")
    return paths


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise LlmrunError(f"-b {text}: give batch sizes >= 1, e.g. 1,2,4,8")
    return batches


def validate(opts: BenchOptions) -> None:
    from llmrun.quant.schemes import GROUP_SIZES

    if opts.pp < 0 or opts.tg < 0 or opts.pp + opts.tg == 0:
        raise LlmrunError("-p and -n must be >= 0 and not both 0")
    if opts.reps < 1:
        raise LlmrunError(f"-r {opts.reps}: at least one repetition")
    if not opts.batches or min(opts.batches) < 1:
        raise LlmrunError(f"-b {','.join(map(str, opts.batches))}: batch sizes must be >= 1")
    if opts.threads is not None and opts.threads < 1:
        raise LlmrunError(f"--threads {opts.threads} must be >= 1")
    if opts.group_size is None:
        from llmrun.quant.schemes import DEFAULT_GROUP_SIZE

        opts.group_size = DEFAULT_GROUP_SIZE
    if opts.group_size not in GROUP_SIZES:
        raise LlmrunError(f"--group-size {opts.group_size} is not supported: use 0 (per channel) or 32, 64, 128, 256")
    if opts.model and opts.synthetic:
        raise LlmrunError("give --model or --synthetic, not both")
    if opts.tp < 1:
        raise LlmrunError(f"--tp {opts.tp} must be >= 1")
    if opts.tp > 1:
        if opts.paths == PATHS:  # the default: the paths that split
            opts.paths = ("default", "eager-int4", "jit-int4")
        cannot = [p for p in opts.paths if p not in TP_PATHS and p not in PEER_MODULES]
        if cannot:
            raise LlmrunError(f"--tp runs {', '.join(TP_PATHS)} (and peers in one process), not {', '.join(cannot)}: "
                              "AOTInductor packages do not hold the ranks' all-reduces (jit-int4 compiles them)")
        if opts.threads is not None and opts.threads < opts.tp:
            raise LlmrunError(f"--threads {opts.threads} is fewer than --tp {opts.tp}: a rank needs a thread")
    if opts.synthetic:
        from llmrun.bench.synthetic import hf_dict

        hf_dict(opts.synthetic)
    else:  # fail here, in one line, rather than once per worker
        from llmrun.sources.hub import resolve_model

        resolve_model(opts.model)


def path_dtype(path: str, opts: BenchOptions) -> str:
    """default / transformers: bf16 where the CPU has native bf16, else fp32 (the plain PyTorch
    path); int4 paths: the activations dtype llmrun runs by default (EngineOptions.dtype);
    compiled-bf16: bf16. --dtype overrides all but compiled-bf16."""
    if path == "compiled-bf16":
        return "bfloat16"
    if opts.dtype:
        return opts.dtype
    if is_quantized(path):
        from llmrun.runtime.engine import EngineOptions

        return EngineOptions().dtype
    return machine.default_dtype()


def memory_note(path: str, dtype: str, opts: BenchOptions) -> str | None:
    """Why a synthetic path cannot fit in memory now, or None."""
    if not opts.synthetic:
        return None
    from llmrun.bench.synthetic import estimate_bytes, model_config

    cfg = model_config(opts.synthetic)
    need = estimate_bytes(cfg, "int4" if is_quantized(path) else dtype)
    avail = machine.mem_available_bytes()
    if avail is not None and need + MEMORY_MARGIN > avail:
        return (f"skipped: {SHORT.get(dtype, dtype)} weights need ~{need / 2**30:.1f} GiB, "
                f"{avail / 2**30:.1f} GiB available")
    return None


def peer_missing(path: str, opts: BenchOptions) -> str | None:
    """Why a peer path cannot run here (its package, or a model it cannot read), or None."""
    module = PEER_MODULES.get(path)
    if module is None:
        return None
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed" + (" (pip install 'llmrun[llama-cpp]')" if module == "llama_cpp" else "")
    if module == "llama_cpp":
        from llmrun.sources.hub import resolve_model

        if opts.synthetic or resolve_model(opts.model).kind != "gguf":
            return "llama.cpp runs GGUF files only"
    return None


def run_path(spec: Spec, workdir: str) -> dict:
    """Run one path in a subprocess (under spec.tp > 1, torchrun's ranks on this host); its
    progress streams to our stderr."""
    tag = f"{spec.path}-tp{spec.tp}"
    spec_file = os.path.join(workdir, f"{tag}.spec.json")
    out_file = os.path.join(workdir, f"{tag}.out.json")
    with open(spec_file, "w") as f:
        json.dump(dataclasses.asdict(spec), f)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads))
    launch = [sys.executable]
    if spec.tp > 1:
        launch += ["-m", "torch.distributed.run", "--nproc-per-node", str(spec.tp), "--master-addr", "127.0.0.1",
                   "--master-port", str(_free_port())]
    start = time.perf_counter()
    proc = subprocess.run([*launch, "-m", "llmrun.bench.worker", spec_file, out_file],
                          env=env, stdout=sys.stderr, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    try:
        with open(out_file) as f:
            result = json.load(f)
    except (OSError, ValueError):
        result = {"path": spec.path, "error": f"worker exited with status {proc.returncode} and no result"}
    result["wall_s"] = wall
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summarize(samples_s: list[float], n: int) -> dict:
    """n tokens each sample (a batched test: all its sequences' tokens)."""
    tps = [n / s for s in samples_s]
    return {"tps_mean": statistics.fmean(tps), "tps_sd": statistics.stdev(tps) if len(tps) > 1 else 0.0,
            "samples_tps": tps}


def run_bench(opts: BenchOptions, log=None) -> dict:
    """Run every path; return the whole report (meta, per-path results, rows)."""
    log = log or (lambda msg: print(f"llmrun bench: {msg}", file=sys.stderr, flush=True))
    validate(opts)
    threads = opts.threads or len(os.sched_getaffinity(0))
    missing = {p: why for p in opts.paths if (why := peer_missing(p, opts))}
    paths = [p for p in opts.paths if p not in missing or opts.paths != PATHS]  # asked for: a skipped row
    meta = machine.machine_info()
    meta.update(threads=threads, load_average_start=machine.load_average(),
                started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                args={k: v for k, v in dataclasses.asdict(opts).items()})
    meta["args"]["paths"] = list(paths)
    load = meta["load_average_start"]
    log(f"{meta['cpu']}, {meta['isa']}, torch {meta['torch']}, {threads} threads, "
        f"load average {load[0] if load else '?'} (cores: {meta['cores']})")
    if load and load[0] > meta["cores"] * 0.5:
        log(f"warning: the machine is busy (load {load[0]} on {meta['cores']} cores): timings are unreliable")
    results: dict[str, dict] = {}  # by run label: a path, or a path on its ranks
    runs = [(path, 1) for path in paths]
    if opts.tp > 1:  # each path that splits, also on its ranks, right after it ran in one process
        runs = [r for path in paths for r in [(path, 1)] + ([(path, opts.tp)] if path in TP_PATHS else [])]
    with tempfile.TemporaryDirectory(prefix="llmrun-bench-") as workdir:
        for path, tp in runs:
            label = run_label(path, tp)
            dtype = path_dtype(path, opts)
            if path in missing:
                results[label] = {"path": path, "skipped": f"skipped: {missing[path]}"}
                log(f"{label}: {results[label]['skipped']}")
                continue
            note = memory_note(path, dtype, opts)
            if note:
                results[label] = {"path": path, "dtype": dtype, "skipped": note}
                log(f"{label}: {note}")
                continue
            spec = Spec(path=path, model=opts.model, synthetic=opts.synthetic, threads=max(1, threads // tp),
                        pp=opts.pp, tg=opts.tg, reps=opts.reps, group_size=opts.group_size, head=opts.head,
                        dtype=dtype, int4=opts.int4, batches=opts.batches, kv_cache=opts.kv_cache, tp=tp)
            log(f"{label}: starting ({SHORT[dtype]}" + (f", {spec.threads} thread(s) a rank)" if tp > 1 else ")"))
            res = run_path(spec, workdir)
            results[label] = res
            if res.get("error"):
                log(f"{label}: FAILED: {res['error']}")
                continue
            stages = [f"load {res['load_s']:.2f} s"]
            if is_quantized(path):
                stages.append(f"quantize {res['quantize_s']:.2f} s")
            if res.get("compile_s") is not None:
                stages.append(f"compile {res['compile_s']:.1f} s")
            if tp > 1:
                stages.append(f"all-reduces alone {res['allreduce_ms_per_token']:.2f} ms a token")
                rss = ", ".join(f"{b / 2**20:.0f}" for b in res["peak_rss_per_rank"])
                log(f"{label}: " + "  ".join(stages) + f"  peak RSS per rank {rss} MiB")
            else:
                log(f"{label}: " + "  ".join(stages) + f"  peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB")
    meta["load_average_end"] = machine.load_average()
    log(f"load average at the end: {meta['load_average_end']} (cores: {meta['cores']})")
    rows = build_rows(results, threads, opts)
    report = {"meta": meta, "paths": results, "rows": rows}
    for line in roofline_lines(report):
        log(line)
    return report


def greedy_match(tokens: list[int] | None, reference: list[int] | None) -> tuple[int, int] | None:
    """(leading tokens equal to the reference, tokens compared), or None where not checked."""
    if tokens is None or reference is None:
        return None
    n = min(len(tokens), len(reference))
    k = 0
    while k < n and tokens[k] == reference[k]:
        k += 1
    return k, n


def planned_tests(opts: BenchOptions) -> list[tuple[str, str, int, int]]:
    """(key in a worker's result tests, row label, tokens per sequence, sequences) per test."""
    tests = [("pp", f"pp{opts.pp}", opts.pp, 1)] if opts.pp else []
    if opts.pp:
        tests += [(f"pp_b{b}", f"pp{opts.pp} +{b - 1} decoding", opts.pp, b)
                  for b in sorted(set(opts.batches)) if b > 1]
    if opts.tg:
        tests += [("tg" if b == 1 else f"tg_b{b}", f"tg{opts.tg}" if b == 1 else f"tg{opts.tg} x{b}", opts.tg, b)
                  for b in sorted(set(opts.batches) | {1})]
    return tests


def build_rows(results: dict, threads: int, opts: BenchOptions) -> list[dict]:
    """One row per run (a path, or under --tp a path on its ranks: run_label), in the order they
    ran, and test; a batched tg's t/s is the aggregate over its sequences, a pp beside running
    decodes that of the prompt (per stream: each decoding one's t/s meanwhile)."""
    rows = []
    default = results.get("default", {})
    model_name = next((r["model"] for r in results.values() if r.get("model")),
                      f"{opts.synthetic} (synthetic)" if opts.synthetic else (opts.model or "default"))
    for run, res in results.items():
        ref = default.get("greedy_tokens") if run != "default" else res.get("greedy_tokens")
        match = greedy_match(res.get("greedy_tokens"), ref)
        for key, label, n, batch in planned_tests(opts):
            data = (res.get("tests") or {}).get(key)
            note = res.get("skipped") or (f"error: {res['error']}" if res.get("error") else None)
            if batch > 1 and not data and not note:
                note = "many sequences: llmrun paths only"
            row = {"model": res.get("model") or model_name, "weights": res.get("weights") or
                   SHORT.get(res.get("dtype", ""), ""), "path": run, "threads": res.get("threads") or threads,
                   "test": label, "n_tokens": n, "batch": batch, "tps_mean": None, "tps_sd": None,
                   "per_stream_tps": None, "samples_s": None, "samples_tps": None, "vs_default": None,
                   "roofline_tps": None, "roofline_pct": None, "bytes_per_token": None,
                   "greedy_match": list(match) if match and batch == 1 else None,
                   "pp_argmax_match": None, "note": note}
            prefill = key.startswith("pp")
            if data:
                row.update(samples_s=data["samples_s"], **summarize(data["samples_s"], n if prefill else n * batch))
                if not prefill:
                    row["per_stream_tps"] = row["tps_mean"] / batch
                elif batch > 1:
                    row["per_stream_tps"] = statistics.fmean(data["decode_steps"] / s for s in data["samples_s"])
                base = ((default.get("tests") or {}).get(key) or {}).get("samples_s")
                if base:
                    row["vs_default"] = row["tps_mean"] / summarize(base, n if prefill else n * batch)["tps_mean"]
                if not prefill and res.get("weights_bytes"):
                    # one step reads the weights once and every sequence's KV
                    per_step = res["weights_bytes"] + data.get("kv_bytes", res.get("kv_bytes", 0))
                    roof = machine.BANDWIDTH_GBPS * 1e9 / per_step * batch
                    row.update(bytes_per_token=per_step / batch, roofline_tps=roof,
                               roofline_pct=100.0 * row["tps_mean"] / roof)
                if key == "pp" and res.get("pp_argmax") is not None and default.get("pp_argmax") is not None \
                        and not opts.synthetic:
                    row["pp_argmax_match"] = res["pp_argmax"] == default["pp_argmax"]
            rows.append(row)
    return rows


def roofline_lines(report: dict) -> list[str]:
    out = []
    for row in report["rows"]:
        if row["path"] == "compiled-int4" and row["roofline_tps"]:
            out.append(f"roofline {row['test']} compiled-int4: {row['bytes_per_token'] / 1e6:.1f} MB read per token "
                       f"(weights + KV) / {machine.BANDWIDTH_GBPS:.0f} GB/s = {row['roofline_tps']:.1f} t/s; "
                       f"achieved {row['tps_mean']:.1f} t/s = {row['roofline_pct']:.0f}%")
    return out

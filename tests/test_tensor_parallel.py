"""Tensor parallel over torch.distributed: 2 ranks on this machine (gloo, torchrun), tiny models
of several families saved by transformers, against the same models in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tp_logits import build  # noqa: E402

HERE = Path(__file__).parent
COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MODELS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=32)),
    "qwen2": ("Qwen2Config", dict()),  # q/k/v biases: split with their rows
    "phi3": ("Phi3Config", dict(pad_token_id=None, bos_token_id=1, eos_token_id=2)),  # fused q/k/v, gate/up
    "one-kv-head": ("LlamaConfig", dict(num_key_value_heads=1)),
}
IDS = [1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 33, 200]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _word_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + "The capital of France is".split()
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words + [f"w{i}" for i in range(249)])},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from gguf_convert import write_gguf

    root = tmp_path_factory.mktemp("tp")
    paths = {}
    for name, (cls, extra) in MODELS.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**{**COMMON, **extra}))
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                if "norm" in pname or pname.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        hf.save_pretrained(root / name)
        _word_tokenizer(root / name)
        paths[name] = root / name
        if name == "llama":
            write_gguf(hf, root / "llama-q8_0.gguf", "llama", block_type="Q8_0")
            paths["llama-q8_0.gguf"] = root / "llama-q8_0.gguf"
    return paths


def test_two_ranks_give_one_process_logits(models, tmp_path):
    """fp32: the same logits within float rounding (the sums add in another order); int4 and a
    GGUF run as shipped: within the kernels' activation rounding (each rank rounds its own
    slice of a row-parallel layer's input to int8)."""
    jobs = {f"{name}-fp32": dict(path=str(models[name]), quant="none", ids=IDS)
            for name in ("llama", "gemma3", "qwen2", "phi3")}
    jobs["llama-int4"] = dict(path=str(models["llama"]), quant="int4", ids=IDS)
    jobs["qwen2-int4"] = dict(path=str(models["qwen2"]), quant="int4", ids=IDS)
    jobs["gguf-as-shipped"] = dict(path=str(models["llama-q8_0.gguf"]), quant="as-shipped", ids=IDS)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    done = _torchrun(str(HERE / "tp_logits.py"), str(tmp_path / "jobs.json"), str(tmp_path / "out.safetensors"))
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out.safetensors")
    for name, job in jobs.items():
        with torch.no_grad():
            expected = build(job, None)(torch.tensor([IDS]))
        if job["quant"] == "none":
            torch.testing.assert_close(got[name], expected, atol=1e-5, rtol=1e-5, msg=name)
        else:
            error = float((got[name] - expected).norm() / expected.norm())
            assert error < 0.02, (name, error)


def _generate(path, *flags, tp=False, env=None):
    args = ["generate", "-m", str(path), "-p", "The capital of France is", "--raw", "--temperature", "0",
            "--max-new-tokens", "12", "--quant", "none", "--json", *(flags or ["--no-compile"])]
    if tp:
        return _torchrun("-m", "llmrun", *args, "--tp", "2", env=env)
    return subprocess.run([sys.executable, "-m", "llmrun", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "jit"])
def test_generate_tp2_prints_the_single_process_answer_once(models, compiled):
    """Eager, and compiled by torch.compile on each rank (the all-reduces in its graphs)."""
    single = _generate(models["qwen2"])
    tp = _generate(models["qwen2"], *(["--compile-backend", "jit"] if compiled else []), tp=True)
    assert single.returncode == 0 and tp.returncode == 0, tp.stderr[-2000:]
    assert tp.stdout == single.stdout and single.stdout.strip()  # rank 0 alone prints
    stats = [json.loads(line) for line in tp.stderr.splitlines() if line.startswith("{")]
    assert len(stats) == 1 and stats[0]["generated_tokens"] == 12
    assert ("compile_s" in stats[0]) == compiled


def test_a_model_that_cannot_split_says_why(models):
    done = _generate(models["one-kv-head"], tp=True)
    assert done.returncode != 0
    assert "cannot split over 2 ranks: its 1 key/value heads do not divide by 2" in done.stderr
    assert "llmrun/" not in done.stderr  # one line from llmrun, no traceback (torchrun adds its own)


def test_tp_outside_torchrun_says_how_to_start_it(models):
    done = subprocess.run([sys.executable, "-m", "llmrun", "generate", "-m", str(models["llama"]), "-p", "x",
                           "--tp", "2", "--no-compile"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "torchrun --nproc-per-node 2 -m llmrun" in done.stderr


def test_a_rank_that_dies_ends_the_run(models, tmp_path):
    """Rank 1 exits after joining; rank 0 must not wait forever in its first all-reduce."""
    script = tmp_path / "die.py"
    script.write_text(
        "import os, sys, torch\n"
        "from llmrun.runtime import tensor_parallel\n"
        "shard = tensor_parallel.Shard(int(os.environ['RANK']), 2)\n"
        "tensor_parallel.join(shard)\n"
        "if shard.rank == 1:\n    os._exit(3)\n"
        "from llmrun.models.layers import all_ranks_sum\n"
        "all_ranks_sum(torch.ones(4))\n")
    start = time.monotonic()
    done = _torchrun(str(script), timeout=120, env={"LLMRUN_TP_TIMEOUT": "20"})
    assert done.returncode != 0 and time.monotonic() - start < 90


def test_serve_tp2_answers_as_one_process(models):
    """`serve --tp 2` under torchrun: rank 0 serves HTTP and schedules, rank 1 runs each step it
    announces. Two requests at once, through the official openai client, get the greedy answers
    of the model in one process. Ctrl-C (to the whole process group, as a terminal sends it)
    ends both: rank 0 once drained, rank 1 when rank 0's scheduler stops, not by a broken
    connection."""
    import signal
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    openai = pytest.importorskip("openai")
    from llmrun.runtime.engine import Engine, EngineOptions
    from llmrun.runtime.types import SamplingSettings

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), "-m", "llmrun", "serve", "--tp", "2", "-m", str(models["qwen2"]),
         "--quant", "none", "--no-compile", "--port", str(port), "--parallel", "2", "--ctx-size", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.communicate()[1][-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve --tp 2 did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        prompts = ["The capital of France is", "France is The capital of"]

        def complete(prompt):
            return client.completions.create(model=str(models["qwen2"]), prompt=prompt, max_tokens=10,
                                             temperature=0).choices[0].text

        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(complete, prompts))
    finally:
        os.killpg(server.pid, signal.SIGINT)
        _, err = server.communicate(timeout=60)
    assert "Connection closed" not in err and "llmrun: error" not in err, err[-3000:]
    engine = Engine.load(EngineOptions(model=str(models["qwen2"]), quant="none", compile=False))
    settings = SamplingSettings(max_new_tokens=10, temperature=0)
    for prompt, answer in zip(prompts, answers):
        alone = "".join(c.text for c in engine.stream_generate(engine.tokenizer.encode(prompt), settings))
        assert answer == alone and alone


def test_bench_tp2_puts_each_path_on_two_ranks_beside_one_process(models):
    """`llmrun bench --tp 2`: each path that splits runs in one process and then on 2 ranks
    (torchrun, a thread each); the fp32 path on its ranks decodes the one-process greedy
    tokens; the ranks' peak RSS and all-reduce time are reported. AOT paths are refused in
    one line."""
    args = [sys.executable, "-m", "llmrun", "bench", "-m", str(models["qwen2"]), "--tp", "2", "--threads", "2",
            "-p", "8", "-n", "8", "-r", "1"]
    done = subprocess.run([*args, "--paths", "default,eager-int4", "-o", "json"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    rows = {(r["path"], r["test"]): r for r in report["rows"]}
    for path in ("default", "eager-int4"):
        one, ranks = rows[(path, "tg8")], rows[(f"{path} (2 ranks)", "tg8")]
        assert one["threads"] == 2 and ranks["threads"] == 1 and ranks["tps_mean"] > 0
    match, compared = rows[("default (2 ranks)", "tg8")]["greedy_match"]
    assert compared > 0 and match == compared
    tp_run = report["paths"]["eager-int4 (2 ranks)"]
    assert len(tp_run["peak_rss_per_rank"]) == 2 and tp_run["allreduce_ms_per_token"] > 0
    refused = subprocess.run([*args, "--paths", "compiled-int4"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "AOTInductor packages do not hold" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_idle_leader_heartbeats_and_followers_replay_its_steps(tmp_path):
    """LeaderSteps and follow() alone (no model): while rank 0 is idle for longer than the
    announcements' timeout its heartbeats keep rank 1 waiting; then rank 1 runs each announced
    step on the same tensors, in order, and returns when rank 0 stops."""
    script = tmp_path / "steps.py"
    script.write_text(
        "import os, time, torch\n"
        "from datetime import timedelta\n"
        "from llmrun.runtime import tensor_parallel as tp\n"
        "shard = tp.Shard(int(os.environ['RANK']), 2)\n"
        "tp.join(shard)\n"
        "tp.HEARTBEAT, tp.IDLE_TIMEOUT = timedelta(seconds=0.2), timedelta(seconds=1)\n"
        "seen = []\n"
        "def step(kind):\n"
        "    return lambda model, cache, ids, pos, slots: seen.append((kind, ids.tolist(), pos.tolist(), slots.tolist()))\n"
        "if shard.rank == 0:\n"
        "    leader = tp.LeaderSteps(step('prefill'), step('decode'))\n"
        "    time.sleep(1.5)\n"
        "    leader.prefill(None, None, torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 2]]), torch.tensor([1]))\n"
        "    leader.decode(None, None, torch.tensor([[8], [9]]), torch.tensor([[3], [4]]), torch.tensor([1, 0]))\n"
        "    leader.stop()\n"
        "else:\n"
        "    tp.follow(None, None, step('prefill'), step('decode'))\n"
        f"open(f'{tmp_path}/seen{{shard.rank}}', 'w').write(repr(seen))\n")
    done = _torchrun(str(script), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = "[('prefill', [[5, 6, 7]], [[0, 1, 2]], [1]), ('decode', [[8], [9]], [[3], [4]], [1, 0])]"
    assert (tmp_path / "seen0").read_text() == steps == (tmp_path / "seen1").read_text()

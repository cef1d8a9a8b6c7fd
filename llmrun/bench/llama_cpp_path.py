"""The llama.cpp paths of `llmrun bench` (worker side): the same GGUF file through
llama-cpp-python, as shipped (`llama.cpp`) or requantized by llama.cpp to Q4_0
(`llama.cpp-q4_0`), timed like llmrun's paths: pp = one prefill of `pp` random tokens on a
fresh sequence, tg = `tg` single-token decode steps after a short prompt; then the greedy
tokens of the same fixed prompt (the same token ids)."""

from __future__ import annotations

import time

import numpy as np

FORMAT_OF_PATH = {"llama.cpp": "as-shipped", "llama.cpp-q4_0": "q4_0"}


def run_llama_cpp(spec, result: dict, log, repeat, timed, tg_prompt: int, warmup: int, quality_prompt: str) -> None:
    from llmrun.errors import LlmrunError
    from llmrun.peers import llama_cpp
    from llmrun.sources.hub import resolve_model
    from llmrun.tokenizer import Tokenizer

    if spec.synthetic:
        raise LlmrunError("llama.cpp runs GGUF files: no synthetic models")
    resolved = resolve_model(spec.model)
    if resolved.kind != "gguf":
        raise LlmrunError(f"llama.cpp runs GGUF files; {resolved.path} is not one")
    start = time.perf_counter()
    path = llama_cpp.model_file(resolved.path, FORMAT_OF_PATH[spec.path], log)
    quantize_s = time.perf_counter() - start
    tokenizer = Tokenizer.from_gguf(resolved.path)
    quality_ids = tokenizer.encode(quality_prompt)[:32]
    n_ctx = max(spec.pp, tg_prompt + warmup + spec.tg, len(quality_ids) + spec.quality_tokens) + 8
    start = time.perf_counter()
    llm = llama_cpp.load(path, spec.threads, n_ctx=n_ctx, n_batch=max(spec.pp, 512))
    load_s = time.perf_counter() - start
    result.update(model=resolved.path.name, load_s=load_s, quantize_s=quantize_s, compile_s=None,
                  llama_cpp_version=llama_cpp.version(), llama_cpp_file=str(path),
                  weights=f"llama.cpp {FORMAT_OF_PATH[spec.path]}",
                  weights_bytes=_tensor_bytes(path))
    log(f"load {load_s:.2f} s ({path.name}, llama-cpp-python {llama_cpp.version()})")
    rng = np.random.default_rng(spec.seed)
    vocab = llm.n_vocab()
    try:
        if spec.pp:
            ids = rng.integers(0, vocab, spec.pp).tolist()

            def prefill_once():
                llm.reset()
                llm.eval(ids)

            timed(prefill_once)
            result["tests"]["pp"] = {"n": spec.pp, "samples_s": repeat("pp", prefill_once)}
            result["pp_argmax"] = int(llama_cpp.last_logits(llm).argmax())
        if spec.tg:
            prompt = rng.integers(0, vocab, tg_prompt).tolist()
            tokens = rng.integers(0, vocab, spec.tg).tolist()

            def setup():  # untimed: a fresh sequence holding the prompt and a few warm-up steps
                llm.reset()
                llm.eval(prompt)
                for tok in tokens[:warmup]:
                    llm.eval([tok])

            def decode_once():
                for tok in tokens:
                    llm.eval([tok])

            result["tests"]["tg"] = {"n": spec.tg, "samples_s": repeat("tg", decode_once, setup)}
        result["greedy_tokens"] = llama_cpp.greedy(llm, quality_ids, spec.quality_tokens)
    finally:
        llm.close()


def _tensor_bytes(path) -> int:
    """Bytes of the file's tensor data (what a decode step reads, the tied head's table once)."""
    from llmrun.formats.gguf_reader import open_gguf

    return sum(t.n_bytes for t in open_gguf(path).tensors)

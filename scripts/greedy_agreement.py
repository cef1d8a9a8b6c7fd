"""Greedy agreement with the unquantized model, llmrun beside llama.cpp, on one GGUF file.

For each prompt of a list (default: scripts/greedy_prompts.txt, raw text, no chat template),
the same token ids go to every runtime, each continues greedily for --new-tokens tokens (EOS
ignored), and each continuation is compared with the reference's: transformers in fp32 on the
file's dequantized weights (the unquantized model). Two figures per runtime: prompts whose
first 12 characters of continuation match the reference's (the issue's measure), and tokens
matched before the first difference, summed over prompts.

    python scripts/greedy_agreement.py --model gemma3-270m [--threads 2] [--show]

Runtimes (--runs): llmrun as shipped (the default for a GGUF), llmrun-int4 (--weights int4,
asymmetric, the default int4) and llmrun-int4-symmetric, eager; llama.cpp as shipped and
llama.cpp-q4_0 (its own Q4_0 requantization), where llama-cpp-python is installed
(`pip install 'llmrun[llama-cpp]'`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

PROMPTS = Path(__file__).with_name("greedy_prompts.txt")
MATCH_CHARS = 12
DEFAULT_RUNS = ["llmrun", "llmrun-int4", "llmrun-int4-symmetric", "llama.cpp", "llama.cpp-q4_0"]


def reference_continuations(path: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32)
    hf.eval()
    out = []
    with torch.inference_mode():
        for ids in prompts:
            res = hf(input_ids=torch.tensor([ids]), use_cache=True)
            tokens = []
            for _ in range(n):
                tok = int(res.logits[0, -1].argmax())
                tokens.append(tok)
                res = hf(input_ids=torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
            out.append(tokens)
    return out


def llmrun_continuations(path: Path, prompts: list[list[int]], n: int, threads: int, quant: str, weights: str,
                         int4: str) -> list[list[int]]:
    from llmrun.runtime.engine import Engine, EngineOptions
    from llmrun.runtime.types import SamplingSettings

    engine = Engine.load(EngineOptions(model=str(path), threads=threads, quant=quant, weights=weights, int4=int4))
    settings = SamplingSettings(max_new_tokens=n, temperature=0.0)
    return [[c.token for c in engine.stream_generate(ids, settings, ignore_eos=True) if c.token is not None]
            for ids in prompts]


def llama_cpp_continuations(path: Path, prompts: list[list[int]], n: int, threads: int,
                            fmt: str) -> list[list[int]]:
    from llmrun.peers import llama_cpp

    llm = llama_cpp.load(llama_cpp.model_file(path, fmt), threads, n_ctx=max(map(len, prompts)) + n + 8)
    try:
        return [llama_cpp.greedy(llm, ids, n) for ids in prompts]
    finally:
        llm.close()


def common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "-m", default="gemma3-270m", help="alias or .gguf file (default: gemma3-270m)")
    p.add_argument("--prompts", type=Path, default=PROMPTS, help="one prompt per line")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=lambda s: s.split(","), default=DEFAULT_RUNS,
                   help=f"comma list of runtimes (default: {','.join(DEFAULT_RUNS)}; also llmrun-fp32: "
                        "llmrun's own unquantized forward)")
    p.add_argument("--show", action="store_true", help="print every continuation")
    args = p.parse_args()

    from llmrun.peers import llama_cpp
    from llmrun.sources.hub import resolve_model
    from llmrun.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model).path
    if path.suffix != ".gguf":
        sys.exit(f"{path} is not a GGUF file: this script compares runtimes on one GGUF")
    tok = Tokenizer.from_gguf(path)
    texts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    prompts = [tok.encode(t) for t in texts]
    n = args.new_tokens

    def llmrun(quant, weights="as-shipped", int4="asymmetric"):
        return lambda: llmrun_continuations(path, prompts, n, args.threads, quant, weights, int4)

    def llama(fmt):
        return lambda: llama_cpp_continuations(path, prompts, n, args.threads, fmt)

    runs = {"llmrun-fp32": llmrun("none"), "llmrun": llmrun("int4"), "llmrun-int4": llmrun("int4", "int4"),
            "llmrun-int4-symmetric": llmrun("int4", "int4", "symmetric"),
            "llama.cpp": llama("as-shipped"), "llama.cpp-q4_0": llama("q4_0")}
    unknown = set(args.runs) - set(runs)
    if unknown:
        sys.exit(f"unknown runtimes {', '.join(sorted(unknown))}: choose from {', '.join(runs)}")
    if any(r.startswith("llama.cpp") for r in args.runs) and not llama_cpp.available():
        print(f"llama.cpp rows skipped: {llama_cpp.INSTALL}", file=sys.stderr)
        args.runs = [r for r in args.runs if not r.startswith("llama.cpp")]

    print(f"reference: transformers fp32 on {path.name} (dequantized)", file=sys.stderr)
    ref = reference_continuations(path, prompts, n)

    ref_text = [tok.decode(r) for r in ref]
    rows = []
    for name in args.runs:
        print(f"running {name}", file=sys.stderr)
        got = runs[name]()
        text = [tok.decode(g) for g in got]
        chars = sum(t[:MATCH_CHARS] == r[:MATCH_CHARS] for t, r in zip(text, ref_text))
        tokens = sum(common_prefix(g, r) for g, r in zip(got, ref))
        rows.append((name, chars, tokens))
        if args.show:
            for prompt, t, r in zip(texts, text, ref_text):
                mark = "=" if t[:MATCH_CHARS] == r[:MATCH_CHARS] else "x"
                print(f"  {mark} {prompt!r}: {t!r}  (reference {r!r})", file=sys.stderr)

    print(f"| {path.name} | first {MATCH_CHARS} chars match | tokens matched (of {n * len(prompts)}) |")
    print("|---|---:|---:|")
    for name, chars, tokens in rows:
        print(f"| {name} | {chars} / {len(prompts)} | {tokens} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

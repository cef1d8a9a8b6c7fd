"""`llmrun bench`: llama-bench-style speed table for llmrun's paths beside plain PyTorch and
transformers, one model, one thread count.

    runner.py     the parent: plans the rows, runs each path in its own subprocess, gathers
    worker.py     the child (`python -m llmrun.bench.worker SPEC OUT`): builds one path's model,
                  times pp (prefill) and tg (decode) over the model's step functions, checks
                  greedy tokens, writes one JSON object
    synthetic.py  random weights of real models' shapes, built straight into the target form
    report.py     markdown / JSON / CSV
    machine.py    what the JSON records about the machine (CPU, ISA, commit, load)
"""

PATHS = ("default", "eager-int4", "compiled-bf16", "compiled-int4", "transformers", "llama.cpp")
# peers, run where installed (default paths) and reported as skipped where asked for and missing:
# transformers, and llama.cpp through llama-cpp-python on the same GGUF file (as shipped)
PEER_MODULES = {"transformers": "transformers", "llama.cpp": "llama_cpp", "llama.cpp-q4_0": "llama_cpp"}
# selectable with --paths, not run by default: llmrun's int4 path through torch.compile instead
# of AOTInductor packages (the two compile backends side by side), and a GGUF file's weights as
# shipped (exact block formats; the int4 paths re-round them) eager and compiled, and llama.cpp
# running its own Q4_0 requantization of the file (its fastest x86 format)
EXTRA_PATHS = ("jit-int4", "eager-shipped", "compiled-shipped", "llama.cpp-q4_0")


def is_quantized(path: str) -> bool:
    """Whether the path runs llmrun's quantized layers (int4, or a GGUF's blocks as shipped)."""
    return path.endswith(("int4", "shipped"))

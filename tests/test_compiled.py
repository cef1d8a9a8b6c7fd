"""The compiled paths, both backends (aot: AOTInductor packages, the default; jit:
torch.compile): nothing recompiled or rebuilt as the position advances or for a second prompt
length, no graph breaks, and the same greedy tokens as eager.

Exact token equality is asserted on the fp32 path, where compiled and eager logits agree to
~1e-5. On the int4 path the activations are rounded to int8 per row: a 1-ulp difference from a
fused norm moves a row's absmax scale and flips roundings, and on these small, already
4-bit models that moves logits by up to ~3 (measured), enough to flip near-tied argmaxes after a
few tokens. There the compiled path must still give the right answer."""

from __future__ import annotations

import pytest
import torch

from llmrun.runtime.engine import Engine, EngineOptions
from llmrun.runtime.generator import SLOT
from llmrun.runtime.types import SamplingSettings

GREEDY = SamplingSettings(max_new_tokens=24, temperature=0)
# (prompt, word the int4 answer holds), prompts these int4 models answer with a margin. After
# "The capital of France is" their top tokens lie within 0.1-0.8 logits (SmolLM2: ' Paris',
# ' located', ' approximately'; Gemma: ' the', ' a', ' which'), and rounding-level changes in
# attention flip the greedy pick (1e-6 relative noise did; so do bf16 products, measured). Top
# token margins here, fp32 / bf16 attention products: SmolLM2 1.8 / 1.3, Gemma 2.1 / 3.0.
ANSWER = {"smollm2-135m": ("The Eiffel Tower is in the city of", "Paris"),
          "gemma3-270m": ("Paris is the capital of", "France")}


def _generate(engine, prompt, n=24):
    ids = engine.tokenizer.encode(prompt)
    chunks = list(engine.stream_generate(ids, SamplingSettings(max_new_tokens=n, temperature=0),
                                         ignore_eos=True))
    return [c.token for c in chunks if c.token is not None], "".join(c.text for c in chunks)


def _load(model, quant, compile, backend="aot"):
    return Engine.load(EngineOptions(model=model, quant=quant, compile=compile, compile_backend=backend))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield


def _assert_nothing_rebuilt(engine):
    """aot: export captures a whole graph or fails, so there are no graph breaks to count; what
    must not happen is a second package for the same cache size."""
    steps = engine.generator.decode_fn.__self__  # AotSteps
    bound_before, built_before = set(steps._bound), list(steps.built)
    _generate(engine, "Once upon a time, in a land far away, there lived a", 8)
    cache = engine.generator.cache
    with torch.inference_mode():
        for pos in range(40, 60):
            steps.decode(engine.model, cache, torch.tensor([[7]]), torch.tensor([[pos]]), SLOT)
    assert steps.built == built_before
    assert set(steps._bound) == bound_before == {"prefill", "decode-b1"}
    assert cache.length == 512 and all(b.cache is cache for b in steps._bound.values())


def _assert_no_recompiles(engine):
    if engine.options.compile_backend == "aot":
        return _assert_nothing_rebuilt(engine)
    with torch.compiler.set_stance("fail_on_recompile"):
        # warm_up compiled this cache size: other positions and prompt lengths must not recompile
        _generate(engine, "Once upon a time, in a land far away, there lived a", 8)
        steps = engine.generator.decode_fn.__self__  # CompiledSteps: its raw graph, full guards
        with torch.inference_mode():
            for pos in range(40, 60):
                steps._decode(engine.model, engine.generator.cache, torch.tensor([[7]]), torch.tensor([[pos]]), SLOT)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


# Each case compiles a real model (1-3 min cold on 2 cores), so each covers what no other test
# does: exactness of both families' compiled graphs (fp32); Gemma's int4 graph with its mixed
# block formats (SmolLM2's int4 AOT packages are built and reloaded by tests/test_aot.py); jit,
# the alternative backend, on SmolLM2's int4 graph (graph breaks, recompiles).
FP32_CASES = [("smollm2-135m", "aot"), ("gemma3-270m", "aot")]
INT4_CASES = [("gemma3-270m", "aot"), ("smollm2-135m", "jit")]


@pytest.mark.parametrize("model,backend", FP32_CASES)
def test_compiled_fp32_matches_eager_exactly(model, backend):
    compiled = _load(model, "none", True, backend)
    eager = _load(model, "none", False)
    prompt = "The capital of France is"
    assert _generate(compiled, prompt)[0] == _generate(eager, prompt)[0]
    _assert_no_recompiles(compiled)


@pytest.mark.parametrize("model,backend", INT4_CASES)
def test_compiled_int4_answers_without_breaks_or_recompiles(model, backend):
    compiled = _load(model, "int4", True, backend)
    prompt, answer = ANSWER[model]
    tokens, text = _generate(compiled, prompt, 8)
    assert answer in text, text
    _assert_no_recompiles(compiled)

"""The compiled int4 path: same greedy tokens as eager, no graph breaks, no recompiles as
the position advances or for a second prompt length."""

from __future__ import annotations

import pytest
import torch

from llmrun.engine import Engine, EngineOptions
from llmrun.generation_types import SamplingSettings

GREEDY = SamplingSettings(max_new_tokens=24, temperature=0)


def _tokens(engine, prompt):
    ids = engine.tokenizer.encode(prompt)
    return [c.token for c in engine.stream_generate(ids, GREEDY, ignore_eos=True) if c.token is not None]


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_compiled_matches_eager_without_breaks_or_recompiles(model):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = Engine.load(EngineOptions(model=model, quant="int4", compile=False))
    compiled = Engine.load(EngineOptions(model=model, quant="int4", compile=True))
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    prompt = "The capital of France is"
    with torch.compiler.set_stance("fail_on_recompile"):
        # warm_up compiled for this cache size: positions and prompt lengths change, no recompile
        got = _tokens(compiled, prompt)
        _tokens(compiled, "Once upon a time, in a land far away, there lived a")
    assert got == _tokens(eager, prompt)
    assert not torch._dynamo.utils.counters["graph_break"]
    steps = compiled.generator.decode_fn.__self__  # CompiledSteps: check its raw graphs too
    with torch.compiler.set_stance("fail_on_recompile"), torch.inference_mode():
        for pos in range(40, 60):  # full guard evaluation at every position
            steps._decode(compiled.model, torch.tensor([[7]]), torch.tensor([pos]))

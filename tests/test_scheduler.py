"""The batched runtime (llmrun.runtime.scheduler) on the shipped SmolLM2 in int4 (and fp32): many
requests at once give each request the tokens it gets alone (whatever its sampling settings and
seed), a cancelled request ends at once and frees its slot, prefill of a new prompt runs
between decode steps, and a prompt that begins with what a slot holds prefills only the rest."""

from __future__ import annotations

import threading
import time

import pytest

from llmrun.errors import LlmrunError
from llmrun.runtime.engine import Engine, EngineOptions
from llmrun.runtime.scheduler import INTERLEAVED_CHUNK, Scheduler
from llmrun.runtime.types import SamplingSettings

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a",
           "def fibonacci(n):", "The three primary colors are"]
SETTINGS = [SamplingSettings(max_new_tokens=16, temperature=0),
            SamplingSettings(max_new_tokens=20, temperature=0.8, seed=3),
            SamplingSettings(max_new_tokens=9, temperature=0),
            SamplingSettings(max_new_tokens=14, temperature=0.7, top_p=0.9, top_k=40, seed=1,
                             repetition_penalty=1.2)]


@pytest.fixture(scope="module")
def engine():
    return Engine.load(EngineOptions(model="smollm2-135m", quant="int4"))


@pytest.fixture(scope="module")
def fp32_engine():
    return Engine.load(EngineOptions(model="smollm2-135m", quant="none"))


def _tokens(chunks):
    return [c.token for c in chunks if c.token is not None]


def _alone(engine, ids, settings):
    return _tokens(engine.stream_generate(ids, settings, ignore_eos=True))


@pytest.mark.parametrize("weights,batch_sizes", [("int4", None), ("int4", (4,)), ("fp32", None)],
                         ids=["int4", "int4-padded", "fp32"])
def test_batched_requests_get_the_tokens_they_get_alone(request, weights, batch_sizes):
    """Four requests on three slots (one waits for a slot), greedy and seeded sampling mixed;
    padded: every step runs 4 rows (compiled steps' static batch sizes), the extra ones repeats.
    Every row is computed alike whatever the batch: the tokens are exactly equal."""
    engine = request.getfixturevalue("engine" if weights == "int4" else "fp32_engine")
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    expected = [_alone(engine, i, s) for i, s in zip(ids, SETTINGS)]
    scheduler = Scheduler(engine.model, engine.tokenizer, 3, 256, batch_sizes=batch_sizes)
    try:
        requests = [scheduler.submit(i, s, ignore_eos=True) for i, s in zip(ids, SETTINGS)]
        results = [list(r) for r in requests]
    finally:
        scheduler.close()
    assert [_tokens(chunks) for chunks in results] == expected
    for chunks, settings in zip(results, SETTINGS):
        stats = chunks[-1].stats
        assert chunks[-1].finished and stats.finish_reason == "length"
        assert stats.generated_tokens == settings.max_new_tokens and stats.decode_tps > 0


def test_cancel_ends_a_request_at_once_and_frees_its_slot(engine):
    tok = engine.tokenizer
    scheduler = engine.scheduler(1, 512)
    try:
        long = scheduler.submit(tok.encode(PROMPTS[1]), SamplingSettings(max_new_tokens=400), ignore_eos=True)
        waiting = scheduler.submit(tok.encode(PROMPTS[0]), SamplingSettings(max_new_tokens=4), ignore_eos=True)
        never = scheduler.submit(tok.encode(PROMPTS[2]), SamplingSettings(max_new_tokens=4), ignore_eos=True)
        never.cancel()  # still waiting for the one slot
        got = []
        for chunk in long:
            got.append(chunk)
            if len(got) == 3:
                long.cancel()
        assert got[-1].stats.finish_reason == "cancelled" and 3 <= got[-1].stats.generated_tokens <= 5
        assert [c.stats.finish_reason for c in never] == ["cancelled"]
        assert _tokens(waiting) == _alone(engine, tok.encode(PROMPTS[0]), SamplingSettings(max_new_tokens=4))
    finally:
        scheduler.close()


def test_a_new_prompt_prefills_in_chunks_between_decode_steps(engine):
    tok = engine.tokenizer
    scheduler = engine.scheduler(2, 1024)
    try:
        running = scheduler.submit(tok.encode(PROMPTS[0]), SamplingSettings(max_new_tokens=200), ignore_eos=True)
        arrivals = []
        reader = threading.Thread(target=lambda: arrivals.extend(time.perf_counter() for _ in running))
        reader.start()
        while len(arrivals) < 2:
            time.sleep(0.01)
        long_prompt = tok.encode(" ".join(["a quick brown fox jumps over the lazy dog"] * 40))
        assert len(long_prompt) > 2 * INTERLEAVED_CHUNK
        submitted = time.perf_counter()
        first = next(iter(scheduler.submit(long_prompt, SamplingSettings(max_new_tokens=2))))
        answered = time.perf_counter()
        running.cancel()
        reader.join()
    finally:
        scheduler.close()
    assert first.token is not None
    # three chunks of the new prompt, each followed by a decode step of the running stream
    assert sum(submitted < t < answered for t in arrivals) >= 2


def test_a_prompt_that_begins_with_a_slots_tokens_prefills_only_the_rest(fp32_engine):
    """The reused positions include an answer's, whose keys and values decode steps wrote: the
    same tokens as a full prefill wherever prefill and decode attention both sum exactly in fp32
    (the int4 models' prefill multiplies in bf16 on CPUs with AVX512-BF16, models.layers)."""
    engine = fp32_engine
    tok = engine.tokenizer
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    scheduler = engine.scheduler(2, 512)
    try:
        first = tok.encode(PROMPTS[1])
        answer = _tokens(scheduler.submit(first, greedy))
        other = list(scheduler.submit(tok.encode(PROMPTS[2]), greedy))  # takes the other slot
        assert other[-1].stats.reused_tokens == 0
        turn = first + answer + tok.encode(" Then")[-1:]
        chunks = list(scheduler.submit(turn, greedy))
    finally:
        scheduler.close()
    assert chunks[-1].stats.reused_tokens == len(first) + len(answer) - 1
    assert _tokens(chunks) == _tokens(engine.stream_generate(turn, greedy))


def test_bad_requests_fail_in_the_callers_thread(engine):
    scheduler = engine.scheduler(1, 64)
    try:
        with pytest.raises(LlmrunError, match="empty"):
            scheduler.submit([], SamplingSettings())
        with pytest.raises(LlmrunError, match="context is 64"):
            scheduler.submit(list(range(100)), SamplingSettings())
        with pytest.raises(LlmrunError, match="top-p"):
            scheduler.submit([1, 2], SamplingSettings(top_p=0))
    finally:
        scheduler.close()


def test_a_prompt_gives_the_same_logits_however_it_is_split_or_reused(engine):
    """Chunks and reuse never leave one token alone (sequence.prefill_end): every split of a
    prompt into prefill chunks gives exactly the logits of one whole prefill."""
    import torch

    from llmrun.runtime.generator import prefill
    from llmrun.runtime.kv_cache import KVCache
    from llmrun.runtime.sequence import prefill_end, reusable

    assert [prefill_end(0, n, 512) for n in (1, 2, 512, 513, 514)] == [1, 2, 512, 511, 512]
    assert prefill_end(5, 6, 128) == 6 and reusable([1, 2, 3], [1, 2, 3]) == 1 and reusable([1], [1]) == 0
    ids = engine.tokenizer.encode(" ".join(PROMPTS) * 3)
    n = len(ids)
    cache = KVCache(engine.model.config, 1, 512, torch.float32)
    slot = torch.tensor([0])

    def logits_of(chunk: int, reused: int) -> torch.Tensor:
        if reused:
            prefill(engine.model, cache, torch.tensor([ids[:reused]]), torch.arange(reused)[None], slot)
        lo = reused
        while lo < n:
            hi = prefill_end(lo, n, chunk)
            out = prefill(engine.model, cache, torch.tensor([ids[lo:hi]]), torch.arange(lo, hi)[None], slot)
            lo = hi
        return out[0, -1]

    with torch.inference_mode():
        whole = logits_of(n, 0)
        for chunk, reused in [(n - 1, 0), (7, 0), (n, reusable(ids, ids)), (16, 20)]:
            assert torch.equal(logits_of(chunk, reused), whole), (chunk, reused)


def _resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_the_cache_takes_memory_for_the_positions_written(engine):
    """A scheduler's cache of 8 slots x 2048 positions (720 MiB on SmolLM2) is zeros that take
    memory only where positions are written: made, and read in full, it adds a small share of
    its bytes to the process's resident size (what else the process allocates meanwhile); a
    request of ~20 positions adds about its share."""
    import torch

    from llmrun.runtime.kv_cache import KVCache

    before = _resident_bytes()
    cache = KVCache(engine.config, 8, 2048, torch.float32)
    assert _resident_bytes() - before < cache.nbytes / 10
    assert all(not bool(t.any()) for t in cache.buffers())  # reads see zeros, and map no memory
    assert _resident_bytes() - before < cache.nbytes / 10
    scheduler = Scheduler(engine.model, engine.tokenizer, 8, 2048)
    try:
        before = _resident_bytes()
        list(scheduler.submit(engine.prompt_ids(PROMPTS[0]), SETTINGS[0], ignore_eos=True))
        # 16 positions a 4 KiB page per (layer, k or v, kv head): 2 pages of each, in one slot
        assert _resident_bytes() - before < scheduler.cache.nbytes / 10
    finally:
        scheduler.close()

"""int4 on the shipped real models: still right answers, logits close to fp32, and the
saved quantized directory loads back to the same outputs without the original weights."""

from __future__ import annotations

import pytest
import torch

from llmrun.formats.checkpoint import load_model, open_checkpoint
from llmrun.quant.transform import QuantTransform
from llmrun.runtime.generator import Generator
from llmrun.runtime.types import SamplingSettings

# (prompt, word the int4 answer holds): see tests/test_compiled.py for why Gemma's differs
ANSWER = {"smollm2": ("The capital of France is", "Paris"), "gemma3": ("Paris is the capital of", "France")}
PROMPT = ("The quick brown fox jumps over the lazy dog. Meanwhile, in a small village by the "
          "sea, an old fisherman was mending his nets and telling stories about")


@pytest.fixture(scope="module", params=[("smollm2", 0), ("smollm2", 32), ("gemma3", 32)],
                ids=lambda p: f"{p[0]}-g{p[1]}")
def quantized(request, smollm2_path, gemma3_path):
    name, group = request.param
    path = smollm2_path if name == "smollm2" else gemma3_path
    model = load_model(open_checkpoint(path, "gguf"), torch.float32, QuantTransform(group))
    return name, group, path, model


def test_capital_of_france(quantized):
    from llmrun.tokenizer import Tokenizer

    name, group, path, model = quantized
    tok = Tokenizer.from_gguf(path)
    gen = Generator(model, tok)
    prompt, answer = ANSWER[name]
    text = "".join(c.text for c in gen.stream(tok.encode(prompt), SamplingSettings(max_new_tokens=8, temperature=0)))
    assert answer in text, text


# Perplexity of the int4 model over that of the fp32 one on 1024 tokens of the shipped text
# (window 512, stride 256). Bounds from measurement with some margin (docs/eval.md has the
# full table): these small models were already 4-5 bit GGUFs, and per-channel int4 on top
# costs them much more than group-wise does.
PPL_RATIO_BOUND = {("smollm2", 0): 2.6, ("smollm2", 32): 1.4, ("gemma3", 32): 1.55}


def test_perplexity_close_to_fp32(quantized, request):
    from pathlib import Path

    import llmrun
    from llmrun.eval.perplexity import perplexity
    from llmrun.tokenizer import Tokenizer

    name, group, path, model = quantized
    ref = request.getfixturevalue(f"{name}_pair")[0]
    tok = Tokenizer.from_gguf(path)
    text = (Path(llmrun.__file__).parent / "data" / "alice29.txt").read_text()
    ids = tok.encode(text)[:1024]
    with torch.no_grad():
        ratio = perplexity(model, ids, 512, 256).ppl / perplexity(ref, ids, 512, 256).ppl
    print(f"{name} g{group}: int4/fp32 perplexity ratio {ratio:.3f}")
    assert 1.0 <= ratio < PPL_RATIO_BOUND[(name, group)], ratio


def test_rescored_head_answers_as_the_int8_head(quantized, tmp_path):
    """`--head int4-rescored` (an int4 copy scores the vocabulary, the top 256 are recomputed
    from the int8 table): the int8 head's greedy tokens, perplexity within 2% of it (measured:
    SmolLM2 +0.5%, Gemma 3 +1.5% on these tokens; +0.3% / +0.5% over 8192 tokens of the text),
    one int8 table shared with the embedding, and a saved directory that loads back."""
    from pathlib import Path

    import llmrun
    from llmrun.eval.perplexity import perplexity
    from llmrun.formats.quantized_dir import load_quantized, save_quantized
    from llmrun.kernels import RescoredLinear
    from llmrun.tokenizer import Tokenizer

    name, group, path, model = quantized
    if group != 32:
        pytest.skip("the default layers' scheme is enough")
    rescored = load_model(open_checkpoint(path, "gguf"), torch.float32, QuantTransform(group, head="int4-rescored"))
    assert isinstance(rescored.lm_head, RescoredLinear)
    assert rescored.model.embed_tokens._head[0] is rescored.lm_head.exact
    tok = Tokenizer.from_gguf(path)
    settings = SamplingSettings(max_new_tokens=24, temperature=0)
    prompt = tok.encode(PROMPT)
    tokens = [[c.token for c in Generator(m, tok).stream(prompt, settings) if c.token is not None]
              for m in (model, rescored)]
    if tokens[0] != tokens[1]:  # only where the int8 head's own top two tie (its logits come in bf16 steps)
        first = next(i for i, (a, b) in enumerate(zip(*tokens)) if a != b)
        with torch.no_grad():
            top = model(torch.tensor([prompt + tokens[0][:first]]))[0, -1].topk(2).values
        assert float(top[0] - top[1]) <= 2 ** -3, (first, tokens)
    ids = tok.encode((Path(llmrun.__file__).parent / "data" / "alice29.txt").read_text())[:1024]
    with torch.no_grad():
        ratio = perplexity(rescored, ids, 512, 256).ppl / perplexity(model, ids, 512, 256).ppl
    print(f"{name}: rescored/int8 head perplexity ratio {ratio:.4f}")
    assert abs(ratio - 1) < 0.02, ratio
    out = tmp_path / "q"
    save_quantized(rescored, tok, {"quant": "int4", "group_size": group, "head": "int4-rescored"}, out)
    loaded = load_quantized(out, torch.float32)
    assert loaded.model.embed_tokens._head[0] is loaded.lm_head.exact
    with torch.no_grad():
        x = torch.tensor([ids[:16]])
        torch.testing.assert_close(loaded(x), rescored(x))


def test_saved_directory_loads_back(quantized, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from llmrun.formats.quantized_dir import load_quantized, save_quantized
    from llmrun.quant.transform import TiedEmbedding
    from llmrun.tokenizer import Tokenizer

    name, group, path, model = quantized
    if name != "smollm2":
        pytest.skip("one model is enough for the round trip")
    tok = Tokenizer.from_gguf(path)
    out = tmp_path / "q"
    save_quantized(model, tok, {"quant": "int4", "group_size": group, "head": "int8"}, out)
    loaded = load_quantized(out, torch.float32)
    ids = torch.tensor([tok.encode(PROMPT)[:16]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
    # the tied int8 table exists once: in memory (the embedding reads the head's rows) and on disk
    for m in (model, loaded):
        assert isinstance(m.model.embed_tokens, TiedEmbedding) and m.model.embed_tokens._head[0] is m.lm_head
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert "lm_head.qweight" in f.keys() and not any(k.startswith("model.embed_tokens") for k in f.keys())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    # a file of the earlier layout (the table saved as the embedding's) loads to one table too
    tensors["model.embed_tokens.qweight"] = tensors.pop("lm_head.qweight")
    tensors["model.embed_tokens.scales"] = tensors.pop("lm_head.scales")
    save_file(tensors, out / "model.safetensors", metadata=metadata)
    older = load_quantized(out, torch.float32)
    assert older.model.embed_tokens._head[0] is older.lm_head
    with torch.no_grad():
        torch.testing.assert_close(older(ids), model(ids))
    reloaded_tok = Tokenizer.from_hf_dir(out)
    assert reloaded_tok.encode(PROMPT) == tok.encode(PROMPT)
    assert reloaded_tok.eos_ids == tok.eos_ids
    with pytest.raises(Exception, match="already exists"):
        save_quantized(model, tok, {"quant": "int4", "group_size": group, "head": "int8"}, out)


def test_int4_head_option_has_its_own_cache_entry(smollm2_path, tmp_path, monkeypatch):
    """`--head int4`: the head runs the int4 kernel, and its quantized cache entry is not the
    default scheme's (one must never be loaded for the other)."""
    from llmrun.formats.quantized_dir import cache_path
    from llmrun.kernels.block_linear import BlockLinear
    from llmrun.runtime.engine import Engine, EngineOptions

    shipped = "as-shipped"  # the engine's default weights for a GGUF file
    assert cache_path(smollm2_path, "int4", 32, "int4", shipped) != cache_path(smollm2_path, "int4", 32,
                                                                               weights=shipped)
    assert cache_path(smollm2_path, "int4", 32, weights="int4") != cache_path(smollm2_path, "int4", 32,
                                                                              weights=shipped)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    engine = Engine.load(EngineOptions(model="smollm2-135m", quant="int4", head="int4"))
    head = engine.model.lm_head  # int4 like the layers: asymmetric groups by default
    assert isinstance(head, BlockLinear) and head.bits == 4 and head.group_size == 32
    assert cache_path(smollm2_path, "int4", 32, "int4", shipped).is_dir()
    assert cache_path(smollm2_path, "int4", 32, "int4", "int4", "symmetric") != cache_path(
        smollm2_path, "int4", 32, "int4", "int4", "asymmetric")
    # not "The capital of France is": with an int4 head its top two (' ', ' Paris') lie within
    # 0.2 logits, flipped by rounding noise; here ' Paris' leads by 1.1
    ids = engine.tokenizer.encode("The Eiffel Tower is in the city of")
    text = "".join(c.text for c in engine.stream_generate(ids, SamplingSettings(max_new_tokens=8, temperature=0)))
    assert "Paris" in text, text


def test_an_untied_head_never_lends_its_table_to_the_embedding(monkeypatch):
    """The transform keys a tied head's table by its weight's id; ids are reused once objects
    are freed (an untied head's weight goes when its layer is replaced, and safetensors lists
    lm_head before model.embed_tokens), so here every id collides: the embedding must still get
    its own table, and a tied pair (one Parameter) still shares one."""
    from torch import nn

    import llmrun.quant.transform as transform
    from llmrun.quant.transform import Int8Embedding, TiedEmbedding

    monkeypatch.setattr(transform, "id", lambda obj: 1, raising=False)
    torch.manual_seed(0)
    head, embedding = nn.Linear(64, 128, bias=False), nn.Embedding(128, 64)
    quant = QuantTransform(32, head="int8")
    quant("lm_head", head)
    del head
    got = quant("model.embed_tokens", embedding)
    assert isinstance(got, Int8Embedding)
    rows = torch.tensor([0, 5, 127])
    torch.testing.assert_close(got(rows), embedding(rows), atol=0.02, rtol=0.02)
    tied = nn.Linear(64, 128, bias=False)
    tied_embedding = nn.Embedding(128, 64)
    tied_embedding.weight = tied.weight
    quant("lm_head", tied)
    assert isinstance(quant("model.embed_tokens", tied_embedding), TiedEmbedding)

"""Tiny random-weight models of every family, built by transformers from configs and saved
with save_pretrained (and written as GGUF as llama.cpp's converter writes them), loaded by
llmrun: the logits must agree with transformers', greedy tokens too."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmrun.formats.checkpoint import load_model, open_checkpoint  # noqa: E402

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

PHI3_TOKENS = dict(pad_token_id=None, bos_token_id=1, eos_token_id=2)  # its defaults lie past 512
LLAMA_31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                 "rope_theta": 500000.0}

CASES = {
    "llama2": ("LlamaConfig", dict(rms_norm_eps=1e-5)),
    "llama3.1-rope-scaling": ("LlamaConfig", dict(rope_parameters=LLAMA_31_ROPE)),
    "llama3.2-tied": ("LlamaConfig", dict(tie_word_embeddings=True, head_dim=32)),
    "gemma": ("GemmaConfig", dict(head_dim=32)),
    "gemma2": ("Gemma2Config", dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=32,
                                        layer_types=["sliding_attention", "full_attention"] * 2,
                                        rope_parameters={
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                               "rope_theta": 1000000.0}})),
    "qwen2.5-tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen2.5-yarn": ("Qwen2Config", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                          "original_max_position_embeddings": 64})),
    "qwen2-sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "mistral-v0.1": ("MistralConfig", dict(sliding_window=8)),
    "mistral-v0.3": ("MistralConfig", dict(sliding_window=None, head_dim=32)),
    "phi3-sliding": ("Phi3Config", dict(sliding_window=8, **PHI3_TOKENS)),
    # positions from 16 on take the long factors (transformers: a call reaching position 16)
    "phi3.5-longrope": ("Phi3Config", dict(original_max_position_embeddings=16, **PHI3_TOKENS, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
        "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.3 * i for i in range(8)]})),
}
# GGUF architecture of each case (and config changes). llama.cpp runs Qwen 2, Mistral and Phi-3
# with full attention (its converters keep no window for the first two, and it turns Phi-3's
# off), so their GGUF cases have none; GGUF has no query_pre_attn_scalar (llama.cpp scales by
# head_dim).
GGUF_CASES = {"llama2": ("llama", {}), "llama3.2-tied": ("llama", {}),
              "gemma2": ("gemma2", dict(query_pre_attn_scalar=32)), "gemma3": ("gemma3", {}),
              "qwen2.5-tied": ("qwen2", {}), "qwen2.5-yarn": ("qwen2", {}), "qwen3": ("qwen3", {}),
              "mistral-v0.3": ("llama", {}), "phi3-sliding": ("phi3", dict(sliding_window=None)), "phi3.5-longrope": ("phi3", {})}


def _tiny(name: str, **changes):
    config_cls, extra = CASES[name]
    config = getattr(transformers, config_cls)(**COMMON, **{**extra, **changes})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # norms start at 0/1 and biases at 0 in HF init: randomize them
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _save_tiny(name: str, directory, shard: bool = False):
    model = _tiny(name)
    model.save_pretrained(directory, max_shard_size="100KB" if shard else "5GB")
    return model


def _greedy(model, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens of llmrun's model: one prefill into a KV cache, then one token a step."""
    from llmrun.runtime.kv_cache import KVCache

    cache = KVCache(model.config, 1, prompt.shape[1] + steps, torch.float32)
    with torch.no_grad():
        logits = model(prompt, torch.arange(prompt.shape[1])[None], cache, last_only=True)
        tokens = []
        for i in range(steps):
            tokens.append(int(logits[0, -1].argmax()))
            pos = torch.tensor([[prompt.shape[1] + i]])
            logits = model(torch.tensor([[tokens[-1]]]), pos, cache)
    return tokens


def _assert_greedy_is_transformers(ours, hf, prompt, steps=12):
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                               pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert _greedy(ours, prompt, steps) == expected


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, tmp_path):
    hf = _save_tiny(name, tmp_path, shard=name == "llama2")
    if name == "llama2":
        assert (tmp_path / "model.safetensors.index.json").is_file(), "expected a sharded save"
    ours = load_model(open_checkpoint(tmp_path, "hf-dir"), torch.float32)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    _assert_greedy_is_transformers(ours, hf, ids[:, :6])


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_gguf_conversion_matches_transformers(name, tmp_path):
    """The same tiny model written as llama.cpp's converter writes it: llmrun reads the family's
    metadata and tensor conventions back to transformers' logits."""
    from gguf_convert import write_gguf

    arch, changes = GGUF_CASES[name]
    hf = _tiny(name, **changes)
    write_gguf(hf, tmp_path / "m.gguf", arch)
    ours = load_model(open_checkpoint(tmp_path / "m.gguf", "gguf"), torch.float32)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["fp32-cache", "bf16-cache"])
@pytest.mark.parametrize("kernels", [True, False], ids=["cache-kernels", "masked"])
# phi3.5-longrope is left out: its rope switches to the long factors when a call reaches position
# 16, so keys cached before then differ from a full forward's (as in transformers)
@pytest.mark.parametrize("name", ["gemma2", "gemma3", "llama3.2-tied", "qwen2-sliding", "qwen3", "phi3-sliding"])
def test_kv_cache_decode_equals_full_forward(name, kernels, kv_dtype, tmp_path):
    """Two sequences of different lengths in one cache (slots 2 and 0 of 3): each prefilled
    alone, then a chunk and decode steps of both rows in one call at their own positions
    (past the 8-position sliding window), equal each sequence's own full forward. Both the
    cache attention kernels (where this CPU has them) and the masked attention over slots; a
    bf16 cache within its rounding (keys and values to 8 bits of mantissa)."""
    from llmrun.kernels.attention import cache_attention_available
    from llmrun.runtime.kv_cache import KVCache

    _save_tiny(name, tmp_path)
    model = load_model(open_checkpoint(tmp_path, "hf-dir"), torch.float32)
    if kernels and not cache_attention_available():
        pytest.skip("no cache attention kernels here")
    model.configure(kernels=kernels)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = [model(ids[:1]), model(ids[1:, :14])]  # (1, 20, vocab), (1, 14, vocab)
        cache = KVCache(model.config, 3, 64, kv_dtype)
        slots = torch.tensor([2, 0])
        a = [model(ids[:1, :9], torch.arange(9)[None], cache, slots[:1])]  # row 0: positions 0..8
        b = [model(ids[1:, :3], torch.arange(3)[None], cache, slots[1:])]  # row 1: 0..2
        pos = torch.stack([torch.arange(9, 12), torch.arange(3, 6)])  # a chunk of 3 each, (2, 3)
        both = model(torch.stack([ids[0, 9:12], ids[1, 3:6]]), pos, cache, slots)
        a.append(both[:1]), b.append(both[1:])
        for i in range(8):  # decode steps: row 0 at 12..19, row 1 at 6..13
            step = model(torch.tensor([[ids[0, 12 + i]], [ids[1, 6 + i]]]), torch.tensor([[12 + i], [6 + i]]),
                         cache, slots)
            a.append(step[:1]), b.append(step[1:])
    # bf16: measured within 2.3e-3 of logits up to 0.7 in size
    atol, rtol = (1e-4, 1e-4) if kv_dtype == torch.float32 else (6e-3, 0.0)
    torch.testing.assert_close(torch.cat(a, 1), full[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(torch.cat(b, 1), full[1], atol=atol, rtol=rtol)


def test_compiled_gelu_tanh_is_torchs():
    """Compiled, gelu_tanh takes the sigmoid form (faster in inductor): same values as torch's
    op, extremes included (x^3 overflowing to inf must still give 0 and x)."""
    import torch.nn.functional as F

    from llmrun.models.layers import gelu_tanh

    x = torch.cat([torch.linspace(-20, 20, 4001), torch.tensor([-1e4, 1e4, -1e20, 1e20, 0.0])])
    torch._dynamo.reset()
    got = torch.compile(gelu_tanh, fullgraph=True)(x)
    torch.testing.assert_close(got, F.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2.5-tied", "qwen3", "mistral-v0.3", "phi3.5-longrope"])
def test_int4_and_as_shipped_run_each_family(name, tmp_path):
    """A Q8_0 GGUF of each new family runs through the kernels as shipped (every layer keeps
    the file's blocks) and quantized to int4, each close to the file's dequantized weights in
    fp32. Measured relative errors: as shipped 0.007-0.011, int4 0.11-0.19 (random weights: the
    same as Llama's tiny models, 0.12-0.19)."""
    from gguf_convert import write_gguf

    from llmrun.kernels.block_linear import BlockLinear
    from llmrun.quant.transform import QuantTransform, prepare_int4_model

    write_gguf(_tiny(name), tmp_path / "m.gguf", GGUF_CASES[name][0], block_type="Q8_0")
    ref = load_model(open_checkpoint(tmp_path / "m.gguf", "gguf"), torch.float32)
    shipped = load_model(open_checkpoint(tmp_path / "m.gguf", "gguf", keep_blocks=True), torch.float32,
                         QuantTransform(32))
    int4 = load_model(open_checkpoint(tmp_path / "m.gguf", "gguf"), torch.float32, QuantTransform(32))
    for model in (shipped, int4):
        prepare_int4_model(model)
    for layer in shipped.model.layers:
        assert isinstance(layer.self_attn.qkv_proj, BlockLinear) and isinstance(layer.mlp.gate_up_proj, BlockLinear)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids)
        errors = {kind: float((m(ids) - expected).norm() / expected.norm()) for kind, m in
                  (("as-shipped", shipped), ("int4", int4))}
    assert errors["as-shipped"] < 0.03 and errors["int4"] < 0.4, errors


@pytest.mark.parametrize("name", list(CASES))
def test_config_survives_the_quantized_format(name, tmp_path):
    """A quantized directory's config.json (llmrun.formats.quantized_dir) gives back the same
    config, rope factors and all."""
    import json

    from llmrun.formats.quantized_dir import config_from_dict, config_to_dict
    from llmrun.models import config_from_hf

    _tiny(name).config.save_pretrained(tmp_path)
    cfg = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_partial_rotary_models_are_refused_in_one_line(tmp_path):
    """Rope over part of each head (Phi-4-mini, a phi3 model_type) is not run: config.json and
    GGUF both say so rather than give wrong logits."""
    from gguf_convert import write_gguf

    from llmrun.errors import LlmrunError

    hf = _tiny("phi3-sliding", partial_rotary_factor=0.5)
    hf.save_pretrained(tmp_path / "hf")
    write_gguf(hf, tmp_path / "m.gguf", "phi3")
    with pytest.raises(LlmrunError, match="partial_rotary_factor 0.5"):
        open_checkpoint(tmp_path / "hf", "hf-dir")
    with pytest.raises(LlmrunError, match="rope covers 8 of each head's 16 dimensions"):
        open_checkpoint(tmp_path / "m.gguf", "gguf")

"""Tokenizers and chat templates of the families beyond Llama and Gemma, on real data: llama.cpp's
vocabulary-only GGUF files of Qwen 2 and Phi-3 with the ids their Hugging Face tokenizers give
for hard strings, Mistral 7B's tokenizer.model beside transformers', and the real chat templates
of Qwen 2.5, Qwen 3, Phi-3.5 and Mistral Nemo rendered beside transformers' apply_chat_template."""

from __future__ import annotations

import pytest

from llmrun.tokenizer import Tokenizer
from llmrun.tokenizer.chat_template import render_chat_template

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("vocab", ["qwen2", "phi-3", "llama-spm"])
def test_vocab_ids_match_the_reference_tokenizer(llama_cpp_models, vocab):
    path = llama_cpp_models / f"ggml-vocab-{vocab}.gguf"
    tok = Tokenizer.from_gguf(path)
    texts = (path.parent / f"{path.name}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = (path.parent / f"{path.name}.out").read_text().split("\n")
    assert len(texts) >= 40
    for text, ids in zip(texts, expected):
        assert tok.encode(text, add_bos=False) == [int(i) for i in ids.split()], repr(text)


@pytest.mark.parametrize("model", ["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3"],
                         ids=["mistral-7b-v0.1", "mistral-7b-v0.3"])
def test_mistral_tokenizer_model_ids_match_transformers(llama_cpp_models, mistral_tokenizers, model, tmp_path):
    """Mistral 7B's tokenizer.model (as mistral-common ships it) in a Hugging Face directory:
    llmrun's ids equal those of transformers' tokenizer converted from the same file, on
    llama.cpp's hard strings and Mistral's control tokens."""
    import json

    (tmp_path / "tokenizer.model").write_bytes((mistral_tokenizers / model).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    ours = Tokenizer.from_hf_dir(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = (llama_cpp_models / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8").split(
        "\n__ggml_vocab_test__\n")
    for text in texts + ["[INST] What is 2 + 2? [/INST]", "[TOOL_CALLS] [AVAILABLE_TOOLS]", "</s><s>x"]:
        assert ours.encode(text, add_bos=False) == theirs.encode(text, add_special_tokens=False), repr(text)
    assert ours.encode("Hi") == theirs.encode("Hi")  # BOS first


@pytest.mark.parametrize("vocab, stops", [("qwen2", ["<|im_end|>", "<|endoftext|>"]),
                                          ("phi-3", ["<|end|>", "<|endoftext|>"])])
def test_every_end_token_of_the_family_stops(llama_cpp_models, vocab, stops):
    tok = Tokenizer.from_gguf(llama_cpp_models / f"ggml-vocab-{vocab}.gguf")
    for text in stops:
        (token,) = tok.encode(text, add_bos=False)
        assert token in tok.eos_ids, text


SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 🗾 Answer in 日本語."},
]
THINKING = [
    {"role": "system", "content": "Think first."},
    {"role": "user", "content": "2 + 2?"},
    {"role": "assistant", "content": "<think>\nTwo and two make four.\n</think>\n\n4."},
    {"role": "user", "content": "And 3 + 3?"},
]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_TURNS = [
    {"role": "system", "content": "You can look up the weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"temperature\": 18}"},
]

CASES = {
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct", CONVERSATION, {}),
    "qwen2.5-tools": ("Qwen-Qwen2.5-7B-Instruct", TOOL_TURNS, {"tools": [WEATHER_TOOL]}),
    "qwen3-thinking": ("Qwen-Qwen3-0.6B", THINKING, {}),
    "qwen3-no-thinking": ("Qwen-Qwen3-0.6B", THINKING, {"enable_thinking": False}),
    "qwen3-tools": ("Qwen-Qwen3-0.6B", TOOL_TURNS, {"tools": [WEATHER_TOOL]}),
    "phi3.5": ("microsoft-Phi-3.5-mini-instruct", CONVERSATION, {}),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407", CONVERSATION, {}),
    "mistral-nemo-tools": ("mistralai-Mistral-Nemo-Instruct-2407", CONVERSATION, {"tools": [WEATHER_TOOL]}),
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A transformers tokenizer with the same special tokens: its apply_chat_template is the
    reference renderer."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models

    raw = RawTokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, **SPECIAL)


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["prompt", "no-prompt"])
@pytest.mark.parametrize("case", list(CASES))
def test_real_templates_render_as_transformers_renders_them(llama_cpp_models, hf_tokenizer, case,
                                                             add_generation_prompt):
    name, messages, kwargs = CASES[case]
    template = (llama_cpp_models / "templates" / f"{name}.jinja").read_text()
    theirs = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                              add_generation_prompt=add_generation_prompt, **kwargs)
    ours = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                special_tokens=SPECIAL, **kwargs)
    assert ours == theirs
    if case == "qwen3-no-thinking" and add_generation_prompt:
        assert ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_generate_no_think_turns_qwen3_thinking_off(llama_cpp_models, tmp_path):
    """`llmrun generate --no-think` renders Qwen 3's template with enable_thinking=false: the
    prompt opens the answer with an empty think block (a tiny Qwen 3 with a word-level
    tokenizer, through the real CLI)."""
    import json
    import subprocess
    import sys

    import torch
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers

    config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=256, bos_token_id=None, eos_token_id=1)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    words = ["<unk>", "<|im_end|>", "<|im_start|>", "<think>", "</think>", "user", "assistant", "hi"]
    words += [f"w{i}" for i in range(64 - len(words))]
    raw = RawTokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.save(str(tmp_path / "tokenizer.json"))
    template = (llama_cpp_models / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": template}))

    def prompt_tokens(*flags):
        done = subprocess.run([sys.executable, "-m", "llmrun", "generate", "-m", str(tmp_path), "-p", "hi",
                               "--max-new-tokens", "1", "--no-compile", "--quant", "none", "--json", *flags],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stderr.strip().splitlines()[-1])["prompt_tokens"]

    # "<think>\n\n</think>\n\n" splits on whitespace into the two tags
    assert prompt_tokens("--no-think") == prompt_tokens() + 2

"""Control tokens are not text: generation never prints them, whatever the weights emit."""

from __future__ import annotations

import torch

from llmrun.formats.checkpoint import load_model, open_checkpoint
from llmrun.runtime.generator import Generator
from llmrun.runtime.types import SamplingSettings
from llmrun.tokenizer import Tokenizer


def test_gemma3_image_placeholders_are_control_tokens(gemma3_path):
    """The GGUF types them user-defined; Gemma 3's tokenizer (and so llmrun) calls them special."""
    tok = Tokenizer.from_gguf(gemma3_path)
    for placeholder in ("<start_of_image>", "<end_of_image>"):
        ids = tok.encode(placeholder)
        assert ids[-1] in tok.special_ids and tok.decode(ids[-1:]) == placeholder
    ids = tok.encode("a<start_of_image>b<end_of_image><end_of_turn>")
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.decode(tok.encode("x<table>"), skip_special_tokens=True) == "x<table>"  # user-defined markup is text


def test_generated_control_tokens_are_not_printed(gemma3_path):
    """Steps that pick `<start_of_image>`, `<unused0>` and `<start_of_turn>` between text tokens
    (the real model's steps, with the logits of those picks forced): generation goes on, the
    text has none of them, the tokens are still reported."""
    tok = Tokenizer.from_gguf(gemma3_path)
    model = load_model(open_checkpoint(gemma3_path, "gguf"), torch.float32)
    forced = [tok.encode("<start_of_image>")[-1], tok.encode(" Paris")[-1], tok.encode("<unused0>")[-1],
              tok.encode("<start_of_turn>")[-1], tok.encode(".")[-1]]
    step = iter(forced)

    def pick(logits):
        out = torch.full_like(logits, -1e9)
        out[..., next(step)] = 0.0
        return out

    gen = Generator(model, tok, prefill_fn=lambda m, cache, ids, pos, slots: pick(m(ids, pos, cache, slots, last_only=True)),
                    decode_fn=lambda m, cache, t, pos, slots: pick(m(t, pos, cache, slots)))
    chunks = list(gen.stream(tok.encode("The capital of France is"),
                             SamplingSettings(max_new_tokens=len(forced), temperature=0)))
    assert [c.token for c in chunks if c.token is not None] == forced
    assert "".join(c.text for c in chunks) == " Paris."

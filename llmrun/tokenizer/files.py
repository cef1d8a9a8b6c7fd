"""Writing a Tokenizer as Hugging Face tokenizer files (tokenizer.json or tokenizer.model,
tokenizer_config.json, generation_config.json), so a quantized model directory carries its
tokenizer whatever the source (HF directory or GGUF vocabulary)."""

from __future__ import annotations

import json
from pathlib import Path

from llmrun.tokenizer import Tokenizer


def save_tokenizer(tok: Tokenizer, directory: Path) -> list[str]:
    backend = tok._backend
    written = []
    if hasattr(backend, "tok"):  # tokenizers library
        backend.tok.save(str(directory / "tokenizer.json"))
        written.append("tokenizer.json")
    else:  # sentencepiece
        (directory / "tokenizer.model").write_bytes(backend.sp.serialized_model_proto())
        written.append("tokenizer.model")
    config = {
        "add_bos_token": tok.add_bos_token,
        **{k: v for k, v in tok.special_tokens.items() if v is not None},
    }
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    generation = {"eos_token_id": sorted(tok.eos_ids)}
    if tok.bos_id is not None:
        generation["bos_token_id"] = tok.bos_id
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return written + ["tokenizer_config.json", "generation_config.json"]

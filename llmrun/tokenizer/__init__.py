"""Tokenizers as the checkpoint ships them (tokenizer.json, SentencePiece, or a GGUF's own
vocabulary) and their chat templates, rendered through jinja2 as transformers renders them."""

from llmrun.tokenizer.core import Tokenizer

__all__ = ["Tokenizer"]

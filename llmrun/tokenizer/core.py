"""Text <-> token ids for every model llmrun runs, on top of the `tokenizers` and
`sentencepiece` libraries (no hand-written BPE).

Sources:
- a Hugging Face directory: `tokenizer.json` (read by `tokenizers`: Llama 3, SmolLM2, Gemma
  converted by transformers ...), else `tokenizer.model` (read by `sentencepiece`: Llama 2,
  Gemma), with `tokenizer_config.json`, `chat_template.jinja`, `generation_config.json` and
  `config.json` for BOS/EOS and the chat template;
- a GGUF file: its `tokenizer.ggml.*` metadata, rebuilt into one of the same two libraries by
  `llmrun.tokenizer.gguf`.

    tok = Tokenizer.from_gguf("model.gguf")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    stream = tok.stream_decoder()
    for token in generated: print(stream.push(token), end="")
    print(stream.flush())
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from llmrun.errors import LlmrunError
from llmrun.tokenizer.chat_template import builtin_chat_template, render_chat_template
from llmrun.tokenizer.gguf import (
    END_OF_TURN_TEXTS,
    TOKEN_CONTROL,
    TOKEN_USER_DEFINED,
    GGUFVocab,
    build_bpe_tokenizer,
    build_spm_processor,
    read_gguf_vocab,
)

_REPLACEMENT = "\ufffd"


# --- backends: the library object behind a Tokenizer -----------------------------------------


class _TokenizersBackend:
    """A `tokenizers.Tokenizer`; special tokens in text are split out by the library itself."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.tok.no_padding()
        self.tok.no_truncation()
        self.special_ids = frozenset(
            i for i, t in tok.get_added_tokens_decoder().items() if t.special
        )
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    def post_processor_adds(self, token_id: int) -> bool:
        """Whether the tokenizer.json post-processor puts `token_id` in front of a text."""
        with_special = self.tok.encode("a", add_special_tokens=True).ids
        return bool(with_special) and with_special[0] == token_id and with_special != self.encode("a")


def _literal_alternation(words: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of `words`, longest first, built as a trie so that scanning a text
    costs one character test per position however many words there are (Gemma has 6k)."""
    trie: dict[str, Any] = {}
    for w in words:
        if not w:
            continue
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = True
    if not trie:
        return None

    def build(node: dict[str, Any]) -> str:
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return re.compile(build(trie))


class _SentencePieceBackend:
    """A `sentencepiece.SentencePieceProcessor`. sentencepiece never matches control pieces in
    text, so the special tokens are split out here first (as llama.cpp and transformers do),
    and each stretch of text between them is encoded on its own."""

    def __init__(
        self,
        sp,
        specials: Mapping[str, int],
        user_defined: Mapping[str, int],
        add_dummy_prefix: bool,
    ) -> None:
        self.sp = sp
        # Both kinds are cut out of the text whole, before sentencepiece sees it, as llama.cpp's
        # tokenizer_st_partition does; only control tokens are "special" (dropped by
        # skip_special_tokens). With a dummy prefix, each stretch of text between them gets
        # its own leading U+2581, again as in llama.cpp.
        self.special_to_id = {**dict(user_defined), **dict(specials)}
        self.id_to_text = {i: t for t, i in self.special_to_id.items()}
        self.special_ids = frozenset(specials.values())
        self.splitter = _literal_alternation(self.special_to_id)
        self.add_dummy_prefix = add_dummy_prefix
        self.vocab_size = max([sp.get_piece_size()] + [i + 1 for i in self.id_to_text])

    def encode(self, text: str) -> list[int]:
        if self.splitter is None:
            return list(self.sp.encode(text))
        ids: list[int] = []
        pos = 0
        for m in self.splitter.finditer(text):
            if m.start() > pos:
                ids.extend(self.sp.encode(text[pos:m.start()]))
            ids.append(self.special_to_id[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(self.sp.encode(text[pos:]))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        run: list[int] = []

        def flush_run() -> None:
            # With a dummy prefix, sentencepiece drops one leading space per call: the one
            # encode() put in front of each stretch of text, so decode(encode(s)) == s.
            if run:
                out.append(self.sp.decode(run))
                run.clear()

        for i in ids:
            i = int(i)
            whole = self.id_to_text.get(i)
            if whole is None:
                if not 0 <= i < self.sp.get_piece_size():
                    raise LlmrunError(f"token id {i} is outside the vocabulary ({self.vocab_size} tokens)")
                run.append(i)
                continue
            flush_run()
            if not out and self.add_dummy_prefix and whole.startswith(" "):
                whole = whole[1:]  # the dummy prefix, absorbed into a whitespace token
            out.append("" if skip_special_tokens and i in self.special_ids else whole)
        flush_run()
        return "".join(out)

    def token_to_id(self, text: str) -> int | None:
        if text in self.special_to_id:
            return self.special_to_id[text]
        i = self.sp.piece_to_id(text.replace(" ", "\u2581"))
        return None if i == self.sp.unk_id() and text != self.sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self.id_to_text:
            return self.id_to_text[token_id]
        if 0 <= token_id < self.sp.get_piece_size():
            return self.sp.id_to_piece(token_id)
        return None


# --- the tokenizer ----------------------------------------------------------------------------


class Tokenizer:
    """Encode/decode, BOS/EOS, chat template and streaming decode for one model."""

    def __init__(
        self,
        backend: _TokenizersBackend | _SentencePieceBackend,
        *,
        bos_id: int | None,
        eos_ids: Iterable[int],
        add_bos_token: bool,
        chat_template: str | None,
        special_tokens: Mapping[str, str | None],
        source: str,
    ) -> None:
        self._backend = backend
        self.bos_id: int | None = bos_id
        self.eos_ids: set[int] = set(eos_ids)
        self.add_bos_token: bool = add_bos_token and bos_id is not None
        self.chat_template: str | None = chat_template
        # bos_token / eos_token / unk_token / pad_token texts, for chat templates.
        self.special_tokens: dict[str, str | None] = dict(special_tokens)
        self.source = source

    # -- basics

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of control/special tokens (decode(..., skip_special_tokens=True) drops them)."""
        return self._backend.special_ids

    @property
    def eos_id(self) -> int | None:
        """The main end token (the tokenizer's eos_token), for callers that need one id."""
        text = self.special_tokens.get("eos_token")
        tid = self.token_to_id(text) if text else None
        return tid if tid is not None else (min(self.eos_ids) if self.eos_ids else None)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<|im_start|>`,
        `<start_of_turn>`, ...) become their ids. BOS is put in front only when `add_bos` and
        the model asks for it (add_bos_token), and not twice when the text (a rendered chat
        template, say) already starts with it."""
        ids = self._backend.encode(text)
        if add_bos and self.add_bos_token and not (ids and ids[0] == self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are written out unless `skip_special_tokens`."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise LlmrunError(
                    f"token id {i} is outside the vocabulary of {self.source} ({self.vocab_size} tokens)"
                )
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, text: str) -> int | None:
        return self._backend.token_to_id(text)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def stream_decoder(self, context: Sequence[int] = (), *, skip_special_tokens: bool = False) -> StreamDecoder:
        """A StreamDecoder for generated tokens. `context` (e.g. the prompt's last ids) is
        used only to decode the first tokens with their left neighbours, so a leading space
        is kept; it is never printed."""
        return StreamDecoder(self, context, skip_special_tokens=skip_special_tokens)

    # -- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any] | Any],
        add_generation_prompt: bool = True,
        *,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]), rendered like
        transformers' `apply_chat_template(..., tokenize=False)`."""
        template = chat_template or self.chat_template
        if template is None:
            raise LlmrunError(
                f"{self.source} has no chat template; pass chat_template=..., or prompt the "
                "model with plain text"
            )
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **template_kwargs,
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={sorted(self.eos_ids)}, backend={type(self._backend).__name__})"
        )

    # -- constructors

    @classmethod
    def from_gguf(cls, reader_or_path) -> Tokenizer:
        """From a GGUF file: an open `gguf.GGUFReader`, a path (read faster, metadata only),
        or an already read `GGUFVocab`."""
        vocab = reader_or_path if isinstance(reader_or_path, GGUFVocab) else read_gguf_vocab(reader_or_path)
        return cls._from_gguf_vocab(vocab)

    @classmethod
    def _from_gguf_vocab(cls, vocab: GGUFVocab) -> Tokenizer:
        if vocab.model == "llama":
            sp, proto = build_spm_processor(vocab)
            by_type: dict[int, dict[str, int]] = {TOKEN_CONTROL: {}, TOKEN_USER_DEFINED: {}}
            for i, (t, ty) in enumerate(zip(vocab.tokens, vocab.token_types)):
                if ty in by_type and t:
                    by_type[ty].setdefault(t, i)
            backend: Any = _SentencePieceBackend(
                sp, by_type[TOKEN_CONTROL], by_type[TOKEN_USER_DEFINED], proto.normalizer_spec.add_dummy_prefix
            )
        elif vocab.model == "gpt2":
            backend = _TokenizersBackend(build_bpe_tokenizer(vocab))
        else:
            raise LlmrunError(
                f"{vocab.source}: tokenizer model {vocab.model!r} (tokenizer.ggml.model) is not "
                "supported; llmrun reads 'llama' (sentencepiece) and 'gpt2' (byte-level BPE) "
                "vocabularies: use a Llama or Gemma model"
            )

        def text(i):
            return vocab.tokens[i] if i is not None else None

        eos_ids = {i for i in (vocab.eos_id, vocab.eot_id, vocab.eom_id) if i is not None}
        eos_ids |= {i for i, t in enumerate(vocab.tokens) if t in END_OF_TURN_TEXTS}
        template = vocab.chat_template or builtin_chat_template(vocab.architecture, vocab.tokens)
        return cls(
            backend,
            bos_id=vocab.bos_id,
            eos_ids=eos_ids,
            add_bos_token=vocab.default_add_bos(),
            chat_template=template,
            special_tokens={
                "bos_token": text(vocab.bos_id),
                "eos_token": text(vocab.eos_id),
                "unk_token": text(vocab.unk_id),
                "pad_token": text(vocab.pad_id),
            },
            source=vocab.source,
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """From a Hugging Face model directory (tokenizer.json or tokenizer.model)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise LlmrunError(f"{path} is not a directory; pass a Hugging Face model directory")
        config = _read_json(path, "tokenizer_config.json")
        gen_config = _read_json(path, "generation_config.json")
        model_config = _read_json(path, "config.json")
        tok_json = os.path.join(path, "tokenizer.json")
        tok_model = os.path.join(path, "tokenizer.model")

        if os.path.isfile(tok_json):
            from tokenizers import Tokenizer as HFTokenizer

            try:
                backend: Any = _TokenizersBackend(HFTokenizer.from_file(tok_json))
            except Exception as exc:
                raise LlmrunError(
                    f"{tok_json} cannot be read by the tokenizers library ({exc}); "
                    "download the file again or upgrade tokenizers"
                ) from exc
        elif os.path.isfile(tok_model):
            backend = _sentencepiece_backend_from_file(tok_model, config)
        else:
            raise LlmrunError(
                f"{path} has no tokenizer (neither tokenizer.json nor tokenizer.model); "
                "download the model's tokenizer files into it"
            )

        special_tokens = {
            name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        if isinstance(backend, _SentencePieceBackend):
            sp = backend.sp
            for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
                if special_tokens[name] is None and i >= 0:
                    special_tokens[name] = sp.id_to_piece(i)

        def ids_of(value) -> list[int]:
            if value is None:
                return []
            if isinstance(value, int):
                return [value]
            return [int(v) for v in value]

        bos_id = backend.token_to_id(special_tokens["bos_token"]) if special_tokens["bos_token"] else None
        if bos_id is None:
            fallback = ids_of(gen_config.get("bos_token_id")) or ids_of(model_config.get("bos_token_id"))
            bos_id = fallback[0] if fallback else None
            if bos_id is not None and special_tokens["bos_token"] is None:
                special_tokens["bos_token"] = backend.id_to_token(bos_id)

        eos_ids = set(ids_of(gen_config.get("eos_token_id")))
        if not eos_ids:
            eos_ids |= set(ids_of(model_config.get("eos_token_id")))
        if special_tokens["eos_token"]:
            tid = backend.token_to_id(special_tokens["eos_token"])
            if tid is not None:
                eos_ids.add(tid)
        for marker in END_OF_TURN_TEXTS:
            tid = backend.token_to_id(marker)
            if tid is not None:
                eos_ids.add(tid)
        if special_tokens["eos_token"] is None and eos_ids:
            special_tokens["eos_token"] = backend.id_to_token(min(eos_ids))

        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        elif isinstance(backend, _TokenizersBackend):
            add_bos = bos_id is not None and backend.post_processor_adds(bos_id)
        else:
            add_bos = bos_id is not None  # LlamaTokenizer's default for sentencepiece models

        return cls(
            backend,
            bos_id=bos_id,
            eos_ids=eos_ids,
            add_bos_token=add_bos,
            chat_template=_hf_chat_template(path, config),
            special_tokens=special_tokens,
            source=path,
        )


def _read_json(directory: str, name: str) -> dict[str, Any]:
    file = os.path.join(directory, name)
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise LlmrunError(f"{file} is not valid JSON ({exc}); download the file again") from exc
    if not isinstance(data, dict):
        raise LlmrunError(f"{file} does not hold a JSON object; download the file again")
    return data


def _token_text(value) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


def _hf_chat_template(directory: str, config: Mapping[str, Any]) -> str | None:
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _sentencepiece_backend_from_file(file: str, config: Mapping[str, Any]) -> _SentencePieceBackend:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    try:
        with open(file, "rb") as f:
            blob = f.read()
        proto = spm_pb2.ModelProto()
        proto.ParseFromString(blob)
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(blob)
    except Exception as exc:
        raise LlmrunError(
            f"{file} is not a valid sentencepiece model ({type(exc).__name__}: {exc}); "
            "download the file again"
        ) from exc
    specials: dict[str, int] = {}
    user_defined: dict[str, int] = {}
    for i, piece in enumerate(proto.pieces):
        if piece.type == spm_pb2.ModelProto.SentencePiece.CONTROL and piece.piece:
            specials.setdefault(piece.piece, i)
        elif piece.type == spm_pb2.ModelProto.SentencePiece.USER_DEFINED and piece.piece:
            # matched in raw text, where spaces are still spaces
            user_defined.setdefault(piece.piece.replace("\u2581", " "), i)
    if sp.unk_id() >= 0:
        specials.setdefault(sp.id_to_piece(sp.unk_id()), sp.unk_id())
    # Tokens that tokenizer_config.json declares on top of (or over) the sentencepiece model.
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        text = _token_text(entry)
        if text is None or not isinstance(entry, Mapping):
            continue
        tid = int(key)
        if entry.get("special", False) or tid >= sp.get_piece_size():
            specials[text] = tid
    return _SentencePieceBackend(sp, specials, user_defined, proto.normalizer_spec.add_dummy_prefix)


# --- streaming --------------------------------------------------------------------------------


class StreamDecoder:
    """Turns generated token ids into printable text as they arrive.

    Decoding token by token breaks characters that span tokens (byte-fallback pieces such as
    `<0xE2>` in sentencepiece vocabularies, partial bytes in byte-level BPE) and loses spaces
    that depend on the left neighbour. So, like text-generation-inference's `decode_token`, it
    decodes a small window twice -- ids[prefix:read] and ids[prefix:] -- and emits the
    difference once it grew and does not end in U+FFFD (an incomplete character is held back).
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = (), *, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = [int(i) for i in context][-6:]
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became printable (may be "")."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back at the end of the stream (an incomplete character comes out as
        U+FFFD, as decode() would write it)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if final or (len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT)):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            if len(self._ids) > 64:  # keep the list short; only [prefix:] is ever decoded
                drop = self._prefix
                del self._ids[:drop]
                self._prefix -= drop
                self._read -= drop
            return delta
        return ""

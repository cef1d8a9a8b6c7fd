"""Tokenizers built from the vocabulary a GGUF file carries.

A GGUF has no tokenizer.json or tokenizer.model: it stores llama.cpp's description of the
vocabulary under `tokenizer.ggml.*`. We turn that description back into an object of a real
tokenizer library, so no BPE or sentencepiece algorithm is written here:

- `tokenizer.ggml.model == "llama"` (sentencepiece: tokens, scores, token types) becomes a
  sentencepiece `ModelProto` (BPE, byte fallback, llama.cpp's normalization: no NFKC, spaces
  escaped to U+2581, a dummy prefix only when `tokenizer.ggml.add_space_prefix` says so), loaded
  with `SentencePieceProcessor(model_proto=...)`.
- `tokenizer.ggml.model == "gpt2"` (byte-level BPE: tokens, merges, `tokenizer.ggml.pre`) becomes
  a `tokenizers.Tokenizer` around `models.BPE`, with the pre-tokenizer regexes that llama.cpp
  (src/llama-vocab.cpp) uses for that `pre` value, the byte-level decoder, and the file's control
  and user-defined tokens as added tokens.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from llmrun.errors import LlmrunError
from llmrun.formats.gguf_reader import read_metadata

log = logging.getLogger(__name__)

# llama.cpp's token types (the GGUF `tokenizer.ggml.token_type` values); sentencepiece's
# ModelProto.SentencePiece.Type uses the same numbers.
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Texts of tokens that end a turn. llama.cpp (llama-vocab.cpp, "auto-detect special tokens by
# text") adds every token with one of these texts to its end-of-generation set, whatever the
# metadata says; so do we.
END_OF_TURN_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
        "<|return|>",
        "<|call|>",
    }
)

# --- pre-tokenizer regexes, per `tokenizer.ggml.pre` -------------------------------------------
# From llama.cpp src/llama-vocab.cpp (llm_tokenizer_bpe). Where llama.cpp rewrote a
# tokenizer.json regex for its own regex engine (llama3, qwen2, tekken), it keeps the original in a
# comment; tokenizers' Oniguruma engine runs the original, which is what we use. Each list is
# applied in order, every regex splitting the pieces the previous ones left ("isolated").
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_PRE_GROUPS: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
         "lfm2", "dbrx", "smaug-bpe", "glm4", "chatglm-bpe"),
        (_LLAMA3,),
    ),
    (
        ("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "mpt",
         "olmo", "jais", "trillion", "granite-docling", "a.x-4.0", "mellum", "modern-bert",
         "exaone4", "roberta-bpe", "jina-v1-en", "jina-v2-code", "gigachat"),
        (_GPT2,),
    ),
    (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        (r"\p{N}", _GPT2),
    ),
    (("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "kormo"), (_QWEN2,)),
    (("tekken",), (_TEKKEN,)),
    (("gpt-4o", "llama4", "minimax-m2"), (_GPT4O,)),
    (
        ("falcon",),
        (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    ),
    (
        ("deepseek-coder",),
        (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"),
    ),
    (
        ("default",),
        (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    ),
]
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    name: regexes for names, regexes in _PRE_GROUPS for name in names
}
# llama.cpp turns on `ignore_merges` (a word that is itself a token is not split) and BOS for these.
_LLAMA3_FAMILY = frozenset(_PRE_GROUPS[0][0]) - {"glm4", "chatglm-bpe", "dbrx", "smaug-bpe"}


def _family_control_tokens(arch: str, tokens: list[str], types: list[int]) -> list[int]:
    """Token types with the user-defined tokens that the model family knows to be control
    tokens (models.<family>.GGUF_CONTROL_TOKENS) typed control."""
    from llmrun.models import family_for_gguf_arch

    try:
        control = family_for_gguf_arch(arch).GGUF_CONTROL_TOKENS
    except LlmrunError:  # an architecture llmrun does not run: its file's types as they are
        return list(types)
    return [TOKEN_CONTROL if t == TOKEN_USER_DEFINED and tok in control else t for tok, t in zip(tokens, types)]


@dataclass
class GGUFVocab:
    """The `tokenizer.*` metadata of one GGUF file, read once."""

    source: str  # the file, for messages
    architecture: str
    model: str  # tokenizer.ggml.model: "llama" (sentencepiece) or "gpt2" (byte-level BPE), ...
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    chat_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def default_add_bos(self) -> bool:
        """llama.cpp's rule: the file's flag; else always for sentencepiece, and for the
        llama3 family of BPE pre-tokenizers."""
        if self.add_bos is not None:
            return self.add_bos
        return self.model == "llama" or (self.pre or "") in _LLAMA3_FAMILY


def _source_of(reader) -> str:
    return str(getattr(getattr(reader, "data", None), "filename", None) or "<GGUF file>")


def _field_value(reader, key: str, source: str):
    """A scalar, string, or list value of a metadata key; None when the key is absent."""
    fld = reader.fields.get(key)
    if fld is None:
        return None
    try:
        return fld.contents()
    except Exception as exc:  # a truncated or malformed field
        raise LlmrunError(
            f"GGUF metadata key {key} in {source} cannot be read ({exc}); "
            "the file is damaged: download or convert it again"
        ) from exc


# GGUF value types (gguf.GGUFValueType) -> numpy dtype of their little-endian encoding.
def read_gguf_vocab(reader_or_path) -> GGUFVocab:
    """Read the tokenizer metadata of a GGUF file: an open `gguf.GGUFReader`, or a path (read
    with llmrun.formats.gguf_reader.read_metadata)."""
    if isinstance(reader_or_path, (str, os.PathLike)):
        source = os.fspath(reader_or_path)
        meta = read_metadata(source)
        get = meta.get
    else:
        reader = reader_or_path
        if not hasattr(reader, "fields"):
            raise LlmrunError(
                f"expected a gguf.GGUFReader or a path to a .gguf file, got {type(reader).__name__}"
            )
        source = _source_of(reader)

        def get(key):
            return _field_value(reader, key, source)

    model = get("tokenizer.ggml.model")
    if model is None:
        raise LlmrunError(
            f"{source} has no tokenizer (metadata key tokenizer.ggml.model is missing); "
            "use a GGUF converted with its vocabulary, or load the tokenizer from the model's "
            "Hugging Face directory"
        )
    tokens = get("tokenizer.ggml.tokens")
    if not tokens:
        raise LlmrunError(
            f"{source} has no vocabulary (tokenizer.ggml.tokens is missing or empty); "
            "the file is incomplete: convert it again"
        )
    n = len(tokens)
    types = get("tokenizer.ggml.token_type")
    if types is None:
        types = [TOKEN_NORMAL] * n
    scores = get("tokenizer.ggml.scores")
    for name, values in (("token_type", types), ("scores", scores)):
        if values is not None and len(values) != n:
            raise LlmrunError(
                f"{source}: tokenizer.ggml.{name} has {len(values)} entries for {n} tokens; "
                "the file is damaged: convert it again"
            )

    def opt_int(key):
        v = get(key)
        return None if v is None else int(v)

    def opt_bool(key):
        v = get(key)
        return None if v is None else bool(v)

    types = _family_control_tokens(str(get("general.architecture") or ""), tokens, types)
    vocab = GGUFVocab(
        source=source,
        architecture=str(get("general.architecture") or ""),
        model=str(model),
        pre=None if get("tokenizer.ggml.pre") is None else str(get("tokenizer.ggml.pre")),
        tokens=list(tokens),
        token_types=[int(t) for t in types],
        scores=None if scores is None else [float(s) for s in scores],
        merges=get("tokenizer.ggml.merges"),
        bos_id=opt_int("tokenizer.ggml.bos_token_id"),
        eos_id=opt_int("tokenizer.ggml.eos_token_id"),
        eot_id=opt_int("tokenizer.ggml.eot_token_id"),
        eom_id=opt_int("tokenizer.ggml.eom_token_id"),
        unk_id=opt_int("tokenizer.ggml.unknown_token_id"),
        pad_id=opt_int("tokenizer.ggml.padding_token_id"),
        add_bos=opt_bool("tokenizer.ggml.add_bos_token"),
        add_eos=opt_bool("tokenizer.ggml.add_eos_token"),
        add_space_prefix=opt_bool("tokenizer.ggml.add_space_prefix"),
        remove_extra_whitespaces=opt_bool("tokenizer.ggml.remove_extra_whitespaces"),
        chat_template=get("tokenizer.chat_template"),
    )
    for name in ("bos_id", "eos_id", "eot_id", "eom_id", "unk_id", "pad_id"):
        value = getattr(vocab, name)
        if value is not None and not 0 <= value < n:
            # llama.cpp ignores out-of-range ids with a warning; so do we.
            log.warning("%s: %s %d is outside the vocabulary (%d tokens); ignored", source, name, value, n)
            setattr(vocab, name, None)
    return vocab


# --- sentencepiece ----------------------------------------------------------------------------


def _spm_piece_text(token: str) -> str:
    # Files keep some whitespace-only tokens (Gemma's runs of 2..31 spaces) spelled with real
    # spaces. sentencepiece matches pieces against text whose spaces are already escaped to
    # U+2581, so a piece spelled with real spaces could never match; spell it as llama.cpp
    # effectively matches it (llama.cpp escapes the text the same way).
    return token.replace(" ", "\u2581") if " " in token else token


def build_spm_model_proto(vocab: GGUFVocab):
    """A sentencepiece ModelProto (BPE, byte fallback) equivalent to the file's vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    if vocab.scores is None:
        raise LlmrunError(
            f"{vocab.source}: a sentencepiece vocabulary needs tokenizer.ggml.scores, which is "
            "missing; the file is damaged: convert it again"
        )
    proto = spm_pb2.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = spm_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(vocab.tokens)
    trainer.byte_fallback = any(t == TOKEN_BYTE for t in vocab.token_types)
    trainer.split_digits = False
    trainer.unk_id = vocab.unk_id if vocab.unk_id is not None else 0
    trainer.bos_id = vocab.bos_id if vocab.bos_id is not None else -1
    trainer.eos_id = vocab.eos_id if vocab.eos_id is not None else -1
    trainer.pad_id = vocab.pad_id if vocab.pad_id is not None else -1
    for name, idx in (("unk_piece", vocab.unk_id), ("bos_piece", vocab.bos_id),
                      ("eos_piece", vocab.eos_id), ("pad_piece", vocab.pad_id)):
        if idx is not None:
            setattr(trainer, name, vocab.tokens[idx])

    norm = proto.normalizer_spec
    norm.name = "identity"  # llama.cpp applies no Unicode normalization
    norm.precompiled_charsmap = b""
    add_prefix = True if vocab.add_space_prefix is None else vocab.add_space_prefix
    norm.add_dummy_prefix = add_prefix
    norm.remove_extra_whitespaces = bool(vocab.remove_extra_whitespaces)
    norm.escape_whitespaces = True

    # sentencepiece needs exactly one UNKNOWN piece; files often type <unk> as CONTROL.
    unk_id = vocab.unk_id
    if unk_id is None:
        unknown = [i for i, t in enumerate(vocab.token_types) if t == TOKEN_UNKNOWN]
        unk_id = unknown[0] if unknown else None
    if unk_id is None:
        raise LlmrunError(
            f"{vocab.source}: the sentencepiece vocabulary has no unknown token "
            "(tokenizer.ggml.unknown_token_id); the file is damaged: convert it again"
        )
    trainer.unk_id = unk_id

    seen: set[str] = set()
    type_map = {
        TOKEN_NORMAL: spm_pb2.ModelProto.SentencePiece.NORMAL,
        TOKEN_UNKNOWN: spm_pb2.ModelProto.SentencePiece.UNKNOWN,
        TOKEN_CONTROL: spm_pb2.ModelProto.SentencePiece.CONTROL,
        TOKEN_USER_DEFINED: spm_pb2.ModelProto.SentencePiece.USER_DEFINED,
        TOKEN_UNUSED: spm_pb2.ModelProto.SentencePiece.UNUSED,
        TOKEN_BYTE: spm_pb2.ModelProto.SentencePiece.BYTE,
    }
    for i, (token, score, ttype) in enumerate(zip(vocab.tokens, vocab.scores, vocab.token_types)):
        piece = proto.pieces.add()
        text = token if ttype in (TOKEN_CONTROL, TOKEN_BYTE) else _spm_piece_text(token)
        if i == unk_id:
            ptype = spm_pb2.ModelProto.SentencePiece.UNKNOWN
        elif ttype == TOKEN_UNKNOWN:
            ptype = spm_pb2.ModelProto.SentencePiece.CONTROL
        else:
            ptype = type_map.get(ttype, spm_pb2.ModelProto.SentencePiece.NORMAL)
        if text in seen or not text:
            # sentencepiece rejects duplicate or empty pieces; keep the id, make the piece
            # unreachable from text.
            text = f"<llmrun-dup-{i}>"
            ptype = spm_pb2.ModelProto.SentencePiece.UNUSED
        seen.add(text)
        piece.piece = text
        piece.score = score
        piece.type = ptype
    return proto


def build_spm_processor(vocab: GGUFVocab):
    """(SentencePieceProcessor, ModelProto) for a `tokenizer.ggml.model == "llama"` file."""
    import sentencepiece as spm

    proto = build_spm_model_proto(vocab)
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto.SerializeToString())
    except Exception as exc:
        raise LlmrunError(
            f"{vocab.source}: sentencepiece rejected the vocabulary built from the file ({exc}); "
            "the file's tokenizer metadata is inconsistent: convert it again"
        ) from exc
    return sp, proto


# --- byte-level BPE ---------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table (the alphabet of byte-level vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def pre_tokenizer_regexes(pre: str | None, source: str = "<GGUF file>") -> tuple[str, ...]:
    if pre in PRE_TOKENIZER_REGEXES:
        return PRE_TOKENIZER_REGEXES[pre]
    log.warning(
        "%s: pre-tokenizer %r is not known to llmrun; splitting text with the GPT-2 regex, "
        "so tokenization may differ from the model's reference tokenizer",
        source,
        pre,
    )
    return (_GPT2,)


def build_bpe_tokenizer(vocab: GGUFVocab):
    """A `tokenizers.Tokenizer` for a `tokenizer.ggml.model == "gpt2"` file."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if not vocab.merges:
        raise LlmrunError(
            f"{vocab.source}: a BPE vocabulary needs tokenizer.ggml.merges, which is missing; "
            "the file is damaged: convert it again"
        )
    alphabet = set(_bytes_to_unicode().values())
    spelling = _bytes_to_unicode()
    token_to_id: dict[str, int] = {}
    for i, (token, ttype) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if ttype not in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and not set(token) <= alphabet:
            # A normal token written as plain text rather than in the byte alphabet.
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        token_to_id.setdefault(token, i)
    merges = []
    for m in vocab.merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise LlmrunError(
                f"{vocab.source}: merge {m!r} in tokenizer.ggml.merges is not two tokens; "
                "the file is damaged: convert it again"
            )
        merges.append((left, right))
    pre = vocab.pre or "default"
    try:
        model = models.BPE(
            token_to_id,
            merges,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=pre in _LLAMA3_FAMILY,
        )
    except Exception as exc:
        raise LlmrunError(
            f"{vocab.source}: the BPE vocabulary and merges do not fit together ({exc}); "
            "the file is damaged: convert it again"
        ) from exc
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre_tokenizer_regexes(pre, vocab.source)]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()

    control = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(vocab.tokens, vocab.token_types)
        if ty == TOKEN_CONTROL and t in token_to_id
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(vocab.tokens, vocab.token_types)
        if ty == TOKEN_USER_DEFINED and t in token_to_id
    ]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    return tok

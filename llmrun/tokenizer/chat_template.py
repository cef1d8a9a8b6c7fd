"""Chat templates: render a conversation into the prompt text a chat model was trained on.

Rendering follows transformers' `apply_chat_template` (utils/chat_template_utils.py) so that the
same template gives the same text: a sandboxed jinja2 environment with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that does not escape HTML,
`raise_exception`, `strftime_now`, and the tokenizer's special tokens (`bos_token`,
`eos_token`, ...) as variables. A template that rejects a conversation (Gemma 2's "System role
not supported", Gemma 3's "Conversation roles must alternate ...") raises `ChatTemplateError`,
which is both an `LlmrunError` and the `jinja2.TemplateError` transformers raises.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmrun.errors import LlmrunError


class ChatTemplateError(LlmrunError, jinja2.TemplateError):
    """The chat template rejected the conversation, or could not be parsed."""

    def __init__(self, message: str) -> None:
        LlmrunError.__init__(self, message)

    @property
    def message(self) -> str:  # jinja2.TemplateError's accessor
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return self.message


# ChatML, for files that carry <|im_start|>/<|im_end|> but no template.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

def builtin_chat_template(architecture: str | None, vocab_texts: Sequence[str] = ()) -> str | None:
    """The template to use when a GGUF file carries none (llama.cpp does the same): its family's
    (models.families), else ChatML where the vocabulary has its tokens, else None."""
    from llmrun.models import family_for_gguf_arch

    try:
        template = family_for_gguf_arch(architecture).CHAT_TEMPLATE
    except LlmrunError:  # an architecture llmrun does not run
        template = None
    if template is not None:
        return template
    if vocab_texts and "<|im_start|>" in vocab_texts and "<|im_end|>" in vocab_texts:
        return CHATML_CHAT_TEMPLATE
    return None


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; for rendering it is transparent."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers overrides it with this.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template cannot be parsed (line {exc.lineno}: {exc.message}); "
            "fix the template or pass another one"
        ) from exc


def _plain(value: Any) -> Any:
    """Messages as plain JSON-like data (dicts, lists, str, numbers) for the sandbox."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any] | Any],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **extra: Any,
) -> str:
    """Render `messages` (dicts with role/content, or ChatMessage dataclasses) with `template`.

    `special_tokens` are the tokenizer's bos_token/eos_token/unk_token/pad_token texts, given to
    the template as variables as transformers does; `extra` are further template variables
    (e.g. `enable_thinking=False`)."""
    compiled = compile_chat_template(template)
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update(_plain(extra))
    try:
        return compiled.render(
            messages=_plain(list(messages)),
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template rejected the conversation: {exc.message or exc}") from exc

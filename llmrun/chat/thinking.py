"""An answer's thinking (the `<think>...</think>` block Qwen 3 and other reasoning models write
before answering) apart from the answer itself, so the chat shows the thinking folded away."""

from __future__ import annotations

from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Parts:
    thinking: str | None  # None: the text has no thinking
    answer: str
    thinking_now: bool  # the thinking block is still open (or its tag still arriving)


def split_thinking(text: str, final: bool = False) -> Parts:
    """The thinking and the answer of `text` so far (`final`: the whole of it). A block opened by
    the prompt's template shows only as its closing tag."""
    stripped = text.lstrip()
    if stripped.startswith(OPEN):
        body = stripped[len(OPEN):]
        if CLOSE in body:
            thinking, answer = body.split(CLOSE, 1)
            return Parts(thinking.strip(), answer.lstrip(), False)
        return Parts(body.strip(), "", not final)
    if stripped and OPEN.startswith(stripped) and not final:  # the opening tag is arriving
        return Parts("", "", True)
    if CLOSE in text:
        thinking, answer = text.split(CLOSE, 1)
        return Parts(thinking.strip(), answer.lstrip(), False)
    return Parts(None, text, False)

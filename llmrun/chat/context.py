"""Fit a conversation into the model's context: the whole history goes through the chat
template; when it no longer fits in context_length - max_new_tokens, the oldest turns go."""

from __future__ import annotations

from dataclasses import dataclass

from llmrun.errors import LlmrunError
from llmrun.runtime.types import ChatMessage


@dataclass
class FittedPrompt:
    ids: list[int]
    dropped: int  # history messages left out, counted from the oldest


def merge_same_role(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Join back-to-back messages of one role (an unanswered question followed by the next):
    some templates (Gemma's) refuse roles that do not alternate."""
    merged: list[ChatMessage] = []
    for m in messages:
        if merged and merged[-1].role == m.role:
            merged[-1] = ChatMessage(m.role, f"{merged[-1].content}\n\n{m.content}")
        else:
            merged.append(ChatMessage(m.role, m.content))
    return merged


def next_turn(history: list[ChatMessage], start: int) -> int:
    """Index of the first user message after `start`: dropping a turn drops a question
    together with its answers."""
    for i in range(start + 1, len(history)):
        if history[i].role == "user":
            return i
    return len(history)


def fit_history(engine, system_prompt: str, history: list[ChatMessage],
                max_new_tokens: int, template_kwargs: dict | None = None) -> FittedPrompt:
    """Token ids of the longest recent part of `history` (which ends with the user's message)
    that leaves max_new_tokens free; LlmrunError when even the last message does not fit.
    `template_kwargs`: further chat template variables."""
    budget = engine.context_length - max_new_tokens
    if budget <= 0:
        raise LlmrunError(f"max new tokens ({max_new_tokens}) leaves no room for the prompt in "
                          f"the model's context of {engine.context_length}: lower it in Settings")
    system = [ChatMessage("system", system_prompt)] if system_prompt else []
    start = 0
    while True:
        ids = engine.chat_prompt_ids(system + merge_same_role(history[start:]), template_kwargs)
        if len(ids) <= budget:
            return FittedPrompt(ids, start)
        following = next_turn(history, start)
        if following >= len(history):
            raise LlmrunError(
                f"context full: the last message takes {len(ids)} tokens with the template and "
                f"system prompt, but the context of {engine.context_length} less max new tokens "
                f"({max_new_tokens}) leaves {budget}: shorten it or lower max new tokens")
        start = following

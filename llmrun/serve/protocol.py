"""The OpenAI request bodies llmrun serves, as pydantic models, and the error body OpenAI's
clients read. A field not declared here is refused with a 400 that names it (never dropped)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmrun.runtime.sampling import MAX_TOP_LOGPROBS

MAX_STOPS = 4  # OpenAI's limit


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def describe_validation(exc: ValidationError) -> tuple[str, str | None]:
    """(one line naming the first bad field and why, the field's name)."""
    err = exc.errors()[0]
    field = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unsupported field '{field}': llmrun does not implement it", field
    if err["type"] == "missing":
        return f"missing field '{field}'", field
    if not field:  # the body as a whole (a model validator)
        return err["msg"].removeprefix("Value error, "), None
    return f"bad value for '{field}': {err['msg']}", field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _template_kwargs(value: dict | None) -> dict | None:
    clash = sorted(set(value or ()) & {"messages", "add_generation_prompt", "chat_template", "template",
                                       "special_tokens"})
    if clash:
        raise ValueError(f"chat_template_kwargs cannot set {', '.join(clash)}: the request sets it")
    return value


# further chat template variables, as vLLM takes them (e.g. {"enable_thinking": false})
TemplateKwargs = Annotated[dict[str, Any] | None, AfterValidator(_template_kwargs)]


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(_Body):
    """What both endpoints take. llama.cpp's extras (top_k, min_p, repeat_penalty) beside
    OpenAI's fields; penalties OpenAI has and llmrun lacks are accepted only at their no-op 0."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repeat_penalty: float | None = Field(default=None, gt=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    stop: str | list[str] | None = Field(default_factory=list)
    seed: int | None = None
    n: Literal[1] = 1
    user: str | None = None  # an end-user id for the caller's own logs
    return_token_ids: bool = False  # vLLM's: the prompt's and the answer's token ids beside the text

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return stops

    def new_tokens(self) -> int | None:
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    chat_template_kwargs: TemplateKwargs = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)  # the legacy API's top-N count
    echo: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt per request (n and batched prompts are not implemented)")
            return value[0]
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class TokenizeRequest(_Body):
    """`content` as text, or `messages` rendered through the chat template with the assistant's
    turn opened (as vLLM's /tokenize takes them): what a chat request's prompt would be."""

    content: str | None = None
    messages: list[Message] | None = None
    chat_template_kwargs: TemplateKwargs = None
    add_special: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.content is None) == (self.messages is None):
            raise ValueError("give either content or messages")
        return self


class DetokenizeRequest(_Body):
    tokens: list[int]

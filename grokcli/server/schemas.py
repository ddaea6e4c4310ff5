"""The OpenAI request bodies the server accepts, and the OpenAI error format.

Field names follow the official `openai` client's types (`openai/types/completion_create_params.py`,
`openai/types/chat/completion_create_params.py`). Every field is checked strictly (a number where a
number is expected, no unknown fields): anything else is a 400 whose body names the field, as the
OpenAI API answers. vLLM's sampling extensions `top_k`, `min_p`, `repetition_penalty` and
`ignore_eos` are accepted too.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 16  # choices per prompt (`n`)
MAX_STOP = 16  # stop strings per request
MAX_LOGPROBS = 20  # top alternatives per token (as the engine's compiled step)


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False  # one last chunk with the usage and no choices
    include_obfuscation: bool = False  # accepted; this server sends no obfuscation padding


class _Sampling(_Body):
    """The fields both endpoints share."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)  # extension (vLLM): -1 or 0 = off
    min_p: Optional[float] = Field(None, ge=0, le=1)  # extension (vLLM)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10)  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted, unused
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)  # only 0 (use repetition_penalty)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)  # only 0 (use repetition_penalty)
    logit_bias: Optional[dict[str, int]] = None  # only empty


class CompletionRequest(_Sampling):
    """POST /v1/completions"""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[bool] = False
    suffix: Optional[str] = None  # only empty
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)  # only equal to n


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None  # accepted, not rendered

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(_Body):
    type: Literal["text"]


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions"""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Any]] = None  # only empty: a base model has no tool calling
    tool_choice: Optional[Literal["none", "auto"]] = None
    parallel_tool_calls: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None  # accepted, unused
    store: Optional[bool] = None  # accepted, nothing is stored
    service_tier: Optional[str] = None  # accepted, unused
    safety_identifier: Optional[str] = None  # accepted, unused
    prompt_cache_key: Optional[str] = None  # accepted: prefix reuse is automatic


_FIELDS = {name for m in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions)
           for name in m.model_fields}
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts ({\"type\": \"text\", \"text\": ...})",
}


def _param(loc: tuple) -> str:
    """('messages', 0, 'content', 'str') -> 'messages[0].content' (union member tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS:
            out += f".{part}" if out else part
        else:
            break
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse(model_cls: type[_Body], data) -> _Body:
    """The validated request, or ApiError(400) naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_request_body")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            parent, name = _param(err["loc"][:-1]), str(err["loc"][-1])
            param = f"{parent}.{name}" if parent else name
            raise ApiError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        if kind == "missing":
            raise ApiError(400, f"Missing required parameter: '{param}'.", param=param,
                           code="missing_required_parameter") from None
        leaf = param.rsplit(".", 1)[-1].split("[", 1)[0]
        if leaf in _EXPECTED:
            message = f"Invalid value for '{param}': expected {_EXPECTED[leaf]}."
        else:
            message = f"Invalid value for '{param}': {err['msg'].lower()}, got {_short(err.get('input'))}."
        raise ApiError(400, message, param=param, code="invalid_value") from None

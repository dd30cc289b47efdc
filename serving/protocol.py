"""The OpenAI wire format: request bodies validated into sampling parameters, and the
response/chunk bodies built from a finished or streaming request.

Validation is strict on types (`"max_tokens": "8"` is an error, not a coercion) and lenient
on unknown keys (clients send fields we do not use). Every error names its field, and the
server answers it with 400 `{"error": {"message", "type": "invalid_request_error", "param"}}`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.errors import RequestError
from engine.request import SamplingParams


class APIError(Exception):
    """An error answered to the client: HTTP status, OpenAI error body, optional retry hint."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(max(1, round(self.retry_after_s)))}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)                      # extension (vLLM's): 0 is off
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)                    # one choice per request
    ignore_eos: bool = False                         # extension (vLLM's): run to max_tokens

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                                  top_k=self.top_k, top_p=self.top_p, seed=self.seed, stop=self.stop_strings,
                                  ignore_eos=self.ignore_eos)
        except RequestError as exc:
            raise APIError(400, str(exc), str(exc).split("=")[0]) from None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionBody(_Body):
    prompt: Union[str, list[int], list[str]]
    echo: bool = False
    logprobs: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self, index: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{index}].content: only text parts are supported", f"messages.{index}.content")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False


def parse_body(cls: type[_Body], raw: bytes) -> Any:
    """Validate a JSON body; the first error becomes a 400 naming its field."""
    try:
        body = cls.model_validate_json(raw or b"")
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"body: not valid JSON ({err['msg']})", "body") from None
        # unions report each branch ('prompt.str', ...): name the field as the client wrote it
        loc = [str(p) for p in err["loc"] if not _is_branch_tag(p)]
        field = ".".join(loc) or "body"
        raise APIError(400, f"{field}: {err['msg']}", field) from None
    if len(body.stop_strings) > 4 or not all(body.stop_strings):
        raise APIError(400, "stop: up to 4 non-empty strings", "stop")
    if isinstance(body, CompletionBody):
        if body.echo or body.logprobs:
            raise APIError(400, "echo / logprobs: not supported", "echo" if body.echo else "logprobs")
        if isinstance(body.prompt, list) and (not body.prompt or isinstance(body.prompt[0], str)):
            raise APIError(400, "prompt: send one prompt (a string or a list of token ids), not a batch", "prompt")
    if isinstance(body, ChatBody) and body.logprobs:
        raise APIError(400, "logprobs: not supported", "logprobs")
    return body


def _is_branch_tag(part: object) -> bool:
    """pydantic's name for a union branch in an error location ('str', 'list[int]', ...)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none")
                                      or part.startswith(("list[", "dict[", "function-")))


# ---- responses -----------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, text: str, finish_reason: str | None, prompt_tokens: int,
                        completion_tokens: int, chat: bool) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}


def stream_chunk(rid: str, model: str, text: str | None, finish_reason: str | None, chat: bool,
                 first: bool = False, usage_: dict[str, int] | None = None) -> dict[str, Any]:
    if usage_ is not None:
        choices: list[dict[str, Any]] = []
    elif chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}]
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

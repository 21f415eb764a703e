"""The OpenAI chat-completions protocol: what a request body may carry and the bodies sent back.

One concern: a `POST /v1/chat/completions` body checked against the served model's limits
(`parse_request` -> `ChatRequest`, or an `OpenAIError` whose 400 names the parameter at fault), and
OpenAI's answer formats (the error body, `usage`, `chat.completion.chunk` server-sent events). No
HTTP here: `openai_frontend` serves it, `triton_http` calls the models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
from sharegpt4v.serving.protocol import (
    IMAGE_PLACEHOLDER,
    RequestError,
    ServingOptions,
    check_max_tokens,
    check_temperature,
)

_UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {  # parameter -> values that ask for what the server does
    "n": (None, 1), "top_p": (None, 1, 1.0), "stop": (None, "", []), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
}


# errors -------------------------------------------------------------------------------------------


class OpenAIError(Exception):
    """A request answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.request_id: str | None = None  # set once the request has one: sent as x-request-id

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """A 400 `invalid_request_error` naming the parameter at fault."""
    return OpenAIError(400, message, param=param, code=code)


# requests -----------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """An OpenAI model id and the Triton model behind it, with the limits from its config."""

    id: str
    triton: str
    options: ServingOptions
    stream_model: str | None  # the decoupled twin that streams tokens, if the server has one


@dataclass
class Image:
    """The conversation's image: its URL (data:, s3://, http(s)://) and where the request has it (a param)."""

    where: str
    url: str


@dataclass
class ChatRequest:
    turns: list[tuple[str, str]]  # (role, text): user/assistant alternating, ending with the user
    image: Image | None
    max_tokens: int | None
    temperature: float | None
    stream: bool
    include_usage: bool


def _text_of(content: Any, where: str, role: str, images: list[Image]) -> str:
    """The text of a message's content (a string or a list of parts); image parts go to `images`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}: expected a string or a list of content parts, got {type(content).__name__}", where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"{at}: only a user message may carry an image", at)
            value = part.get("image_url")
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str) or not url:
                raise bad_request(f"{at}.image_url: expected {{\"url\": \"data:image/...;base64,...\"}}",
                                  f"{at}.image_url")
            images.append(Image(where=f"{at}.image_url", url=url))
        elif kind == "text":
            raise bad_request(f"{at}.text: expected a string", f"{at}.text")
        else:
            raise bad_request(f"{at}.type: {kind!r} is not supported (text and image_url are)", f"{at}.type")
    return "\n".join(texts)


def parse_messages(messages: Any, model: ServedModel) -> tuple[list[tuple[str, str]], Image | None]:
    """OpenAI messages -> (turns for the Triton model, the conversation's one image or None)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: expected a non-empty list of messages", "messages")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    where: list[int] = []  # each turn's index in the request
    images: list[Image] = []
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{at}: expected an object with 'role' and 'content'", at)
        role = message.get("role")
        if role in ("system", "developer"):
            text = _text_of(message.get("content"), f"{at}.content", role, images).strip()
            if text:
                system.append(text)
            continue
        if role not in ("user", "assistant"):
            raise bad_request(f"{at}.role: {role!r} is not supported (system, user and assistant are)", f"{at}.role")
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            raise bad_request(f"{at}: tool calls are not supported", at)
        seen = len(images)
        text = _text_of(message.get("content"), f"{at}.content", role, images)
        if len(images) > seen and not text.strip():  # just an image: the instruction the models were trained with
            text = CAPTION_INSTRUCTION
        turns.append((role, text))
        where.append(i)
    if len(images) > 1:
        raise bad_request(f"{images[1].where}: this model takes one image per conversation, got {len(images)}",
                          images[1].where)
    image = images[0] if images else None
    if model.options.task == "caption":
        if image is None:
            raise bad_request(f"messages: {model.id} captions an image: send one image_url part in a user message",
                              "messages")
        return [], image
    if not turns:
        raise bad_request("messages: no user message", "messages")
    for k, (role, text) in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise bad_request(f"messages[{where[k]}].role: expected {expected!r} (after any system messages, user "
                              f"and assistant alternate, starting with the user), got {role!r}",
                              f"messages[{where[k]}].role")
        if not text.strip():
            raise bad_request(f"messages[{where[k]}].content: no text" + ("; ask something about the image"
                                                                             if role == "user" else ""),
                              f"messages[{where[k]}].content")
        if IMAGE_PLACEHOLDER in text:
            raise bad_request(f"messages[{where[k]}].content: must not contain {IMAGE_PLACEHOLDER}; send the image "
                              "as an image_url part", f"messages[{where[k]}].content")
    if turns[-1][0] != "user":
        raise bad_request("messages: the last message must be the user's", "messages")
    if system:
        turns[0] = ("user", "\n\n".join([*system, turns[0][1]]))
    total = sum(len(text.strip()) for _, text in turns)
    if total > model.options.max_prompt_chars:
        raise bad_request(f"messages: {total} characters in total is over the limit of "
                          f"{model.options.max_prompt_chars}", "messages")
    return [(role, text.strip()) for role, text in turns], image


def _number(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise bad_request(f"{name}: expected {'a number' if kind is float else 'an integer'}, "
                          f"got {json.dumps(value)[:40]}", name)
    return value


def parse_request(body: Any, model: ServedModel) -> ChatRequest:
    """Check a chat-completions body for `model`; OpenAIError (400) names the parameter at fault."""
    for name, defaults in _UNSUPPORTED_DEFAULTS.items():
        value = body.get(name)
        if value is not None and not any(value == d and type(value) is type(d) for d in defaults if d is not None):
            raise bad_request(f"{name}: not supported by this server (leave it out)", name, "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad_request("response_format: only text answers are supported", "response_format",
                          "unsupported_parameter")
    turns, image = parse_messages(body.get("messages"), model)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, int)
    temperature = _number(body, "temperature", float)
    try:
        if max_tokens is not None:
            max_tokens = check_max_tokens(max_tokens, model.options.max_tokens_limit)
        if temperature is not None:
            temperature = check_temperature(temperature)
    except RequestError as exc:
        raise bad_request(str(exc).replace("max_tokens:", f"{name}:", 1),
                          name if "max_tokens" in str(exc) else "temperature")
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise bad_request("stream: expected true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad_request("stream_options: only allowed when stream is true", "stream_options")
    if options is not None and (not isinstance(options, dict) or options.get("include_usage") not in (None, True, False)):
        raise bad_request("stream_options: expected {\"include_usage\": true|false}", "stream_options")
    return ChatRequest(turns, image, max_tokens, temperature, bool(stream), bool((options or {}).get("include_usage")))


# responses ----------------------------------------------------------------------------------------


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """A completion's `usage`."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk_event(id: str, created: int, model: str, delta: dict[str, Any] | None, finish: str | None = None,
                usage: dict[str, int] | None = None) -> bytes:
    """One `chat.completion.chunk` server-sent event (`delta` None: the chunk that carries only `usage`)."""
    chunk: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                             "system_fingerprint": None,
                             "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                                   "finish_reason": finish}]}
    if usage is not None:
        chunk["usage"] = usage
    return f"data: {json.dumps(chunk)}\n\n".encode()


def error_event(error: OpenAIError) -> bytes:
    """An error in the middle of a stream, as a server-sent event with OpenAI's error body."""
    return f"data: {json.dumps(error.body())}\n\n".encode()


DONE = b"data: [DONE]\n\n"

"""The OpenAI API in front of the Triton models: `POST /v1/chat/completions` and `GET /v1/models`.

One concern: the OpenAI chat-completions protocol <-> calls to the Triton models (captioner, chat,
the decoupled chat_stream) over Triton's HTTP endpoint, so the official `openai` client, and the
platform's own teacher client, can use the served models:

    sharegpt4v serve openai --triton-url http://127.0.0.1:8000 --port 8080
    openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="any").chat.completions.create(
        model="sharegpt4v-chat", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
            {"type": "text", "text": "What is left of the red circle?"}]}])

In the cluster it is the InferenceService's KServe `transformer` (`cluster.build_inference_service`):
KServe routes the service's traffic to it and passes `--predictor_host`, the Triton predictor.
Only HTTP reaches a predictor there (its one port), so every call goes over Triton's HTTP API:
`/v2/models/<m>/infer`, and `/v2/models/<m>_stream/generate_stream` (server-sent events) for
streaming. Any other `/v2/...` request is passed through unchanged, so V2 clients
(`sharegpt4v client`, tritonclient over HTTP) keep working at the same address.

What a request may carry, and what it becomes:
- `model`: an id from `GET /v1/models` (`sharegpt4v-chat` -> Triton `chat`, `sharegpt4v-captioner`
  -> `captioner`); any other is a 404 `model_not_found`.
- `messages`: user/assistant turns alternating, ending with the user's; `system`/`developer` text goes
  in front of the first user turn (the model's template has its own fixed system prompt); a user turn
  with an image and no text asks for a description (`CAPTION_INSTRUCTION`, as in training). At most one
  image in the conversation, as an `image_url` part of a user message: a `data:image/...;base64,` URL,
  or an `s3://` or `http(s)://` URL that starts with a prefix of the server's fetch allow-list (read
  with a size cap and a timeout, redirects not followed); anything else is a 400. The models are
  vision models trained with one image per conversation: a chat without an image is asked about a
  blank image (CLIP's mean colour: zero after normalisation), as the blind baselines of the
  evaluation do; `usage.prompt_tokens` counts its image positions.
- The captioner captions the image with the instruction it was trained on, whatever text comes with
  it (a teacher's prompt, or none): so a trained captioner can stand in for the teacher of the next
  round (`caption teacher` with `teacher.model=sharegpt4v-captioner`). It needs an image.
- `max_tokens` / `max_completion_tokens` (1..the model's `max_tokens_limit`) and `temperature`
  (0..2, 0 = greedy) are checked with the model's own limits (`serving.protocol`, read from the
  served model's config); `n`, `top_p`, `stop`, penalties, `logprobs`, tools and JSON mode are not
  supported and are refused unless they ask for the default.
- `stream: true` answers with server-sent `chat.completion.chunk` events and `data: [DONE]`; with
  `stream_options.include_usage` a last chunk carries `usage`. The chat model streams tokens from the
  decoupled `chat_stream` model; the captioner (no streaming model) sends its caption as one chunk.

Errors are OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: a bad request is a 400
`invalid_request_error` (Triton's 400 messages are passed on: they name the input), an unknown model a
404, a wrong API key a 401 (only when the server has one: `api_key`), Triton's internal error a 500
whose message carries the request id that Triton logged, an unreachable Triton a 503.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
from sharegpt4v.errors import PlatformError
from sharegpt4v.redact import redact_text
from sharegpt4v.serving.protocol import (
    IMAGE_PLACEHOLDER,
    RequestError,
    ServingOptions,
    check_max_tokens,
    check_temperature,
)

log = logging.getLogger(__name__)

DEFAULT_MODELS = {"sharegpt4v-chat": "chat", "sharegpt4v-captioner": "captioner"}  # OpenAI id -> Triton model
STREAM_SUFFIX = "_stream"  # the decoupled twin of a Triton model (repository.STREAM_MODEL = "chat" + this)
CONFIG_TTL_S = 60.0
MAX_BODY_BYTES = 32 << 20  # a request body: the largest image limit (20 MB) as base64, and text
# CLIP's mean colour (sharegpt4v.modeling.images.CLIP_MEAN x 255, rounded; that module imports torch,
# which this one must not): the blank image of a text-only chat. A test keeps the two equal.
BLANK_RGB = (123, 117, 104)
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.DOTALL)
_UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {  # parameter -> values that ask for what the server does
    "n": (None, 1), "top_p": (None, 1, 1.0), "stop": (None, "", []), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
}


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


def _bad(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


# the allow-list of image URLs the server may fetch ------------------------------------------------


def check_fetch_prefix(prefix: str) -> str:
    """An allow-list entry: `s3://bucket[/prefix]` or `http(s)://host[:port][/path]`; ValueError otherwise."""
    parts = urlsplit(prefix)
    if parts.scheme not in ("s3", "http", "https") or not parts.netloc or "@" in parts.netloc:
        raise ValueError(f"fetch allow-list entry {prefix!r}: expected s3://bucket/prefix or http(s)://host[:port]/path")
    if parts.query or parts.fragment:
        raise ValueError(f"fetch allow-list entry {prefix!r}: a prefix has no query or fragment")
    return prefix


def url_allowed(url: str, prefixes: list[str] | tuple[str, ...]) -> bool:
    """Whether `url` lies under one of `prefixes`: same scheme and host:port exactly (a host name that
    merely starts like an allowed one does not count), a path that starts with the prefix's path, and
    no userinfo or `.`/`..` segments that could step out of it."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    if "@" in parts.netloc or "\\" in path or any(s in (".", "..") for s in path.split("/")):
        return False
    for prefix in prefixes:
        allowed = urlsplit(prefix)
        if (parts.scheme.lower(), parts.netloc.lower()) == (allowed.scheme.lower(), allowed.netloc.lower()) \
                and parts.path.startswith(allowed.path):
            return True
    return False


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
        raise _bad(f"{where}: expected a string or a list of content parts, got {type(content).__name__}", where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise _bad(f"{at}: only a user message may carry an image", at)
            value = part.get("image_url")
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str) or not url:
                raise _bad(f"{at}.image_url: expected {{\"url\": \"data:image/...;base64,...\"}}", f"{at}.image_url")
            images.append(Image(where=f"{at}.image_url", url=url))
        elif kind == "text":
            raise _bad(f"{at}.text: expected a string", f"{at}.text")
        else:
            raise _bad(f"{at}.type: {kind!r} is not supported (text and image_url are)", f"{at}.type")
    return "\n".join(texts)


def parse_messages(messages: Any, model: ServedModel) -> tuple[list[tuple[str, str]], Image | None]:
    """OpenAI messages -> (turns for the Triton model, the conversation's one image or None)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: expected a non-empty list of messages", "messages")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    where: list[int] = []  # each turn's index in the request
    images: list[Image] = []
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{at}: expected an object with 'role' and 'content'", at)
        role = message.get("role")
        if role in ("system", "developer"):
            text = _text_of(message.get("content"), f"{at}.content", role, images).strip()
            if text:
                system.append(text)
            continue
        if role not in ("user", "assistant"):
            raise _bad(f"{at}.role: {role!r} is not supported (system, user and assistant are)", f"{at}.role")
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            raise _bad(f"{at}: tool calls are not supported", at)
        seen = len(images)
        text = _text_of(message.get("content"), f"{at}.content", role, images)
        if len(images) > seen and not text.strip():  # just an image: the instruction the models were trained with
            text = CAPTION_INSTRUCTION
        turns.append((role, text))
        where.append(i)
    if len(images) > 1:
        raise _bad(f"{images[1].where}: this model takes one image per conversation, got {len(images)}", images[1].where)
    image = images[0] if images else None
    if model.options.task == "caption":
        if image is None:
            raise _bad(f"messages: {model.id} captions an image: send one image_url part in a user message", "messages")
        return [], image
    if not turns:
        raise _bad("messages: no user message", "messages")
    for k, (role, text) in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise _bad(f"messages[{where[k]}].role: expected {expected!r} (after any system messages, user and "
                       f"assistant alternate, starting with the user), got {role!r}", f"messages[{where[k]}].role")
        if not text.strip():
            raise _bad(f"messages[{where[k]}].content: no text" + ("; ask something about the image"
                                                                      if role == "user" else ""),
                       f"messages[{where[k]}].content")
        if IMAGE_PLACEHOLDER in text:
            raise _bad(f"messages[{where[k]}].content: must not contain {IMAGE_PLACEHOLDER}; send the image as an "
                       "image_url part", f"messages[{where[k]}].content")
    if turns[-1][0] != "user":
        raise _bad("messages: the last message must be the user's", "messages")
    if system:
        turns[0] = ("user", "\n\n".join([*system, turns[0][1]]))
    total = sum(len(text.strip()) for _, text in turns)
    if total > model.options.max_prompt_chars:
        raise _bad(f"messages: {total} characters in total is over the limit of {model.options.max_prompt_chars}",
                   "messages")
    return [(role, text.strip()) for role, text in turns], image


def _number(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise _bad(f"{name}: expected {'a number' if kind is float else 'an integer'}, got {json.dumps(value)[:40]}", name)
    return value


def parse_request(body: Any, model: ServedModel) -> ChatRequest:
    """Check a chat-completions body for `model`; OpenAIError (400) names the parameter at fault."""
    for name, defaults in _UNSUPPORTED_DEFAULTS.items():
        value = body.get(name)
        if value is not None and not any(value == d and type(value) is type(d) for d in defaults if d is not None):
            raise _bad(f"{name}: not supported by this server (leave it out)", name, "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise _bad("response_format: only text answers are supported", "response_format", "unsupported_parameter")
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
        raise _bad(str(exc).replace("max_tokens:", f"{name}:", 1), name if "max_tokens" in str(exc) else "temperature")
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise _bad("stream: expected true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise _bad("stream_options: only allowed when stream is true", "stream_options")
    if options is not None and (not isinstance(options, dict) or options.get("include_usage") not in (None, True, False)):
        raise _bad("stream_options: expected {\"include_usage\": true|false}", "stream_options")
    return ChatRequest(turns, image, max_tokens, temperature, bool(stream), bool((options or {}).get("include_usage")))


# images -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def blank_image_base64() -> str:
    """A PNG of CLIP's mean colour, base64: the image a text-only chat is asked about."""
    import io

    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.new("RGB", (64, 64), BLANK_RGB).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def data_url_payload(url: str, where: str) -> str:
    """The base64 payload of a `data:image/...;base64,` URL; 400 for any other data URL."""
    match = _DATA_URL.match(url)
    if match is None:
        raise _bad(f"{where}: not a data URL (data:image/png;base64,...)", where, "invalid_image_url")
    mime = match["mime"].strip().lower()
    if not mime.startswith("image/"):
        raise _bad(f"{where}: a data URL of type {mime or 'text/plain'!r} is not an image "
                   "(expected data:image/...;base64,...)", where, "invalid_image_format")
    if ";base64" not in match["params"].lower():
        raise _bad(f"{where}: the data URL is not base64-encoded (expected data:{mime};base64,...)", where,
                   "invalid_image_url")
    payload = re.sub(r"\s", "", match["data"])
    if not payload:
        raise _bad(f"{where}: the data URL carries no data", where, "invalid_image_url")
    return payload


def _read_s3(url: str, limit: int, where: str) -> bytes:
    """An allow-listed s3:// object (at most `limit` bytes); a store that is down is not the client's fault."""
    from sharegpt4v import storage

    try:
        store, key = storage.split(url)
        size = store.size(key)
        if size > limit:
            raise _bad(f"{where}: {size} bytes is over the limit of {limit} bytes", where, "image_too_large")
        return store.get_bytes(key)
    except (storage.ObjectNotFound, storage.BucketNotFound, ValueError):
        raise _bad(f"{where}: {redact_text(url)}: no such object", where, "invalid_image_url") from None
    except (storage.StoreUnavailable, storage.CredentialsError) as exc:
        raise OpenAIError(503, f"{where}: cannot read {redact_text(url)}: {redact_text(str(exc))}", param=where) from None
    except storage.StoreError as exc:
        raise _bad(f"{where}: cannot read {redact_text(url)}: {redact_text(str(exc))}", where, "invalid_image_url") from None


async def image_base64(image: Image | None, model: ServedModel, prefixes: tuple[str, ...], session: Any,
                       fetch_timeout_s: float) -> str:
    """The conversation's image as base64 for Triton: a data URL's payload, an allow-listed object or web
    image read here (size cap, timeout, no redirects), or the blank image when there is none."""
    if image is None:
        return blank_image_base64()
    url, where, limit = image.url, image.where, model.options.max_image_bytes
    if url.startswith("data:"):
        return data_url_payload(url, where)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("s3", "http", "https"):
        raise _bad(f"{where}: unsupported URL; send a data URL (data:image/png;base64,...) or an s3:// or "
                   "http(s):// URL on this server's fetch allow-list", where, "invalid_image_url")
    if not url_allowed(url, prefixes):
        listed = ", ".join(prefixes) if prefixes else "nothing: send the image as a data URL"
        raise _bad(f"{where}: {redact_text(url)} is not on this server's fetch allow-list ({listed})", where,
                   "image_url_not_allowed")
    if scheme == "s3":
        data = await asyncio.to_thread(_read_s3, url, limit, where)
    else:
        data = await _fetch_http(session, url, limit, where, fetch_timeout_s)
    return base64.b64encode(data).decode("ascii")


async def _fetch_http(session: Any, url: str, limit: int, where: str, fetch_timeout_s: float) -> bytes:
    import aiohttp

    shown = redact_text(url)
    try:
        async with session.get(url, allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=fetch_timeout_s)) as r:
            if r.status != 200:
                extra = " (redirects are not followed)" if 300 <= r.status < 400 else ""
                raise _bad(f"{where}: fetching {shown} answered HTTP {r.status}{extra}", where, "invalid_image_url")
            if r.content_length is not None and r.content_length > limit:
                raise _bad(f"{where}: {r.content_length} bytes is over the limit of {limit} bytes", where,
                           "image_too_large")
            data = bytearray()
            async for chunk in r.content.iter_chunked(1 << 16):
                data += chunk
                if len(data) > limit:
                    raise _bad(f"{where}: over the limit of {limit} bytes", where, "image_too_large")
            return bytes(data)
    except asyncio.TimeoutError:
        raise _bad(f"{where}: fetching {shown} took longer than {fetch_timeout_s:g} s", where,
                   "invalid_image_url") from None
    except aiohttp.ClientError as exc:
        raise _bad(f"{where}: fetching {shown} failed ({type(exc).__name__})", where, "invalid_image_url") from None


# Triton over HTTP ---------------------------------------------------------------------------------


def triton_base_url(url: str) -> str:
    """`http(s)://host[:port]` from a URL or a bare `host[:port]` (KServe's --predictor_host)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
        raise ValueError(f"Triton URL {url!r}: expected http://host:port (or host:port)")
    return url


def _v2_input(name: str, value: str | int | float) -> dict[str, Any]:
    """One `[1, 1]` input of a V2 JSON request (`serving.protocol.INPUTS`: BYTES, INT32 max_tokens, FP32)."""
    datatype = "BYTES" if isinstance(value, str) else "INT32" if name == "max_tokens" else "FP32"
    return {"name": name, "shape": [1, 1], "datatype": datatype, "data": [value]}


def _outputs(payload: dict[str, Any]) -> dict[str, Any]:
    """A V2 JSON infer response -> {output name: its one value}."""
    values = {}
    for out in payload.get("outputs", []):
        data = out.get("data") or [None]
        values[out["name"]] = data[0][0] if isinstance(data[0], list) else data[0]
    return values


def _triton_error(status: int, message: str, model: ServedModel, image: Image | None) -> OpenAIError:
    """Triton's error -> the OpenAI error: its 400s are the client's (the message names the input),
    `internal error (request id ...)` is a 500 (HTTP generate_stream answers every error with 400)."""
    if message.startswith("internal error") or status >= 500:
        return OpenAIError(500 if status != 503 else 503, f"{model.id}: {message}")
    if status in (400, 404) and ("unknown model" in message or "is not found" in message
                                 or "not ready" in message or "no version is available" in message):
        return OpenAIError(503, f"{model.id}: Triton does not serve model {model.triton!r} right now ({message})")
    head = message.split(":", 1)[0].strip()
    param = {"image": image.where if image else "messages", "max_tokens": "max_tokens", "temperature": "temperature",
             "prompt": "messages"}.get(head, "messages" if head.startswith("messages") else None)
    return OpenAIError(400, message, param=param)


class Triton:
    """The calls the front end makes to one Triton server (HTTP), with each model's config cached."""

    def __init__(self, base_url: str, timeout_s: float):
        self.base_url = triton_base_url(base_url)
        self.timeout_s = timeout_s
        self._session: Any = None
        self._models: dict[str, tuple[float, ServedModel]] = {}

    @property
    def session(self) -> Any:
        import aiohttp

        if self._session is None:
            # No cookies: image URLs of other hosts are fetched with the same session.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=10),
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def unreachable(self, exc: BaseException) -> OpenAIError:
        kind = "no answer in time" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
        return OpenAIError(504 if isinstance(exc, asyncio.TimeoutError) else 503,
                           f"the Triton server at {redact_text(self.base_url)} cannot be reached ({kind})")

    async def get_json(self, path: str) -> tuple[int, Any]:
        import aiohttp

        try:
            async with self.session.get(f"{self.base_url}{path}", timeout=aiohttp.ClientTimeout(total=30)) as r:
                return r.status, await r.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise self.unreachable(exc) from None

    async def ready(self) -> bool:
        try:
            status, _ = await self.get_json("/v2/health/ready")
        except OpenAIError:
            return False
        return status == 200

    async def model(self, model_id: str, triton_model: str) -> ServedModel:
        """The served model with its limits, from Triton's model config (cached for a minute: a new model
        version behind the same predictor may change them)."""
        cached = self._models.get(model_id)
        if cached is not None and time.monotonic() - cached[0] < CONFIG_TTL_S:
            return cached[1]
        status, config = await self.get_json(f"/v2/models/{triton_model}/config")
        if status != 200 or not isinstance(config, dict):
            message = config.get("error") if isinstance(config, dict) else None
            raise OpenAIError(503, f"{model_id}: Triton does not serve model {triton_model!r} right now "
                                   f"({message or f'HTTP {status}'})")
        try:
            options = ServingOptions.from_parameters(config.get("parameters") or {})
        except ValueError as exc:
            raise OpenAIError(503, f"{model_id}: Triton model {triton_model!r} is not a sharegpt4v model ({exc})") from None
        stream_model = None
        if options.task == "chat":
            twin = f"{triton_model}{STREAM_SUFFIX}"
            status, stream_config = await self.get_json(f"/v2/models/{twin}/config")
            if status == 200 and (stream_config.get("model_transaction_policy") or {}).get("decoupled"):
                stream_model = twin
        served = ServedModel(model_id, triton_model, options, stream_model)
        self._models[model_id] = (time.monotonic(), served)
        return served

    async def infer(self, model: ServedModel, values: dict[str, Any], request_id: str,
                    image: Image | None) -> dict[str, Any]:
        """One request (input name -> value) to the model's V2 `infer`: its outputs, or the OpenAI error."""
        import aiohttp

        url = f"{self.base_url}/v2/models/{model.triton}/infer"
        inputs = [_v2_input(name, value) for name, value in values.items()]
        try:
            async with self.session.post(url, json={"id": request_id, "inputs": inputs},
                                         timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as r:
                payload = await r.json(content_type=None)
                status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise self.unreachable(exc) from None
        if status != 200:
            raise _triton_error(status, str((payload or {}).get("error") or f"HTTP {status}"), model, image)
        return _outputs(payload)

    async def open_stream(self, model: ServedModel, body: dict[str, Any], image: Image | None) -> Any:
        """Triton's generate_stream response, once its first event is there (an error comes back as one)."""
        import aiohttp

        url = f"{self.base_url}/v2/models/{model.stream_model}/generate_stream"
        try:
            response = await self.session.post(url, json=body, timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=10, sock_read=self.timeout_s))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self.unreachable(exc) from None
        if response.status != 200:
            try:
                text = (await response.read()).decode("utf-8", "replace")
            finally:
                response.release()
            events = [_event(line) for line in text.splitlines() if line.startswith("data:")]
            message = next((e["error"] for e in events if isinstance(e, dict) and "error" in e), None)
            if message is None:
                try:
                    message = json.loads(text).get("error")
                except (ValueError, AttributeError):
                    message = None
            raise _triton_error(response.status, str(message or f"HTTP {response.status}"), model, image)
        return response


def _event(line: str) -> Any:
    try:
        return json.loads(line[len("data:"):].strip())
    except ValueError:
        return None


# responses ----------------------------------------------------------------------------------------


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chunk(id: str, created: int, model: str, delta: dict[str, Any] | None, finish: str | None = None,
           usage: dict[str, int] | None = None) -> bytes:
    chunk: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                             "system_fingerprint": None,
                             "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                                   "finish_reason": finish}]}
    if usage is not None:
        chunk["usage"] = usage
    return f"data: {json.dumps(chunk)}\n\n".encode()


def _error_event(error: OpenAIError) -> bytes:
    return f"data: {json.dumps(error.body())}\n\n".encode()


DONE = b"data: [DONE]\n\n"


async def whole(text: str, finish: str, usage: dict[str, int], id: str, created: int, model_id: str,
                chat: ChatRequest) -> AsyncIterator[bytes]:
    """A whole answer as a stream (a model without a streaming twin): role, text, finish, usage, [DONE]."""
    yield _chunk(id, created, model_id, {"role": "assistant", "content": ""})
    if text:
        yield _chunk(id, created, model_id, {"content": text})
    yield _chunk(id, created, model_id, {}, finish)
    if chat.include_usage:
        yield _chunk(id, created, model_id, None, usage=usage)
    yield DONE


async def relay(triton: Triton, upstream: Any, id: str, created: int, model: ServedModel,
                chat: ChatRequest) -> AsyncIterator[bytes]:
    """Triton's generate_stream events -> chat.completion.chunk events."""
    try:
        yield _chunk(id, created, model.id, {"role": "assistant", "content": ""})
        finish, usage = None, _usage(0, 0)
        async for line in upstream.content:
            text = line.decode("utf-8", "replace").strip()
            if not text.startswith("data:"):
                continue
            event = _event(text)
            if not isinstance(event, dict):
                continue
            if "error" in event:
                yield _error_event(_triton_error(400, str(event["error"]), model, chat.image))
                return
            if event.get("text"):
                yield _chunk(id, created, model.id, {"content": event["text"]})
            if event.get("finish_reason"):
                finish = str(event["finish_reason"])
                usage = _usage(int(event.get("prompt_tokens") or 0), int(event.get("completion_tokens") or 0))
        if finish is None:
            yield _error_event(OpenAIError(502, f"{model.id}: the stream from Triton ended without a finish reason"))
            return
        yield _chunk(id, created, model.id, {}, finish)
        if chat.include_usage:
            yield _chunk(id, created, model.id, None, usage=usage)
        yield DONE
    except Exception as exc:  # the connection to Triton broke mid-stream: tell the client in the stream
        yield _error_event(triton.unreachable(exc))
    finally:
        upstream.release()


# the app ------------------------------------------------------------------------------------------


def create_app(
    triton_url: str,
    models: dict[str, str] | None = None,
    fetch_allow: list[str] | tuple[str, ...] = (),
    *,
    api_key: str | None = None,
    timeout_s: float = 300.0,
    fetch_timeout_s: float = 10.0,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Any:
    """The FastAPI app: `models` maps OpenAI model ids to Triton model names (default: both served
    models); `fetch_allow` lists the s3:// and http(s):// prefixes image URLs may come from; with
    `api_key`, every /v1 and /v2 request needs `Authorization: Bearer <api_key>`."""
    models = dict(DEFAULT_MODELS if models is None else models)
    if not models:
        raise ValueError("models: serve at least one model")
    prefixes = tuple(check_fetch_prefix(p) for p in fetch_allow)
    triton = Triton(triton_url, timeout_s)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await triton.close()

    app = FastAPI(title="sharegpt4v OpenAI API", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.triton = triton

    def error_response(error: OpenAIError, request_id: str | None = None) -> Any:
        headers = {"x-request-id": request_id} if request_id else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Any, exc: OpenAIError) -> Any:
        if exc.status >= 500:
            log.error("%s %s: %s %s (request id %s)", request.method, request.url.path, exc.status, exc.message,
                      exc.request_id or "-")
        return error_response(exc, exc.request_id)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Any, exc: Any) -> Any:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(OpenAIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                          code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Any, exc: Any) -> Any:
        return error_response(_bad(f"invalid request: {exc.errors()[0].get('msg', exc)}"))

    def authorize(request: Any) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[len("Bearer "):] if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise OpenAIError(401, "Incorrect API key provided", code="invalid_api_key", type="invalid_request_error")

    async def read_body(request: Any) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise OpenAIError(413, f"request body: {declared} bytes is over the limit of {max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise OpenAIError(413, f"request body: over the limit of {max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        if await triton.ready():
            return {"status": "ready", "models": sorted(models)}
        return error_response(OpenAIError(503, f"the Triton server at {redact_text(triton.base_url)} is not ready"))

    def model_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": started, "owned_by": "sharegpt4v"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Any:
        authorize(request)
        return {"object": "list", "data": [model_card(m) for m in models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Any:
        authorize(request)
        if model_id not in models:
            raise OpenAIError(404, f"The model {model_id!r} does not exist (served: {', '.join(models)})",
                              param="model", code="model_not_found")
        return model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(f"request body: not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise _bad("request body: expected a JSON object")
        model_id = body.get("model")
        if not isinstance(model_id, str) or not model_id:
            raise _bad("model: missing (a model id from GET /v1/models)", "model")
        if model_id not in models:
            raise OpenAIError(404, f"The model {model_id!r} does not exist (served: {', '.join(models)})",
                              param="model", code="model_not_found")
        model = await triton.model(model_id, models[model_id])
        chat = parse_request(body, model)
        request_id = uuid.uuid4().hex[:24]  # Triton's request id too: its log and its 500 messages carry it
        try:
            return await complete(model, chat, request_id)
        except OpenAIError as exc:
            exc.request_id = request_id
            raise

    async def complete(model: ServedModel, chat: ChatRequest, request_id: str) -> Any:
        completion_id, created = f"chatcmpl-{request_id}", int(time.time())
        model_id = model.id
        image = await image_base64(chat.image, model, prefixes, triton.session, fetch_timeout_s)
        values: dict[str, Any] = {"image": image}
        if model.options.task == "chat":
            values["messages"] = json.dumps([{"role": r, "content": t} for r, t in chat.turns])
        if chat.max_tokens is not None:
            values["max_tokens"] = chat.max_tokens
        if chat.temperature is not None:
            values["temperature"] = chat.temperature
        headers = {"x-request-id": request_id}
        if chat.stream and model.stream_model is not None:
            upstream = await triton.open_stream(model, {"id": request_id, **values}, chat.image)
            return StreamingResponse(relay(triton, upstream, completion_id, created, model, chat), headers=headers,
                                     media_type="text/event-stream")
        out = await triton.infer(model, values, request_id, chat.image)
        text, finish = str(out.get("text") or ""), str(out.get("finish_reason") or "stop")
        usage = _usage(int(out.get("prompt_tokens") or 0), int(out.get("completion_tokens") or 0))
        if chat.stream:  # no streaming twin (the captioner): the whole answer as one chunk
            return StreamingResponse(whole(text, finish, usage, completion_id, created, model_id, chat),
                                     headers=headers, media_type="text/event-stream")
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        }, headers=headers)

    @app.api_route("/v2/{path:path}", methods=["GET", "POST"])
    async def v2(path: str, request: Request) -> Any:
        """Any other V2 request goes to Triton unchanged (KServe routes the service's traffic here)."""
        import aiohttp

        authorize(request)
        body = await read_body(request)
        keep = ("content-type", "content-encoding", "inference-header-content-length")
        headers = {k: v for k, v in request.headers.items() if k.lower() in keep}
        try:
            upstream = await triton.session.request(
                request.method, f"{triton.base_url}/v2/{path}", params=list(request.query_params.multi_items()),
                data=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=triton.timeout_s))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise triton.unreachable(exc) from None
        back = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "inference-header-content-length")}

        async def body_of() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.content.iter_any():
                    yield chunk
            finally:
                upstream.release()

        if "generate_stream" in path:
            return StreamingResponse(body_of(), status_code=upstream.status, headers=back)
        try:
            data = await upstream.read()
        finally:
            upstream.release()
        return Response(data, status_code=upstream.status, headers=back)

    return app


class FrontendError(PlatformError):
    """The OpenAI front end cannot start."""


def serve(app: Any, host: str, port: int) -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM (uvicorn's own handlers: a graceful stop)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind; it logged why
        server.started = False
    if not server.started:
        raise FrontendError(f"the OpenAI API could not listen on {host}:{port} (see the log above)")


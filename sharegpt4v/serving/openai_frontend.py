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

This module is the app: `create_app` (the routes, the API key, the body limit, and each request's way
from the OpenAI protocol to Triton and back, streamed or whole) and `serve`. Its neighbours hold the
rest: `openai_protocol` (checking a request body; OpenAI's error, usage and chunk bodies),
`image_fetch` (the conversation's image: data URLs, the fetch allow-list, the blank image) and
`triton_http` (the HTTP calls to Triton).

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

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from sharegpt4v.errors import PlatformError
from sharegpt4v.redact import redact_text
from sharegpt4v.serving.image_fetch import check_fetch_prefix, image_base64
from sharegpt4v.serving.openai_protocol import (
    DONE,
    ChatRequest,
    OpenAIError,
    ServedModel,
    bad_request,
    chunk_event,
    error_event,
    parse_request,
    usage_body,
)
from sharegpt4v.serving.triton_http import Triton, parse_event, triton_error

log = logging.getLogger(__name__)

DEFAULT_MODELS = {"sharegpt4v-chat": "chat", "sharegpt4v-captioner": "captioner"}  # OpenAI id -> Triton model
MAX_BODY_BYTES = 32 << 20  # a request body: the largest image limit (20 MB) as base64, and text


# streaming answers --------------------------------------------------------------------------------


async def whole(text: str, finish: str, usage: dict[str, int], id: str, created: int, model_id: str,
                chat: ChatRequest) -> AsyncIterator[bytes]:
    """A whole answer as a stream (a model without a streaming twin): role, text, finish, usage, [DONE]."""
    yield chunk_event(id, created, model_id, {"role": "assistant", "content": ""})
    if text:
        yield chunk_event(id, created, model_id, {"content": text})
    yield chunk_event(id, created, model_id, {}, finish)
    if chat.include_usage:
        yield chunk_event(id, created, model_id, None, usage=usage)
    yield DONE


async def relay(triton: Triton, upstream: Any, id: str, created: int, model: ServedModel,
                chat: ChatRequest) -> AsyncIterator[bytes]:
    """Triton's generate_stream events -> chat.completion.chunk events."""
    try:
        yield chunk_event(id, created, model.id, {"role": "assistant", "content": ""})
        finish, usage = None, usage_body(0, 0)
        async for line in upstream.content:
            text = line.decode("utf-8", "replace").strip()
            if not text.startswith("data:"):
                continue
            event = parse_event(text)
            if not isinstance(event, dict):
                continue
            if "error" in event:
                yield error_event(triton_error(400, str(event["error"]), model, chat.image))
                return
            if event.get("text"):
                yield chunk_event(id, created, model.id, {"content": event["text"]})
            if event.get("finish_reason"):
                finish = str(event["finish_reason"])
                usage = usage_body(int(event.get("prompt_tokens") or 0), int(event.get("completion_tokens") or 0))
        if finish is None:
            yield error_event(OpenAIError(502, f"{model.id}: the stream from Triton ended without a finish reason"))
            return
        yield chunk_event(id, created, model.id, {}, finish)
        if chat.include_usage:
            yield chunk_event(id, created, model.id, None, usage=usage)
        yield DONE
    except Exception as exc:  # the connection to Triton broke mid-stream: tell the client in the stream
        yield error_event(triton.unreachable(exc))
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
        return error_response(bad_request(f"invalid request: {exc.errors()[0].get('msg', exc)}"))

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
            raise bad_request(f"request body: not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise bad_request("request body: expected a JSON object")
        model_id = body.get("model")
        if not isinstance(model_id, str) or not model_id:
            raise bad_request("model: missing (a model id from GET /v1/models)", "model")
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
        usage = usage_body(int(out.get("prompt_tokens") or 0), int(out.get("completion_tokens") or 0))
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
        authorize(request)
        body = await read_body(request)
        keep = ("content-type", "content-encoding", "inference-header-content-length")
        headers = {k: v for k, v in request.headers.items() if k.lower() in keep}
        upstream = await triton.forward(request.method, path, list(request.query_params.multi_items()), body, headers)
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


"""The front end's calls to one Triton server, over Triton's HTTP API (KServe's V2 protocol).

One concern: talking to Triton: its address (`triton_base_url`), each model's config and limits
(cached), `/v2/models/<m>/infer`, the decoupled `<m>_stream` model's `generate_stream` (server-sent
events), and any other `/v2/...` request passed through unchanged; Triton's errors and an
unreachable server come back as `OpenAIError`s.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

from sharegpt4v.redact import redact_text
from sharegpt4v.serving.openai_protocol import Image, OpenAIError, ServedModel
from sharegpt4v.serving.protocol import ServingOptions

STREAM_SUFFIX = "_stream"  # the decoupled twin of a Triton model (repository.STREAM_MODEL = "chat" + this)
CONFIG_TTL_S = 60.0


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


def triton_error(status: int, message: str, model: ServedModel, image: Image | None) -> OpenAIError:
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
            raise triton_error(status, str((payload or {}).get("error") or f"HTTP {status}"), model, image)
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
            events = [parse_event(line) for line in text.splitlines() if line.startswith("data:")]
            message = next((e["error"] for e in events if isinstance(e, dict) and "error" in e), None)
            if message is None:
                try:
                    message = json.loads(text).get("error")
                except (ValueError, AttributeError):
                    message = None
            raise triton_error(response.status, str(message or f"HTTP {response.status}"), model, image)
        return response

    async def forward(self, method: str, path: str, params: list[tuple[str, str]], body: bytes,
                      headers: dict[str, str]) -> Any:
        """A `/v2/<path>` request passed through unchanged: Triton's response (the caller reads and releases it)."""
        import aiohttp

        try:
            return await self.session.request(
                method, f"{self.base_url}/v2/{path}", params=params, data=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.timeout_s))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self.unreachable(exc) from None


def parse_event(line: str) -> Any:
    """The JSON of a server-sent `data: ...` line; None when it is not JSON."""
    try:
        return json.loads(line[len("data:"):].strip())
    except ValueError:
        return None

"""Clients for the served models over the V2 inference protocol (`tritonclient`, HTTP or gRPC).

Works against any V2 endpoint: the local Triton (`sharegpt4v serve local`), or a KServe
InferenceService through its ingress, where `host` is the service's hostname (sent as the HTTP
`Host` header, or as the gRPC `:authority`).

    caption("http://127.0.0.1:8000", image_bytes)                       -> {"text", "finish_reason", ...}
    chat("127.0.0.1:8001", image_bytes, "What is left of the circle?", protocol="grpc")
    for piece in stream_chat("127.0.0.1:8001", image_bytes, messages): ...   (decoupled chat_stream)
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np

from sharegpt4v.errors import PlatformError
from sharegpt4v.serving.protocol import INPUTS

Protocol = Literal["http", "grpc"]
DEFAULT_URLS = {"http": "http://127.0.0.1:8000", "grpc": "127.0.0.1:8001"}


class ServingClientError(PlatformError):
    """The server refused a request or could not be reached; the message is the server's."""


def _endpoint(url: str, protocol: str) -> tuple[str, bool]:
    """(host:port, tls) from `http(s)://host:port[/]` or `host:port`."""
    parsed = urlparse(url if "://" in url else f"{'http' if protocol == 'http' else 'grpc'}://{url}")
    if not parsed.netloc:
        raise ServingClientError(f"{url}: not a server URL (expected http://host:port or host:port)")
    if parsed.path.strip("/"):
        raise ServingClientError(f"{url}: give the server's base URL; the V2 paths are added by the client")
    tls = parsed.scheme in ("https", "grpcs")
    port = parsed.port or (443 if tls else 80)
    return f"{parsed.hostname}:{port}", tls


def connect(url: str, protocol: Protocol = "http", host: str | None = None, timeout: float = 120.0) -> Any:
    """A tritonclient InferenceServerClient for `url` (`host`: the virtual host behind an ingress)."""
    endpoint, tls = _endpoint(url, protocol)
    if protocol == "http":
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(endpoint, ssl=tls, connection_timeout=timeout, network_timeout=timeout)
    if protocol == "grpc":
        import tritonclient.grpc as grpcclient

        channel_args = [("grpc.default_authority", host)] if host else None
        return grpcclient.InferenceServerClient(endpoint, ssl=tls, channel_args=channel_args)
    raise ServingClientError(f"protocol: {protocol!r} is not http or grpc")


def _module(protocol: str) -> Any:
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    return module


def _headers(protocol: str, host: str | None) -> dict[str, str] | None:
    return {"Host": host} if host and protocol == "http" else None


def build_inputs(task: str, values: dict[str, Any], protocol: Protocol = "http") -> list[Any]:
    """InferInputs ([1, 1] each) for one request; `values` maps input names to bytes/str/int/float, None = not sent."""
    module = _module(protocol)
    inputs = []
    for spec in INPUTS[task]:
        value = values.get(spec.name)
        if value is None:
            continue
        if spec.client_dtype == "BYTES":
            array = np.array([[value.encode() if isinstance(value, str) else bytes(value)]], dtype=object)
        elif spec.client_dtype == "INT32":
            array = np.array([[value]], dtype=np.int32)
        else:
            array = np.array([[value]], dtype=np.float32)
        tensor = module.InferInput(spec.name, list(array.shape), spec.client_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _result(result: Any) -> dict[str, Any]:
    text = result.as_numpy("text")
    finish = result.as_numpy("finish_reason")
    out: dict[str, Any] = {
        "text": text.reshape(-1)[0].decode("utf-8") if text is not None else "",
        "finish_reason": finish.reshape(-1)[0].decode("utf-8") if finish is not None else "",
    }
    for name in ("prompt_tokens", "completion_tokens"):
        value = result.as_numpy(name)
        out[name] = int(value.reshape(-1)[0]) if value is not None else 0
    return out


def infer(
    url: str,
    task: str,
    values: dict[str, Any],
    protocol: Protocol = "http",
    host: str | None = None,
    model: str | None = None,
    timeout: float = 120.0,
    client: Any = None,
) -> dict[str, Any]:
    """One request to a served model; returns {"text", "finish_reason", "prompt_tokens", "completion_tokens"}."""
    from tritonclient.utils import InferenceServerException

    model = model or ("captioner" if task == "caption" else "chat")
    own = client is None
    client = client or connect(url, protocol, host, timeout)
    try:
        if protocol == "http":
            result = client.infer(model, build_inputs(task, values, protocol), headers=_headers(protocol, host))
        else:
            result = client.infer(model, build_inputs(task, values, protocol), client_timeout=timeout)
    except InferenceServerException as exc:
        raise ServingClientError(f"{model}: {exc.message() or exc}") from None
    except OSError as exc:
        raise ServingClientError(f"{url}: cannot reach the server ({exc})") from None
    finally:
        if own:
            client.close()
    return _result(result)


def _messages(messages: str | list[dict[str, str]]) -> str:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return json.dumps(messages)


def caption(
    url: str,
    image: bytes,
    protocol: Protocol = "http",
    host: str | None = None,
    model: str = "captioner",
    prompt: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    timeout: float = 120.0,
    client: Any = None,
) -> dict[str, Any]:
    """A detailed caption of `image` (encoded bytes) from the captioner."""
    values = {"image": image, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
    return infer(url, "caption", values, protocol, host, model, timeout, client)


def chat(
    url: str,
    image: bytes,
    messages: str | list[dict[str, str]],
    protocol: Protocol = "http",
    host: str | None = None,
    model: str = "chat",
    max_tokens: int | None = None,
    temperature: float | None = None,
    timeout: float = 120.0,
    client: Any = None,
) -> dict[str, Any]:
    """The chat model's answer to `messages` (a question, or [{"role", "content"}, ...]) about `image`."""
    values = {"image": image, "messages": _messages(messages), "max_tokens": max_tokens, "temperature": temperature}
    return infer(url, "chat", values, protocol, host, model, timeout, client)


def stream_chat(
    url: str,
    image: bytes,
    messages: str | list[dict[str, str]],
    host: str | None = None,
    model: str = "chat_stream",
    max_tokens: int | None = None,
    temperature: float | None = None,
    timeout: float = 120.0,
) -> Iterator[dict[str, Any]]:
    """Stream an answer from the decoupled chat model over gRPC: yields {"text": piece} as tokens
    arrive, then one last {"text": "", "finish_reason", "prompt_tokens", "completion_tokens"}."""
    from tritonclient.utils import InferenceServerException

    client = connect(url, "grpc", host, timeout)
    responses: queue.Queue = queue.Queue()
    values = {"image": image, "messages": _messages(messages), "max_tokens": max_tokens, "temperature": temperature}
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=timeout)
        client.async_stream_infer(model, build_inputs("chat", values, "grpc"), enable_empty_final_response=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                result, error = responses.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise ServingClientError(f"{model}: no response within {timeout:.0f}s") from None
            if error is not None:
                message = error.message() if isinstance(error, InferenceServerException) else str(error)
                raise ServingClientError(f"{model}: {message}")
            final = result.get_response().parameters.get("triton_final_response")
            is_final = bool(final is not None and final.bool_param)
            if result.as_numpy("text") is not None:
                piece = _result(result)
                if piece["finish_reason"]:
                    yield piece
                elif piece["text"]:
                    yield {"text": piece["text"]}
            if is_final:
                return
    finally:
        client.stop_stream()
        client.close()


def wait_ready(url: str, protocol: Protocol = "http", host: str | None = None, timeout: float = 60.0) -> None:
    """Wait until the server reports ready (every model loaded)."""
    deadline = time.monotonic() + timeout
    client = connect(url, protocol, host)
    try:
        while True:
            try:
                if client.is_server_ready(headers=_headers(protocol, host)):
                    return
            except Exception:  # not listening yet
                pass
            if time.monotonic() > deadline:
                raise ServingClientError(f"{url}: server not ready after {timeout:.0f}s")
            time.sleep(0.2)
    finally:
        client.close()

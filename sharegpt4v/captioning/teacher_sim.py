"""A synthetic teacher: an OpenAI-compatible endpoint that captions synthetic-world images.

This is a test double for the paid teacher VLM, never a model. It decodes the image of each
chat-completions request, looks its sha256 up in an index of a synthetic world (built by
streaming the world dataset, or passed in as a dict) and answers with that image's ground-truth
detailed caption. Unknown images get a 400, a missing bearer token a 401.

Faults can be switched on at runtime (from Python or `POST /admin/faults`) at a given rate:
`429` (with Retry-After), `500`, `503`, `slow` (sleeps past the client's timeout), `malformed`
(a 200 whose body is not JSON), `short`, `refusal` and `truncated` answers. Which request gets
which fault is drawn from a seeded generator, so a run with one request at a time is
reproducible. `GET /admin/stats` reports requests, faults served and peak concurrency;
`GET /admin/requests` (or `requests_by_image()`) how many chat requests each image got, by sha256,
so a test can prove that nothing was asked (and paid for) twice.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULT_KINDS = ("429", "500", "503", "slow", "malformed", "short", "refusal", "truncated")
IMAGE_PROMPT_TOKENS = 85  # what one image costs in prompt tokens (a fixed, low-detail price)
SIM_MODEL = "teacher-sim"
REFUSAL_TEXT = "I'm sorry, but I can't help with that."


@dataclass
class Faults:
    rate: float = 0.0  # share of chat requests that get a fault
    kinds: tuple[str, ...] = FAULT_KINDS  # drawn uniformly among these
    latency_s: float = 0.0  # added to every chat request (benchmarks)
    retry_after_s: float = 1.0  # sent as Retry-After with the 429 fault
    slow_s: float = 5.0  # how long the `slow` fault sleeps: set it above the client's timeout

    def __post_init__(self) -> None:
        self.kinds = tuple(str(k) for k in self.kinds)
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kind(s) {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError("fault rate must be within [0, 1]")
        if self.rate > 0 and not self.kinds:
            raise ValueError("a positive fault rate needs at least one kind")
        if min(self.latency_s, self.retry_after_s, self.slow_s) < 0:
            raise ValueError("latency_s, retry_after_s and slow_s must be >= 0")


def world_caption_index(world_uri: str) -> dict[str, str]:
    """sha256 of each image -> its detailed caption, streamed from a synthetic-world dataset."""
    from sharegpt4v.data.shards import open_dataset, sample_meta

    index: dict[str, str] = {}
    for sample in open_dataset(world_uri).samples():
        meta = sample_meta(sample)
        index[meta["sha256"]] = meta["detailed_caption"]
    return index


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default listen backlog of 5 drops bursts of new connections


class _BadRequest(Exception):
    pass


def _words(text: str) -> int:
    return len(text.split())


def _parse_chat(body: bytes) -> tuple[str, str, bytes]:
    """(model, prompt text, image bytes) of a chat-completions request, or _BadRequest."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _BadRequest("request body is not valid JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
        raise _BadRequest("'messages' must be a list")
    texts: list[str] = []
    images: list[str] = []
    for message in payload["messages"]:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
                if isinstance(url, str):
                    images.append(url)
    if len(images) != 1:
        raise _BadRequest(f"expected exactly one image_url part, got {len(images)}")
    url = images[0]
    if not url.startswith("data:") or ";base64," not in url:
        raise _BadRequest("image_url must be a base64 data URL")
    try:
        image = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise _BadRequest("image_url holds invalid base64") from None
    if not image:
        raise _BadRequest("image is empty")
    model = payload.get("model") if isinstance(payload.get("model"), str) else SIM_MODEL
    return model, "\n".join(texts), image


class TeacherSim:
    """The synthetic teacher server. `start()` returns the `/v1` base URL for an OpenAI client."""

    def __init__(
        self,
        captions: dict[str, str] | None = None,
        world_uri: str | None = None,
        faults: Faults | dict[str, Any] | None = None,
        seed: int = 0,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        if captions is None and world_uri is None:
            raise ValueError("TeacherSim needs captions (sha256 -> caption) or a world_uri")
        self.captions = dict(captions or {})
        if world_uri is not None:
            self.captions.update(world_caption_index(world_uri))
        self.api_key = api_key  # when set, only this bearer token is accepted
        self.host, self.port = host, port
        self._faults = faults if isinstance(faults, Faults) else Faults(**(faults or {}))
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._requests = 0
        self._chat_requests = 0
        self._status: Counter[int] = Counter()
        self._faults_served: Counter[str] = Counter()
        self._by_image: Counter[str] = Counter()
        self._in_flight = 0
        self._max_in_flight = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- Python control -------------------------------------------------------------------
    def set_faults(self, faults: Faults | None = None, **changes: Any) -> Faults:
        """Replace the fault settings (`faults`) or change some fields (`rate=0.2, kinds=[...]`)."""
        with self._lock:
            base = faults if faults is not None else self._faults
            self._faults = dataclasses.replace(base, **changes)
            return self._faults

    @property
    def faults(self) -> Faults:
        with self._lock:
            return self._faults

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self._requests,
                "chat_requests": self._chat_requests,
                "status": {str(k): v for k, v in sorted(self._status.items())},
                "faults": dict(sorted(self._faults_served.items())),
                "in_flight": self._in_flight,
                "max_concurrent": self._max_in_flight,
            }

    def requests_by_image(self) -> dict[str, int]:
        """sha256 of an image -> chat requests that carried it (answered, faulted or refused)."""
        with self._lock:
            return dict(self._by_image)

    def reset_stats(self) -> None:
        with self._lock:
            self._requests = self._chat_requests = self._max_in_flight = 0
            self._status.clear()
            self._faults_served.clear()
            self._by_image.clear()

    def _count_image(self, image: bytes) -> None:
        with self._lock:
            self._by_image[hashlib.sha256(image).hexdigest()] += 1

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("TeacherSim is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> str:
        self._server = _Server((self.host, self.port), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="teacher-sim", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "TeacherSim":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- request handling -----------------------------------------------------------------
    def _draw_fault(self) -> tuple[str | None, Faults]:
        with self._lock:
            faults = self._faults
            # Always draw twice so the sequence of choices does not depend on the outcomes.
            hit, pick = self._rng.random(), self._rng.random()
            if faults.rate <= 0 or hit >= faults.rate or not faults.kinds:
                return None, faults
            kind = faults.kinds[min(int(pick * len(faults.kinds)), len(faults.kinds) - 1)]
            self._faults_served[kind] += 1
            return kind, faults

    def _enter(self) -> None:
        with self._lock:
            self._chat_requests += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _count(self, status: int) -> None:
        with self._lock:
            self._requests += 1
            self._status[status] += 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the OpenAI client expects
            timeout = 60  # an idle keep-alive connection frees its thread after this
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes | dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                sim._count(status)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (timeout): nothing to do

            def _error(self, status: int, message: str, type_: str, code: str | None = None,
                       headers: dict[str, str] | None = None) -> None:
                body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
                self._send(status, body, headers)

            def _body(self) -> bytes:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = 0
                return self.rfile.read(length) if length > 0 else b""

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    model = {"id": SIM_MODEL, "object": "model", "created": 0, "owned_by": "sharegpt4v"}
                    self._send(200, {"object": "list", "data": [model]})
                elif self.path.rstrip("/") == "/admin/stats":
                    self._send(200, sim.stats())
                elif self.path.rstrip("/") == "/admin/requests":
                    self._send(200, sim.requests_by_image())
                else:
                    self._error(404, f"no route {self.path}", "invalid_request_error", "not_found")

            def do_POST(self) -> None:
                body = self._body()
                path = self.path.rstrip("/")
                if path == "/admin/faults":
                    try:
                        changes = json.loads(body or b"{}")
                        if not isinstance(changes, dict):
                            raise TypeError("body must be a JSON object")
                        faults = sim.set_faults(**changes)
                    except (ValueError, TypeError) as exc:
                        self._error(400, f"bad fault settings: {exc}", "invalid_request_error")
                        return
                    self._send(200, dataclasses.asdict(faults))
                elif path == "/v1/chat/completions":
                    sim._enter()
                    try:
                        self._chat(body)
                    finally:
                        sim._leave()
                else:
                    self._error(404, f"no route {self.path}", "invalid_request_error", "not_found")

            def _chat(self, body: bytes) -> None:
                auth = self.headers.get("Authorization", "")
                token = auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else ""
                if not token or (sim.api_key is not None and token != sim.api_key):
                    self._error(401, "missing or invalid API key", "invalid_request_error", "invalid_api_key")
                    return
                try:
                    model, prompt, image = _parse_chat(body)
                except _BadRequest as exc:
                    self._error(400, str(exc), "invalid_request_error")
                    return
                sim._count_image(image)
                caption = sim.captions.get(hashlib.sha256(image).hexdigest())
                if caption is None:
                    self._error(400, "unknown image: not in the synthetic world", "invalid_request_error", "unknown_image")
                    return
                kind, faults = sim._draw_fault()
                if faults.latency_s:
                    time.sleep(faults.latency_s)
                if kind == "429":
                    seconds = faults.retry_after_s
                    retry_after = str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"
                    self._error(429, "rate limit reached (injected)", "requests", "rate_limit_exceeded",
                                headers={"Retry-After": retry_after})
                    return
                if kind in ("500", "503"):
                    self._error(int(kind), "server error (injected)", "server_error")
                    return
                if kind == "malformed":
                    self._send(200, b'{"id": "chatcmpl-broken", "choices": [')
                    return
                if kind == "slow":
                    time.sleep(faults.slow_s)
                finish = "stop"
                if kind == "short":
                    caption = " ".join(caption.split()[:3])
                elif kind == "refusal":
                    caption = REFUSAL_TEXT
                elif kind == "truncated":
                    caption, finish = caption[: len(caption) // 2], "length"
                prompt_tokens = _words(prompt) + IMAGE_PROMPT_TOKENS
                completion_tokens = _words(caption)
                self._send(200, {
                    "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": caption, "refusal": None},
                        "finish_reason": finish,
                    }],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                })

        return Handler


def serve_forever(
    world_uri: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    faults: Faults | dict[str, Any] | None = None,
    seed: int = 0,
    api_key: str | None = None,
) -> None:
    """Run the synthetic teacher in the foreground until interrupted (for a CLI)."""
    sim = TeacherSim(world_uri=world_uri, faults=faults, seed=seed, api_key=api_key, host=host, port=port)
    url = sim.start()
    try:
        # Announced inside the try: a stop signal can land while the line is being flushed (a caller that
        # waits for it may stop the server at once), and must still end in a clean stop.
        print(f"synthetic teacher serving {len(sim.captions)} images at {url}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()

"""The teacher client: captions images with a VLM behind an OpenAI-compatible endpoint.

One chat-completions request per image (the versioned teacher prompt plus the image as a
data URL), `cfg.concurrency` requests in flight, a client-side token bucket at
`cfg.requests_per_minute` shared by all threads, and our own retry loop (the SDK's is off):
exponential backoff with full jitter that honours Retry-After on 429/503. Per-image failures
come back as error results with a reason code; only a rejected key (401/403: every request
would fail) raises `TeacherError`, and the spending cap raises `BudgetExceeded`.

The API key is read from the environment (a Kubernetes Secret), passed to the SDK and never
written anywhere else: not in `name`, results, stats, exception messages or logs.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import openai

from sharegpt4v.captioning.prompts import PROMPT_VERSION, teacher_prompt
from sharegpt4v.captioning.records import BudgetExceeded, CaptionRequest, CaptionResult
from sharegpt4v.config import TeacherConfig
from sharegpt4v.errors import PlatformError
from sharegpt4v.redact import redact_text

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 300.0  # a server asking for longer than this is not waited on in full
# A retried cause -> the reason recorded once retries are exhausted.
_EXHAUSTED_REASON = {
    "rate_limited": "rate_limited",
    "server_error": "server_error",
    "timeout": "timeout",
    "connection": "connection",
    "malformed": "malformed",
}
# Answers that open like this are refusals, not captions.
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i apologi[sz]e|unfortunately,? i|i can(?:not|'t)|"
    r"i'?m (?:not able|unable)|i am (?:not able|unable)|i won'?t be able)",
    re.IGNORECASE,
)


class TeacherError(PlatformError):
    """The teacher cannot be used at all (missing settings, key rejected, unreachable).

    `results`: what finished (and was paid for) before the stop; the job records them first.
    """

    results: list[CaptionResult] = []


class TeacherUnavailable(TeacherError):
    """An outage, not bad input: retries of a transport failure ran out. The job stops; a rerun continues."""


# Retry causes that say the teacher (or the way to it) is down, not that an image is bad.
_OUTAGE_CAUSES = ("rate_limited", "server_error", "timeout", "connection")


def image_mime(image: bytes) -> str | None:
    if image.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if image.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "image/webp"
    return None


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text.replace("\u2019", "'")))


class RateLimiter:
    """Token bucket shared by threads: `per_minute` requests on average, bursts up to `burst`."""

    def __init__(self, per_minute: float, burst: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, burst)
        self._tokens = self.capacity
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self, abort: threading.Event) -> bool:
        """Take one token, waiting as needed; False if `abort` was set while waiting."""
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return True
                wait = (1.0 - self._tokens) / self.rate
            if abort.wait(wait):
                return False


@dataclass
class _Retry:
    """A failed attempt worth retrying: the cause, a detail line, and the server's Retry-After."""

    cause: str
    detail: str
    retry_after: float | None = None


@dataclass
class _Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class TeacherClient:
    """The `Captioner` for the teacher VLM. Thread-safe; one object = one budget."""

    def __init__(self, cfg: TeacherConfig, base_url: str | None = None, api_key: str | None = None):
        self.cfg = cfg
        base_url = base_url or os.environ.get(cfg.base_url_env)
        api_key = api_key or os.environ.get(cfg.api_key_env)
        if not base_url:
            raise TeacherError(f"teacher base URL missing: set environment variable {cfg.base_url_env}")
        if not api_key:
            raise TeacherError(f"teacher API key missing: set environment variable {cfg.api_key_env}")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TeacherError(f"teacher base URL from {cfg.base_url_env} is not an http(s) URL")
        host = parts.hostname + (f":{parts.port}" if parts.port else "")  # never any userinfo
        self.name = f"teacher:{cfg.model}@{host}"
        # What decides its captions (a caption set records it; the endpoint may move, the model may not).
        self.identity = {"teacher": cfg.model, "prompts": PROMPT_VERSION, "max_tokens": cfg.max_tokens,
                         "temperature": cfg.temperature, "min_caption_chars": cfg.min_caption_chars}
        self._secret = api_key
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=cfg.timeout_s)
        self._limiter = RateLimiter(cfg.requests_per_minute, burst=min(cfg.concurrency, cfg.requests_per_minute / 60.0))
        self._slots = threading.BoundedSemaphore(cfg.concurrency)  # requests in flight, across calls
        self._lock = threading.Lock()
        self._requests = 0
        self._results = 0
        self._ok = 0
        self._retries: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._spent = 0.0

    # ---- public ---------------------------------------------------------------------------
    def caption_batch(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        """One result per request, in order; raises BudgetExceeded if the cap stopped the batch, TeacherError
        (with the finished `results`) if the teacher cannot answer: rejected key, retries of an outage ran out."""
        if not requests:
            return []
        if self._budget_spent():
            raise BudgetExceeded(self._budget_message(), [])
        abort = threading.Event()  # set on a fatal error: every worker of this batch stops
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(requests)),
                                thread_name_prefix="teacher") as pool:
            futures = [pool.submit(self._caption_one, r, abort) for r in requests]
            results: list[CaptionResult | None] = []
            fatal: BaseException | None = None
            for future in futures:
                try:
                    results.append(future.result())
                except TeacherError as exc:
                    fatal = fatal or exc
                    results.append(None)
        finished = [r for r in results if r is not None]
        if fatal is not None:
            fatal.results = finished  # paid for: the job records them before it stops
            raise fatal
        if len(finished) < len(requests):
            raise BudgetExceeded(self._budget_message(), finished)
        return finished

    def stats(self) -> dict[str, Any]:
        """Counters for a job's log: requests sent, retries by cause, errors by reason, spend."""
        with self._lock:
            return {
                "captioner": self.name,
                "requests_sent": self._requests,
                "results": self._results,
                "ok": self._ok,
                "retries": dict(sorted(self._retries.items())),
                "retries_total": sum(self._retries.values()),
                "errors": dict(sorted(self._errors.items())),
                "prompt_tokens": self._prompt_tokens,
                "completion_tokens": self._completion_tokens,
                "spent_usd": round(self._spent, 6),
                "budget_usd": self.cfg.budget_usd,
            }

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- one image ------------------------------------------------------------------------
    def _caption_one(self, request: CaptionRequest, abort: threading.Event) -> CaptionResult | None:
        """The final result for `request`, or None if it was stopped (budget, fatal error) first."""
        prompt_id, prompt = teacher_prompt(request.source)
        started = time.perf_counter()
        usage = _Usage()
        mime = image_mime(request.image)
        if mime is None:
            return self._finish(CaptionResult.error(request.id, "bad_image", "image is not PNG, JPEG or WebP",
                                                    prompt_id=prompt_id, attempts=0))
        data_url = f"data:{mime};base64,{base64.b64encode(request.image).decode('ascii')}"
        attempts = 0
        while True:
            if self._budget_spent() or not self._limiter.acquire(abort) or self._budget_spent() or abort.is_set():
                return None
            attempts += 1
            try:
                outcome = self._attempt(request.id, prompt, data_url, usage)
            except TeacherError:
                abort.set()  # every other request would fail the same way: stop them now
                raise
            if isinstance(outcome, CaptionResult):
                result = outcome
                break
            if attempts > self.cfg.max_retries:
                if outcome.cause in _OUTAGE_CAUSES:  # not this image's fault: stop, record nothing for it
                    abort.set()
                    raise TeacherUnavailable(f"teacher at {self.name}: {outcome.cause} after {attempts} attempts "
                                             f"({outcome.detail}); stopped, a rerun continues")
                result = CaptionResult.error(request.id, _EXHAUSTED_REASON[outcome.cause],
                                             f"{outcome.detail} (after {attempts} attempts)")
                break
            with self._lock:
                self._retries[outcome.cause] += 1
            delay = self._backoff(attempts - 1, outcome.retry_after)
            log.debug("teacher request %s: %s; retry %d in %.2fs", request.id, outcome.cause, attempts, delay)
            if abort.wait(delay):
                return None
        result.prompt_id = prompt_id
        result.attempts = attempts
        result.seconds = time.perf_counter() - started
        result.prompt_tokens, result.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        result.cost_usd = usage.cost_usd
        return self._finish(result)

    def _attempt(self, id: str, prompt: str, data_url: str, usage: _Usage) -> CaptionResult | _Retry:
        """Send one request: a final result, or what to retry. Raises TeacherError on 401/403."""
        messages: Any = [{
            "role": "user",
            "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": {"url": data_url}},
            ],
        }]
        with self._slots:
            with self._lock:
                self._requests += 1
            try:
                raw = self._client.chat.completions.with_raw_response.create(
                    model=self.cfg.model, messages=messages,
                    max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                )
                body = raw.http_response.read()
            except openai.APITimeoutError:
                return _Retry("timeout", f"no answer within {self.cfg.timeout_s:g}s")
            except openai.APIConnectionError as exc:
                return _Retry("connection", self._redact(f"connection failed: {type(exc.__cause__ or exc).__name__}"))
            except openai.APIStatusError as exc:
                return self._status_error(id, exc)
        return self._parse(id, body, usage)

    def _status_error(self, id: str, exc: openai.APIStatusError) -> CaptionResult | _Retry:
        status = exc.status_code
        if status in (401, 403):
            # The server's message may quote part of the key: report the status only.
            raise TeacherError(f"teacher at {self.name} rejected the API key from {self.cfg.api_key_env} "
                               f"(HTTP {status}); no request can succeed") from None
        detail = self._redact(f"HTTP {status}: {_error_message(exc)}")
        if status == 429:
            return _Retry("rate_limited", detail, _retry_after(exc.response.headers))
        if status == 408:
            return _Retry("timeout", detail)
        if status >= 500:
            retry_after = _retry_after(exc.response.headers) if status == 503 else None
            return _Retry("server_error", detail, retry_after)
        return CaptionResult.error(id, "not_found" if status == 404 else "bad_request", detail)

    def _parse(self, id: str, body: bytes, usage: _Usage) -> CaptionResult | _Retry:
        """Turn a 200 body into a result; unreadable bodies are retried as `malformed`."""
        try:
            payload = json.loads(body)
            choice = payload["choices"][0]
            message = choice["message"]
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            return _Retry("malformed", f"unreadable response: {type(exc).__name__}")
        self._add_usage(payload.get("usage"), usage)
        caption = (content or "").strip()
        finish = choice.get("finish_reason")
        if message.get("refusal"):
            return CaptionResult.error(id, "refusal", self._redact(f"refused: {str(message['refusal'])[:200]}"))
        if finish == "content_filter":
            return CaptionResult.error(id, "refusal", "stopped by the content filter")
        if finish == "length":
            return CaptionResult.error(id, "truncated", f"hit max_tokens={self.cfg.max_tokens} after {len(caption)} chars")
        if not caption:
            return CaptionResult.error(id, "empty", "the answer is empty")
        if is_refusal(caption):
            return CaptionResult.error(id, "refusal", self._redact(f"refused: {caption[:200]}"))
        if len(caption) < self.cfg.min_caption_chars:
            return CaptionResult.error(id, "short", f"{len(caption)} chars < min_caption_chars={self.cfg.min_caption_chars}")
        return CaptionResult(id=id, status="ok", caption=caption)

    # ---- bookkeeping ----------------------------------------------------------------------
    def _add_usage(self, raw: Any, usage: _Usage) -> None:
        if not isinstance(raw, dict):
            return
        try:
            prompt_tokens, completion_tokens = int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0)
        except (TypeError, ValueError):
            return
        cost = (prompt_tokens * self.cfg.usd_per_1k_prompt_tokens
                + completion_tokens * self.cfg.usd_per_1k_completion_tokens) / 1000.0
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
        usage.cost_usd += cost
        with self._lock:
            self._prompt_tokens += prompt_tokens
            self._completion_tokens += completion_tokens
            self._spent += cost

    def _finish(self, result: CaptionResult) -> CaptionResult:
        with self._lock:
            self._results += 1
            if result.status == "ok":
                self._ok += 1
            else:
                self._errors[result.reason or "unknown"] += 1
        if result.status != "ok":
            log.info("teacher request %s failed: %s (%s)", result.id, result.reason, result.detail)
        return result

    def _budget_spent(self) -> bool:
        if self.cfg.budget_usd is None:
            return False
        with self._lock:
            return self._spent >= self.cfg.budget_usd

    def _budget_message(self) -> str:
        with self._lock:
            spent = self._spent
        return f"teacher budget reached: spent ${spent:.4f} of ${self.cfg.budget_usd:.4f}"

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**retry)], but never below Retry-After."""
        delay = random.uniform(0.0, min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2**retry))
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        return delay

    def _redact(self, text: str) -> str:
        text = redact_text(text)  # a URL the server quotes back: no userinfo, no signed query
        return text.replace(self._secret, "***") if self._secret else text


def _retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds form; an HTTP date is ignored)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if seconds >= 0:
            return seconds
    return None


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"][:200]
    return exc.__class__.__name__

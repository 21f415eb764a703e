"""Caption records and the captioner interface shared by the teacher client and the local engine.

A caption record is one row per image (ARCHITECTURE.md): `id`, `image_sha256`, `source`,
`caption`, `captioner`, `prompt_id`, token counts, timing, `status` (ok / error) and, for
errors, a `reason` code and a `detail` line. Records are stored per shard as JSONL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

# The one fixed instruction the captioner (Share-Captioner) is trained and run with.
CAPTION_INSTRUCTION = "Describe this image comprehensively and in detail."

RECORD_FIELDS = (
    "id", "image_sha256", "source", "caption", "captioner", "prompt_id", "prompt_tokens",
    "completion_tokens", "seconds", "attempts", "cost_usd", "status", "reason", "detail",
)


@dataclass
class CaptionRequest:
    id: str
    image: bytes  # encoded PNG/JPEG as stored in the shard
    source: str  # e.g. photo / text / art, coco / textcaps / wikiart: selects the teacher prompt
    sha256: str  # of `image`


@dataclass
class CaptionResult:
    id: str
    status: Literal["ok", "error"]
    caption: str | None = None
    prompt_id: str = ""  # which versioned prompt produced it (the teacher's depends on the source)
    reason: str | None = None  # short code for errors: refusal, empty, truncated, malformed, timeout, ...
    detail: str | None = None  # one human-readable line
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    attempts: int = 1
    cost_usd: float = 0.0

    @classmethod
    def error(cls, id: str, reason: str, detail: str, **kw: Any) -> "CaptionResult":
        return cls(id=id, status="error", reason=reason, detail=detail, **kw)


class BudgetExceeded(RuntimeError):
    """The spending cap was reached. `results` holds what finished before the stop."""

    def __init__(self, message: str, results: list[CaptionResult]):
        super().__init__(message)
        self.results = results


class Captioner(Protocol):
    """Anything that turns images into captions: the teacher client or a local LLaVA engine."""

    name: str  # recorded as `captioner`: model + version, or teacher endpoint + model
    # Optional `identity` (dict): what decides its captions (model content, prompts, decoding). A caption
    # set records it and refuses another captioner's records; without it, `name` identifies the captioner.

    def caption_batch(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        """One result per request, in request order. Per-image failures are error results,
        never exceptions; `BudgetExceeded` stops the job cleanly with the finished results."""
        ...


def make_record(request: CaptionRequest, result: CaptionResult, captioner: str) -> dict[str, Any]:
    record = {
        "id": request.id,
        "image_sha256": request.sha256,
        "source": request.source,
        "captioner": captioner,
        **{k: v for k, v in asdict(result).items() if k != "id"},
    }
    if record["status"] == "ok" and record["reason"] is None:  # an ok caption may still carry a mark, e.g. truncated
        record.pop("reason")
        record.pop("detail")
    return record

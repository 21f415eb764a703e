"""Test doubles for captioning jobs: a fast deterministic captioner with fault injection."""

from __future__ import annotations

import time

from sharegpt4v.captioning.records import BudgetExceeded, CaptionRequest, CaptionResult


class EchoCaptioner:
    """Captions an image with a string derived from its sha256 (a stand-in for a real model).

    `error_every`: every k-th request (by sha256) is an error result; `delay`: seconds per
    batch; `budget`: number of captions after which BudgetExceeded stops the run.
    """

    name = "echo-captioner:test"

    def __init__(self, error_every: int = 0, delay: float = 0.0, budget: int | None = None):
        self.error_every, self.delay, self.budget = error_every, delay, budget
        self.calls = 0
        self.captioned = 0

    def caption_batch(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        results = []
        for request in requests:
            if self.budget is not None and self.captioned >= self.budget:
                raise BudgetExceeded("test budget reached", results)
            self.captioned += 1
            if self.error_every and int(request.sha256[:8], 16) % self.error_every == 0:
                results.append(CaptionResult.error(request.id, "refusal", "injected", prompt_id="echo-v1"))
            else:
                results.append(CaptionResult(request.id, "ok", caption=expected_caption(request.sha256),
                                             prompt_id="echo-v1", completion_tokens=3))
        return results


def expected_caption(sha256: str) -> str:
    return f"an image whose digest starts with {sha256[:12]}"

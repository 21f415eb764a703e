"""Test doubles for captioning jobs: a fast deterministic captioner with fault injection."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from sharegpt4v.captioning.records import BudgetExceeded, CaptionRequest, CaptionResult


class EchoCaptioner:
    """Captions an image with a string derived from its sha256 (a stand-in for a real model).

    `error_every`: every k-th request (by sha256) is an error result; `delay`: seconds per
    batch; `budget`: number of captions after which BudgetExceeded stops the run.
    """

    name = "echo-captioner:test"

    def __init__(self, error_every: int = 0, delay: float = 0.0, budget: int | None = None,
                 request_log: str | Path | None = None):
        self.error_every, self.delay, self.budget = error_every, delay, budget
        self.request_log = Path(request_log) if request_log else None
        self.calls = 0
        self.captioned = 0

    def caption_batch(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        self.calls += 1
        if self.request_log is not None:  # what a paid captioner would bill: one line per requested id
            with open(self.request_log, "a") as log:
                log.write("".join(f"{r.id}\n" for r in requests))
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


def published_records(out: Path) -> dict[str, str]:
    """id -> status of every record a captioning job has published so far (parts and records files)."""
    found: dict[str, str] = {}
    for path in sorted(out.glob("parts/*/*.jsonl")) + sorted(out.glob("records/*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                found[record["id"]] = record["status"]
    return found


def kill_at_random_moments(start: Callable[[], subprocess.Popen], out: Path, kills: int, seed: int,
                           after_each: Callable[[], None] | None = None) -> int:
    """SIGKILL a captioning job `kills` times at random moments, then rerun it until it completes.

    Each kill lands after the run has published something new (so the job is mid-shard,
    mid-part, between a records file and its marker, or cleaning up). `after_each` runs once
    each process has ended (killed or not), before the next starts. Returns the kill count.
    """
    rng = random.Random(seed)
    done = 0

    def published() -> frozenset[tuple[str, int]]:  # what the job has written so far (rewrites included)
        found = set()
        for path in out.rglob("*.json*"):
            try:
                found.add((str(path), path.stat().st_mtime_ns))
            except FileNotFoundError:  # deleted by the job meanwhile
                pass
        return frozenset(found)

    for _ in range(kills + 10):
        before = published()
        proc = start()
        if done < kills:
            deadline = time.monotonic() + 60
            while published() == before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                done += 1
            proc.communicate()
            if after_each is not None:
                after_each()
            continue
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        if after_each is not None:
            after_each()
        if "complete" in stdout:
            return done
    raise AssertionError("the job never completed")

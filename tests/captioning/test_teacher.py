"""The teacher client against the synthetic teacher: captions, retries, faults, budget, secrecy."""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from sharegpt4v.captioning.prompts import teacher_prompt
from sharegpt4v.captioning.records import (
    BudgetExceeded,
    CaptionRequest,
    CaptionResult,
    make_record,
)
from sharegpt4v.captioning.teacher import (
    TeacherClient,
    TeacherError,
    TeacherUnavailable,
    image_mime,
    is_refusal,
)
from sharegpt4v.captioning.teacher_sim import FAULT_KINDS, TeacherSim
from sharegpt4v.config import TeacherConfig, WorldConfig
from sharegpt4v.data.shards import open_dataset, sample_image, sample_meta
from sharegpt4v.world.generate import generate_world

KEY = "sk-test-DO-NOT-LEAK-4f9a2c"
ERROR_REASONS = {"refusal", "empty", "truncated", "short", "malformed", "rate_limited", "server_error",
                 "timeout", "connection"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[CaptionRequest], dict[str, str]]:
    """Requests for a 40-image synthetic world, and each request id's detailed caption."""
    uri = str(tmp_path_factory.mktemp("world") / "world")
    generate_world(uri, images=40, seed=0, cfg=WorldConfig(), progress=False)
    requests, truth = [], {}
    for sample in open_dataset(uri).samples():
        meta = sample_meta(sample)
        requests.append(CaptionRequest(meta["id"], sample_image(sample)[1], meta["source"], meta["sha256"]))
        truth[meta["id"]] = meta["detailed_caption"]
    return requests, truth


@pytest.fixture
def requests(world: tuple[list[CaptionRequest], dict[str, str]]) -> list[CaptionRequest]:
    return world[0]


@pytest.fixture
def truth(world: tuple[list[CaptionRequest], dict[str, str]]) -> dict[str, str]:
    return world[1]


@pytest.fixture
def sim(requests: list[CaptionRequest], truth: dict[str, str]) -> Iterator[TeacherSim]:
    with TeacherSim(captions={r.sha256: truth[r.id] for r in requests}, seed=0) as server:
        yield server


def config(**changes: Any) -> TeacherConfig:
    """Fast settings for tests: no client-side throttling, millisecond backoff."""
    settings: dict[str, Any] = dict(model="sim-model", requests_per_minute=60_000, backoff_base_s=0.01,
                                    backoff_max_s=0.05, timeout_s=5.0, concurrency=8)
    return TeacherConfig(**{**settings, **changes})


def client(sim: TeacherSim, **changes: Any) -> TeacherClient:
    return TeacherClient(config(**changes), base_url=sim.url, api_key=KEY)


def test_every_image_gets_its_detailed_caption(sim: TeacherSim, requests: list[CaptionRequest],
                                               truth: dict[str, str]) -> None:
    teacher = client(sim)
    results = teacher.caption_batch(requests)
    assert [r.id for r in results] == [r.id for r in requests]  # request order
    cfg = teacher.cfg
    for request, result in zip(requests, results):
        assert result.status == "ok" and result.caption == truth[request.id]
        assert result.prompt_id == teacher_prompt(request.source)[0]
        assert result.attempts == 1 and result.seconds > 0
        assert result.prompt_tokens > 85 and result.completion_tokens == len(truth[request.id].split())
        expected = (result.prompt_tokens * cfg.usd_per_1k_prompt_tokens
                    + result.completion_tokens * cfg.usd_per_1k_completion_tokens) / 1000
        assert result.cost_usd == pytest.approx(expected)
    assert {r.prompt_id for r in results} >= {"teacher-v1/photo", "teacher-v1/text", "teacher-v1/art"}
    stats = teacher.stats()
    assert stats["requests_sent"] == stats["ok"] == stats["results"] == 40
    assert stats["retries_total"] == 0 and stats["errors"] == {}
    assert stats["spent_usd"] == pytest.approx(sum(r.cost_usd for r in results), abs=1e-5)
    assert teacher.name == f"teacher:sim-model@{sim.url.split('/')[2]}"
    record = make_record(requests[0], results[0], teacher.name)
    assert json.loads(json.dumps(record))["caption"] == truth[requests[0].id]


def test_faults_of_every_kind_lose_nothing(sim: TeacherSim, requests: list[CaptionRequest],
                                           truth: dict[str, str]) -> None:
    batch = requests + [CaptionRequest(r.id + "-again", r.image, r.source, r.sha256) for r in requests[:20]]
    sim.set_faults(rate=0.2, kinds=FAULT_KINDS, retry_after_s=0, slow_s=1.0)
    teacher = client(sim, max_retries=8, timeout_s=0.4)
    results = teacher.caption_batch(batch)
    assert [r.id for r in results] == [r.id for r in batch]  # none lost, none duplicated
    for result in results:
        if result.status == "ok":
            assert result.caption == truth[result.id.removesuffix("-again")]
        else:
            assert result.reason in ERROR_REASONS and result.detail and result.caption is None
    stats = teacher.stats()
    served = sim.stats()["faults"]
    assert sum(served.values()) > 0
    assert stats["retries_total"] == sum(r.attempts - 1 for r in results) > 0
    assert stats["requests_sent"] == sum(r.attempts for r in results)
    assert stats["errors"] == dict(Counter(r.reason for r in results if r.status == "error"))
    assert set(stats["retries"]) <= {"rate_limited", "server_error", "timeout", "malformed"}
    # Content faults are answers, not transport failures: they are recorded, never retried.
    content_faults = sum(served.get(k, 0) for k in ("short", "refusal", "truncated"))
    assert sum(stats["errors"].get(k, 0) for k in ("short", "refusal", "truncated")) == content_faults
    assert stats["ok"] == len(batch) - content_faults


def test_retry_after_is_honoured(sim: TeacherSim, requests: list[CaptionRequest], truth: dict[str, str]) -> None:
    sim.set_faults(rate=1.0, kinds=["429"], retry_after_s=1)
    threading.Timer(0.3, lambda: sim.set_faults(rate=0.0)).start()  # the retry then succeeds
    teacher = client(sim, max_retries=3, backoff_base_s=0.001, backoff_max_s=0.01)
    started = time.perf_counter()
    [result] = teacher.caption_batch(requests[:1])
    assert time.perf_counter() - started >= 1.0
    assert result.status == "ok" and result.caption == truth[requests[0].id]
    assert result.attempts == 2 and result.seconds >= 1.0
    assert teacher.stats()["retries"] == {"rate_limited": 1}


def test_an_outage_stops_the_batch_with_its_cause_and_no_error_records(
        sim: TeacherSim, requests: list[CaptionRequest]) -> None:
    """Retries of a transport failure that run out are an outage, not a bad image: no error record for it."""
    for kind, reason in (("429", "rate_limited"), ("503", "server_error"), ("500", "server_error")):
        sim.set_faults(rate=1.0, kinds=[kind], retry_after_s=0)
        with pytest.raises(TeacherUnavailable, match=f"{reason} after 3 attempts") as stop:
            client(sim, max_retries=2, concurrency=1).caption_batch(requests[:3])
        assert stop.value.results == [] and "\n" not in str(stop.value)


def test_an_outage_mid_batch_keeps_what_finished(sim: TeacherSim, requests: list[CaptionRequest],
                                                 truth: dict[str, str]) -> None:
    teacher = client(sim, max_retries=1, concurrency=1, backoff_base_s=0.001, backoff_max_s=0.01)
    threading.Timer(0.3, lambda: sim.set_faults(rate=1.0, kinds=["503"], retry_after_s=0)).start()
    sim.set_faults(latency_s=0.05)
    with pytest.raises(TeacherUnavailable, match="server_error") as stop:
        teacher.caption_batch(requests[:40])
    finished = stop.value.results
    assert 0 < len(finished) < 40 and all(r.status == "ok" and r.caption == truth[r.id] for r in finished)


@pytest.mark.parametrize("kind", ["truncated", "refusal", "short", "malformed"])
def test_content_faults_give_their_reason(kind: str, sim: TeacherSim, requests: list[CaptionRequest]) -> None:
    sim.set_faults(rate=1.0, kinds=[kind])
    teacher = client(sim, max_retries=0)
    results = teacher.caption_batch(requests[:4])
    assert [(r.status, r.reason, r.attempts) for r in results] == [("error", kind, 1)] * 4
    assert teacher.stats()["errors"] == {kind: 4}
    if kind == "malformed":
        assert all(r.cost_usd == 0 for r in results)  # no usage could be read
    else:
        assert all(r.cost_usd > 0 for r in results)  # an answer was paid for even if unusable


def test_slow_answers_time_out(sim: TeacherSim, requests: list[CaptionRequest]) -> None:
    sim.set_faults(rate=1.0, kinds=["slow"], slow_s=1.0)
    started = time.perf_counter()
    with pytest.raises(TeacherUnavailable, match="timeout after 1 attempts"):
        client(sim, max_retries=0, timeout_s=0.3).caption_batch(requests[:2])
    assert time.perf_counter() - started < 1.0


def test_non_retryable_errors(sim: TeacherSim, requests: list[CaptionRequest]) -> None:
    unknown = CaptionRequest("unknown", b"\x89PNG\r\n\x1a\n" + b"\0" * 32, "coco", "0" * 64)
    not_an_image = CaptionRequest("garbage", b"hello", "coco", "1" * 64)
    teacher = client(sim, max_retries=5)
    bad, garbage, good = teacher.caption_batch([unknown, not_an_image, requests[0]])
    assert (bad.reason, bad.attempts) == ("bad_request", 1)
    assert (garbage.reason, garbage.attempts) == ("bad_image", 0)
    assert good.status == "ok"
    assert teacher.stats()["requests_sent"] == 2


def test_budget_cap_stops_cleanly_and_a_second_client_finishes(
        sim: TeacherSim, requests: list[CaptionRequest], truth: dict[str, str]) -> None:
    one = client(sim).caption_batch(requests[:1])[0].cost_usd
    capped = client(sim, budget_usd=one * 5, concurrency=2)
    with pytest.raises(BudgetExceeded) as info:
        capped.caption_batch(requests)
    finished = info.value.results
    assert 5 <= len(finished) < len(requests)
    assert len({r.id for r in finished}) == len(finished)
    assert all(r.status == "ok" and r.caption == truth[r.id] for r in finished)
    assert capped.stats()["spent_usd"] >= one * 5
    with pytest.raises(BudgetExceeded) as again:  # spent: nothing more is sent
        capped.caption_batch(requests[:3])
    assert again.value.results == []
    done = {r.id for r in finished}
    rest = client(sim, budget_usd=1.0).caption_batch([r for r in requests if r.id not in done])
    assert sorted(done | {r.id for r in rest}) == sorted(r.id for r in requests)
    assert all(r.status == "ok" for r in rest)


def test_rejected_key_raises(requests: list[CaptionRequest], truth: dict[str, str]) -> None:
    with TeacherSim(captions={r.sha256: truth[r.id] for r in requests}, api_key="the-right-key") as sim:
        teacher = TeacherClient(config(), base_url=sim.url, api_key=KEY)
        with pytest.raises(TeacherError, match="OPENAI_API_KEY") as info:
            teacher.caption_batch(requests)
        assert KEY not in str(info.value)
        assert sim.stats()["chat_requests"] <= 2 * 8  # the job stopped, it did not try every image


def test_settings_come_from_the_environment(sim: TeacherSim, requests: list[CaptionRequest],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(base_url_env="TEACHER_URL_T", api_key_env="TEACHER_KEY_T")
    monkeypatch.delenv("TEACHER_URL_T", raising=False)
    monkeypatch.delenv("TEACHER_KEY_T", raising=False)
    with pytest.raises(TeacherError, match="TEACHER_URL_T"):
        TeacherClient(cfg)
    monkeypatch.setenv("TEACHER_URL_T", sim.url)
    with pytest.raises(TeacherError, match="TEACHER_KEY_T"):
        TeacherClient(cfg)
    monkeypatch.setenv("TEACHER_KEY_T", KEY)
    assert TeacherClient(cfg).caption_batch(requests[:1])[0].status == "ok"


def test_the_key_never_leaks(sim: TeacherSim, requests: list[CaptionRequest], truth: dict[str, str],
                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    sim.set_faults(rate=0.5, kinds=FAULT_KINDS, retry_after_s=0, slow_s=0.5)
    teacher = client(sim, max_retries=8, timeout_s=0.2)
    results = teacher.caption_batch(requests[:16])
    seen += [teacher.name, repr(teacher.cfg), json.dumps(teacher.stats())]
    seen += [json.dumps(make_record(q, r, teacher.name)) for q, r in zip(requests, results)]
    capped = client(sim, budget_usd=0.0)
    with pytest.raises(BudgetExceeded) as budget:
        capped.caption_batch(requests[:2])
    seen.append(str(budget.value))
    with TeacherSim(captions={r.sha256: truth[r.id] for r in requests}, api_key="other") as locked:
        with pytest.raises(TeacherError) as rejected:
            TeacherClient(config(), base_url=locked.url, api_key=KEY).caption_batch(requests[:2])
    seen.append("".join(traceback.format_exception(rejected.value)))
    seen.append(caplog.text)
    assert caplog.text  # the SDK and the client did log
    for text in seen:
        assert KEY not in text


def test_concurrency_is_bounded(sim: TeacherSim, requests: list[CaptionRequest]) -> None:
    sim.set_faults(latency_s=0.05)
    client(sim, concurrency=3).caption_batch(requests[:24])
    assert sim.stats()["max_concurrent"] <= 3
    sim.reset_stats()
    client(sim, concurrency=8).caption_batch(requests[:24])
    assert 1 < sim.stats()["max_concurrent"] <= 8


def test_client_side_rate_limit(sim: TeacherSim, requests: list[CaptionRequest]) -> None:
    started = time.perf_counter()
    client(sim, requests_per_minute=1200, concurrency=1).caption_batch(requests[:11])  # 20/s, burst 1
    assert time.perf_counter() - started >= 0.45


def test_helpers() -> None:
    assert image_mime(b"\x89PNG\r\n\x1a\n....") == "image/png"
    assert image_mime(b"\xff\xd8\xff\xe0....") == "image/jpeg"
    assert image_mime(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert image_mime(b"GIF89a") is None
    for text in ("I'm sorry, but I can't help with that.", "I\u2019m sorry, I cannot", "I cannot identify people.",
                 "Sorry, I can't describe this image.", "I am unable to help"):
        assert is_refusal(text), text
    assert not is_refusal("A red circle sits in the lower-left area; sorry-looking clouds above.")
    assert CaptionResult.error("x", "short", "d").status == "error"

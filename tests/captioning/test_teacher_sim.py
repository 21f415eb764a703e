"""The synthetic teacher endpoint: OpenAI-shaped answers, auth, garbage, fault injection."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from sharegpt4v.captioning.teacher_sim import (
    FAULT_KINDS,
    IMAGE_PROMPT_TOKENS,
    REFUSAL_TEXT,
    Faults,
    TeacherSim,
)
from sharegpt4v.config import WorldConfig
from sharegpt4v.data.shards import open_dataset, sample_image, sample_meta
from sharegpt4v.world.generate import generate_world

PROMPT = "Describe this image in detail."


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    """A 40-image synthetic world: its URI and (meta, image bytes) per sample."""
    uri = str(tmp_path_factory.mktemp("world") / "world")
    generate_world(uri, images=40, seed=0, cfg=WorldConfig(), progress=False)
    samples = [{"meta": sample_meta(s), "image": sample_image(s)[1]} for s in open_dataset(uri).samples()]
    return uri, samples


@pytest.fixture
def sim(world: tuple[str, list[dict[str, Any]]]) -> Iterator[TeacherSim]:
    captions = {s["meta"]["sha256"]: s["meta"]["detailed_caption"] for s in world[1]}
    with TeacherSim(captions=captions, seed=0) as server:
        yield server


def chat_body(image: bytes, text: str = PROMPT, model: str = "m") -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 100}


def http(url: str, body: bytes | dict[str, Any] | None = None, auth: bool = True,
         method: str | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    request.add_header("Content-Type", "application/json")
    if auth:
        request.add_header("Authorization", "Bearer test-key")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_world_index_answers_the_detailed_caption(world: tuple[str, list[dict[str, Any]]]) -> None:
    uri, samples = world
    with TeacherSim(world_uri=uri) as sim:
        assert len(sim.captions) == len(samples) == 40
        for sample in samples[:5]:
            status, _, raw = http(f"{sim.url}/chat/completions", chat_body(sample["image"], model="gpt-x"))
            assert status == 200
            answer = json.loads(raw)
            caption = sample["meta"]["detailed_caption"]
            assert answer["object"] == "chat.completion" and answer["model"] == "gpt-x"
            assert answer["id"] and isinstance(answer["created"], int)
            choice = answer["choices"][0]
            assert choice["index"] == 0 and choice["finish_reason"] == "stop"
            assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == caption
            usage = answer["usage"]
            assert usage["prompt_tokens"] == len(PROMPT.split()) + IMAGE_PROMPT_TOKENS
            assert usage["completion_tokens"] == len(caption.split())
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_openai_sdk_talks_to_it(sim: TeacherSim, world: tuple[str, list[dict[str, Any]]]) -> None:
    sample = world[1][0]
    client = openai.OpenAI(base_url=sim.url, api_key="test-key", max_retries=0, timeout=10)
    body = chat_body(sample["image"])
    completion = client.chat.completions.create(model="m", messages=body["messages"], max_tokens=100)
    assert completion.choices[0].message.content == sample["meta"]["detailed_caption"]
    assert [m.id for m in client.models.list()] == ["teacher-sim"]
    client.close()


def test_auth_is_required(world: tuple[str, list[dict[str, Any]]]) -> None:
    image = world[1][0]["image"]
    captions = {s["meta"]["sha256"]: s["meta"]["detailed_caption"] for s in world[1]}
    with TeacherSim(captions=captions) as sim:
        status, _, raw = http(f"{sim.url}/chat/completions", chat_body(image), auth=False)
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    with TeacherSim(captions=captions, api_key="right-key") as sim:
        assert http(f"{sim.url}/chat/completions", chat_body(image))[0] == 401  # "test-key" is wrong here


def test_survives_garbage(sim: TeacherSim, world: tuple[str, list[dict[str, Any]]]) -> None:
    image = world[1][0]["image"]
    url = f"{sim.url}/chat/completions"
    no_image = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    bad_b64 = chat_body(image)
    bad_b64["messages"][0]["content"][1]["image_url"]["url"] = "data:image/png;base64,@@not base64@@"
    not_data_url = chat_body(image)
    not_data_url["messages"][0]["content"][1]["image_url"]["url"] = "https://example.com/a.png"
    cases: list[bytes | dict[str, Any]] = [
        b"this is not json", b"", b"[1, 2, 3]", {"messages": "nope"}, no_image, bad_b64, not_data_url,
        chat_body(b"\x89PNG\r\n\x1a\nunknown image"),
    ]
    for body in cases:
        status, _, raw = http(url, body)
        assert status == 400, body
        assert json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert http(f"{sim.url}/nowhere", {"a": 1})[0] == 404
    assert http(f"{sim.url}/nowhere")[0] == 404
    assert http(url.replace("/v1/chat/completions", "/admin/faults"), b"{bad json")[0] == 400
    assert http(url.replace("/v1/chat/completions", "/admin/faults"), {"kinds": ["boom"]})[0] == 400
    status, _, raw = http(url, chat_body(image))  # still serving
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == world[1][0]["meta"]["detailed_caption"]
    assert sim.stats()["status"]["400"] >= len(cases)


def test_faults_switch_over_http(sim: TeacherSim, world: tuple[str, list[dict[str, Any]]]) -> None:
    image = world[1][0]["image"]
    admin = sim.url.replace("/v1", "/admin")
    status, _, raw = http(f"{admin}/faults", {"rate": 1.0, "kinds": ["500"], "latency_s": 0.0})
    assert status == 200 and json.loads(raw)["kinds"] == ["500"]
    assert sim.faults.rate == 1.0
    assert http(f"{sim.url}/chat/completions", chat_body(image))[0] == 500
    http(f"{admin}/faults", {"rate": 0.0})
    assert http(f"{sim.url}/chat/completions", chat_body(image))[0] == 200
    status, _, raw = http(f"{admin}/stats")
    stats = json.loads(raw)
    assert stats["faults"] == {"500": 1} and stats["chat_requests"] == 2 and stats["max_concurrent"] >= 1


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_fault_kind(kind: str, sim: TeacherSim, world: tuple[str, list[dict[str, Any]]]) -> None:
    sample = world[1][1]
    caption = sample["meta"]["detailed_caption"]
    sim.set_faults(rate=1.0, kinds=[kind], retry_after_s=2, slow_s=0.3)
    started = time.perf_counter()
    status, headers, raw = http(f"{sim.url}/chat/completions", chat_body(sample["image"]))
    elapsed = time.perf_counter() - started
    assert sim.stats()["faults"] == {kind: 1}
    if kind == "429":
        assert status == 429 and headers["Retry-After"] == "2"
        return
    if kind in ("500", "503"):
        assert status == int(kind) and "error" in json.loads(raw)
        return
    assert status == 200
    if kind == "malformed":
        with pytest.raises(ValueError):
            json.loads(raw)
        return
    choice = json.loads(raw)["choices"][0]
    content = choice["message"]["content"]
    expected = {
        "slow": (caption, "stop"),
        "short": (" ".join(caption.split()[:3]), "stop"),
        "refusal": (REFUSAL_TEXT, "stop"),
        "truncated": (caption[: len(caption) // 2], "length"),
    }[kind]
    assert (content, choice["finish_reason"]) == expected
    if kind == "slow":
        assert elapsed >= 0.3


def test_fault_choice_is_reproducible(world: tuple[str, list[dict[str, Any]]]) -> None:
    captions = {s["meta"]["sha256"]: s["meta"]["detailed_caption"] for s in world[1]}
    image = world[1][0]["image"]
    runs = []
    for seed in (7, 7, 8):
        faults = Faults(rate=0.5, kinds=("500", "503", "short"))
        with TeacherSim(captions=captions, faults=faults, seed=seed) as sim:
            runs.append([http(f"{sim.url}/chat/completions", chat_body(image))[0] for _ in range(20)]
                        + [sum(sim.stats()["faults"].values())])
    assert runs[0] == runs[1] != runs[2]
    assert 0 < runs[0][-1] < 20


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="captions"):
        TeacherSim()
    with pytest.raises(ValueError, match="unknown fault kind"):
        Faults(rate=0.1, kinds=("404",))
    with pytest.raises(ValueError, match="rate"):
        Faults(rate=1.5)

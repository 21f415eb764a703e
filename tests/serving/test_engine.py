"""The serving core on the tiny model, without Triton: batches with bad requests, streaming, limits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from sharegpt4v.captioning.engine import caption_prompt
from sharegpt4v.modeling.builder import save_model
from sharegpt4v.modeling.inference import InferenceEngine
from sharegpt4v.serving.engine import ServingEngine, device_for, internal_failure, options_for, request_ids
from tests.modeling.fixtures import recipe, tiny_model, world


def col(*values: object, dtype: object = object) -> np.ndarray:
    return np.array(values, dtype=dtype).reshape(-1, 1)


@pytest.fixture(scope="module")
def engines() -> dict[str, ServingEngine]:
    model, processor = tiny_model()
    out = {}
    for task in ("caption", "chat"):
        options = options_for(task, recipe(), max_new_tokens=6)
        cfg = dataclasses.replace(recipe().captioning, batch_size=options.batch_size, max_new_tokens=6)
        out[task] = ServingEngine(InferenceEngine(model, processor, recipe().model, cfg), options)
    return out


def chat_request(image: bytes, question: str = "What colour is the circle?", **extra: np.ndarray) -> dict:
    return {"image": col(image), "messages": col(json.dumps(question).encode()), **extra}


def test_captioner_prompt_is_the_captioning_jobs_prompt(engines: dict[str, ServingEngine]) -> None:
    rows = engines["caption"].prepare({"image": col(world(1)[0].image)})
    assert rows[0][1] == caption_prompt()


def test_a_batch_with_bad_requests_answers_the_good_ones(engines: dict[str, ServingEngine]) -> None:
    images = [s.image for s in world(4)]
    requests = [
        chat_request(images[0]),
        chat_request(b"\x89PNG\r\n\x1a\ncorrupt"),
        chat_request(images[1], max_tokens=col(3, dtype=np.int32)),
        {"image": col(images[2]), "messages": col(b"[not json")},
        chat_request(images[3], max_tokens=col(999, dtype=np.int32)),
        {"image": col(images[0], images[1]), "messages": col(b'"a?"', b'"b?"')},  # two rows in one request
    ]
    replies = engines["chat"].infer(requests)
    assert [r.ok for r in replies] == [True, False, True, False, False, True]
    assert "image: bytes are not a decodable image" in replies[1].error
    assert "messages: not valid JSON" in replies[3].error
    assert "max_tokens: 999 is out of range (1..128)" in replies[4].error
    first, short, pair = replies[0].outputs, replies[2].outputs, replies[5].outputs
    assert first["text"].shape == (1, 1) and first["text"][0, 0] and first["finish_reason"][0, 0] in (b"stop", b"length")
    assert 0 < short["completion_tokens"][0, 0] <= 3
    assert pair["text"].shape == (2, 1) and all(pair["text"][:, 0]) and pair["prompt_tokens"].dtype == np.int32


def test_prompt_longer_than_the_context_is_refused(engines: dict[str, ServingEngine]) -> None:
    long_question = " ".join(["circle"] * 300)[:1900]
    reply = engines["chat"].infer([chat_request(world(1)[0].image, long_question)])[0]
    assert not reply.ok and "messages: too long:" in reply.error and "context of 256 tokens" in reply.error


def test_streamed_pieces_add_up_to_the_answer(engines: dict[str, ServingEngine]) -> None:
    images = [s.image for s in world(3)]
    requests = [chat_request(images[0]), chat_request(b"nope!"), chat_request(images[2], max_tokens=col(4, dtype=np.int32))]
    pieces: dict[int, list[str]] = {}
    finals = engines["chat"].stream(requests, lambda i, out: pieces.setdefault(i, []).append(out["text"][0, 0].decode()))
    full = engines["chat"].infer(requests)
    assert not finals[1].ok and 1 not in pieces and "image:" in finals[1].error
    for i in (0, 2):
        assert len(pieces[i]) >= 2  # it streamed, token by token
        assert "".join(pieces[i]).strip() == full[i].outputs["text"][0, 0].decode()
        assert finals[i].outputs["text"][0, 0] == b"" and finals[i].outputs["finish_reason"][0, 0] in (b"stop", b"length")
        assert finals[i].outputs["completion_tokens"][0, 0] == full[i].outputs["completion_tokens"][0, 0]


def test_load_from_a_version_folder_with_weights_parameter(tmp_path: Path) -> None:
    model, processor = tiny_model()
    save_model(model, processor, str(tmp_path / "1" / "weights"))
    parameters = {k: {"string_value": v} for k, v in options_for("caption", recipe()).to_parameters().items()}
    engine = ServingEngine.load(tmp_path / "1", parameters, device_for("KIND_CPU"))
    reply = engine.infer([{"image": col(world(1)[0].image), "max_tokens": col(2, dtype=np.int32)}])[0]
    assert reply.ok and reply.outputs["completion_tokens"][0, 0] <= 2
    assert device_for("GPU", 1) == "cuda:1" and device_for("CPU", 0) == "cpu"


def test_a_near_zero_temperature_is_served_not_an_internal_failure(engines: dict[str, ServingEngine]) -> None:
    # 1e-45 (an FP32 subnormal) once overflowed the logits: NaN probabilities, RuntimeError, a 500 for the batch
    request = chat_request(world(1)[0].image, temperature=col(1e-45, dtype=np.float32), max_tokens=col(2, dtype=np.int32))
    reply = engines["chat"].infer([request])[0]
    assert reply.ok and reply.outputs["completion_tokens"][0, 0] <= 2


def test_internal_failures_name_each_request_id_and_keep_the_exception_in_the_log() -> None:
    ids = request_ids(["client-7", None, "", "x" * 200, "bad\nid"])
    assert ids[0] == "client-7" and len(set(ids)) == 5
    assert all(len(i) == 12 and i.isalnum() for i in ids[1:])  # none sent, or not fit for a log line: a new one
    try:
        raise RuntimeError("probability tensor contains nan")
    except RuntimeError as exc:
        log, messages = internal_failure(exc, ids[:2])
    assert log.startswith(f"internal error (request id client-7, {ids[1]}): RuntimeError: probability tensor contains nan")
    assert "Traceback (most recent call last)" in log and "test_engine.py" in log
    assert messages == [f"internal error (request id {i}); see the server log" for i in ids[:2]]
    assert not any("nan" in m or "Traceback" in m for m in messages)  # the client gets the id, not the exception

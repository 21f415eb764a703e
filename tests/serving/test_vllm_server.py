"""`serving.engine=vllm`: vLLM's own OpenAI server (engine environment) on a platform checkpoint, called
with the `openai` client: the transformers engine's answers, streaming, 4xx for bad requests, concurrency."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from sharegpt4v.config import WorldConfig, load_recipe
from sharegpt4v.modeling.builder import load_model
from sharegpt4v.modeling.inference import InferenceEngine
from sharegpt4v.modeling.templates import generation_prompt
from sharegpt4v.serving.vllm_server import LocalVllmServer, VllmServerError, openai_image_message, start_vllm_server
from sharegpt4v.training.data import StageInputs
from sharegpt4v.training.run import launch
from sharegpt4v.world.generate import generate_world
from tests.modeling.fixtures import world

QUESTION = "Describe this image in detail."
TOKENS = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A model trained for 60 steps (~30 s) on the world's captions: it answers with caption-like text."""
    root = tmp_path_factory.mktemp("vllm-serving")
    generate_world(str(root / "world"), 160, 0, WorldConfig(samples_per_shard=16), progress=False)
    recipe = load_recipe("tiny", ["captioner.max_steps=60", "captioner.mix.vqa=0", "captioner.mix.captions=1"])
    return launch("captioner", recipe, StageInputs([str(root / "world")], split="train"), str(root / "model")).checkpoint_uri


@pytest.fixture(scope="module")
def server(checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalVllmServer]:
    with start_vllm_server(checkpoint, "chat", workdir=tmp_path_factory.mktemp("server")) as running:
        yield running


def _client(server: LocalVllmServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key="unused-locally", max_retries=0, timeout=120)


def _ask(client: openai.OpenAI, image: bytes, **options: object) -> str:
    response = client.chat.completions.create(
        model="chat", messages=[openai_image_message(QUESTION, image)], max_tokens=TOKENS, temperature=0, **options)
    return response.choices[0].message.content or ""


def test_answers_are_the_transformers_engine_answers(server: LocalVllmServer, checkpoint: str) -> None:
    images = [s.image for s in world(6)]
    client = _client(server)
    served = [_ask(client, image).strip() for image in images]
    model, processor = load_model(checkpoint)
    recipe = load_recipe("tiny", [f"captioning.max_new_tokens={TOKENS}"])
    engine = InferenceEngine(model, processor, recipe.model, recipe.captioning, aspect="pad")
    local = [g.text for g in engine.generate(images, [generation_prompt("vicuna_v1", QUESTION)] * len(images))]
    assert sum(a == b for a, b in zip(served, local)) >= 5, list(zip(served, local))
    assert all(served)


def test_streamed_answer_is_the_whole_answer(server: LocalVllmServer) -> None:
    client = _client(server)
    image = world(1)[0].image
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="chat", messages=[openai_image_message(QUESTION, image)], max_tokens=TOKENS, temperature=0, stream=True)
        if c.choices]
    assert len([c for c in chunks if c]) > 3  # token by token, not one block
    assert "".join(chunks) == _ask(client, image)


@pytest.mark.parametrize("messages, says", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                   {"type": "text", "text": "hi"}]}], "image"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                    + base64.b64encode(world(1)[0].image).decode()}}] * 2
       + [{"type": "text", "text": "two images"}]}], "image"),
], ids=["undecodable-image", "two-images"])
def test_bad_requests_get_a_4xx_and_the_server_stays_up(server: LocalVllmServer, messages: list, says: str) -> None:
    client = _client(server)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="chat", messages=messages, max_tokens=4)
    assert err.value.status_code == 400 and says in str(err.value).lower()
    assert _ask(client, world(1)[0].image)  # still serving


def test_too_many_tokens_is_a_4xx(server: LocalVllmServer) -> None:
    with pytest.raises(openai.BadRequestError):
        _client(server).chat.completions.create(
            model="chat", messages=[openai_image_message(QUESTION, world(1)[0].image)], max_tokens=100_000)


def test_sixteen_concurrent_clients_all_get_answers(server: LocalVllmServer) -> None:
    images = [s.image for s in world(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda image: _ask(_client(server), image), images))
    assert all(answers)


def test_a_missing_engine_environment_is_a_one_line_error(checkpoint: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHAREGPT4V_ENGINE_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(VllmServerError) as err:
        start_vllm_server(checkpoint, workdir=tmp_path / "w")
    assert "engine environment is missing" in str(err.value) and "\n" not in str(err.value)

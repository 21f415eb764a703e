"""Shared data for the training tests: a small synthetic world, a seed caption set, an ingested LLaVA JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from sharegpt4v.captioning.job import finalize_caption_set, run_caption_job
from sharegpt4v.captioning.records import CaptionRequest, CaptionResult
from sharegpt4v.config import IngestConfig, WorldConfig
from sharegpt4v.data.ingest import ingest
from sharegpt4v.world.generate import generate_world


class SeedCaptioner:
    """A stand-in teacher: caption `seed caption of <id>`; every 5th image (by id) is an error record."""

    name = "seed-captioner:test"

    def caption_batch(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        return [CaptionResult.error(r.id, "refusal", "injected") if is_error(r.id)
                else CaptionResult(r.id, "ok", caption=seed_caption(r.id)) for r in requests]


def is_error(sample_id: str) -> bool:
    return int(sample_id.rsplit("-", 1)[-1]) % 5 == 0


def seed_caption(sample_id: str) -> str:
    return f"seed caption of {sample_id}"


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    """160 images, 16 per shard: ~8 train shards of small 64 px scenes with captions and VQA."""
    uri = str(tmp_path_factory.mktemp("training-world"))
    generate_world(uri, 160, 0, WorldConfig(samples_per_shard=16), progress=False)
    return uri


@pytest.fixture(scope="session")
def seed_captions(world: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("seed-captions"))
    run_caption_job(world, uri, SeedCaptioner(), batch_size=8, split="train", progress=False)
    finalize_caption_set(world, uri, split="train")
    return uri


CONVERSATIONS = [
    [{"from": "human", "value": "What colour is the square?\n<image>"}, {"from": "gpt", "value": "It is red."},
     {"from": "human", "value": "And its size?"}, {"from": "gpt", "value": "Large."}],
    [{"from": "human", "value": "<image>\nIs this a drawing?"}, {"from": "gpt", "value": "Yes, a simple drawing."}],
]


@pytest.fixture(scope="session")
def llava_json(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An ingested LLaVA-style JSON: 12 image records with conversations (one malformed)."""
    root = tmp_path_factory.mktemp("llava-json")
    (root / "images").mkdir()
    records = []
    for i in range(12):
        buf = io.BytesIO()
        Image.new("RGB", (40 + i, 40), (20 * i, 100, 200 - 10 * i)).save(buf, format="PNG")
        (root / "images" / f"{i}.png").write_bytes(buf.getvalue())
        turns = CONVERSATIONS[i % 2] if i != 11 else [{"from": "human", "value": "<image>\nno answer"}]
        records.append({"id": f"conv-{i}", "image": f"images/{i}.png", "conversations": turns})
    (root / "data.json").write_text(json.dumps(records))
    out = str(root / "dataset")
    ingest(str(root / "data.json"), out, IngestConfig(), kind="json", image_root=str(root), progress=False)
    return out


def trace_records(folder: Path, stage: str, rank: int = 0) -> list[dict]:
    path = folder / f"{stage}-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]

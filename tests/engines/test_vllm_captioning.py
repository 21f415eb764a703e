"""The vLLM captioning backend on CPU: the real vLLM (engine environment, .venv-engine) against the
transformers engine on the same checkpoint, and the sharded job's guarantees with vLLM underneath."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from sharegpt4v.captioning.engine import VllmCaptioner, make_captioner
from sharegpt4v.captioning.job import iter_caption_records
from sharegpt4v.captioning.records import CaptionRequest
from sharegpt4v.config import WorldConfig, load_recipe
from sharegpt4v.data.shards import open_dataset, sample_meta
from sharegpt4v.engines.vllm_client import ENGINE_PYTHON_ENV, REPO_ENGINE_PYTHON, EngineUnavailable, VllmEngine
from sharegpt4v.training.data import StageInputs
from sharegpt4v.training.run import launch
from sharegpt4v.world.generate import generate_world
from tests.captioning.doubles import kill_at_random_moments
from tests.modeling.fixtures import world

ROOT = Path(__file__).resolve().parents[2]
TOKENS = 64
IMAGES = 64
SETTINGS = [f"captioning.max_new_tokens={TOKENS}", "captioning.batch_size=16"]


@pytest.fixture(scope="module", autouse=True)
def engine_environment() -> None:
    assert REPO_ENGINE_PYTHON.exists(), f"{REPO_ENGINE_PYTHON} missing: run scripts/setup_engine.sh (make test does)"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A captioner trained for 60 steps (~30 s): it writes caption-like text, as the platform's do.

    (A random model's near-tied logits make any two fp32 engines part ways early; that says
    nothing about captioning.)
    """
    root = tmp_path_factory.mktemp("vllm")
    generate_world(str(root / "world"), 160, 0, WorldConfig(samples_per_shard=16), progress=False)
    recipe = load_recipe("tiny", ["captioner.max_steps=60", "captioner.mix.vqa=0", "captioner.mix.captions=1"])
    return launch("captioner", recipe, StageInputs([str(root / "world")], split="train"), str(root / "captioner")).checkpoint_uri


def _requests(n: int) -> list[CaptionRequest]:
    return [CaptionRequest(s.id, s.image, s.source, hashlib.sha256(s.image).hexdigest()) for s in world(n)]


def test_vllm_writes_the_transformers_engine_captions(checkpoint: str) -> None:
    requests = _requests(IMAGES)
    requests[5] = dataclasses.replace(requests[5], image=b"\x00corrupt")
    captioner = make_captioner(checkpoint, load_recipe("tiny", [*SETTINGS, "captioning.backend=vllm"]))
    try:
        assert isinstance(captioner, VllmCaptioner)
        assert captioner.engine.dtype == "float32" and captioner.engine.device == "cpu"  # the checkpoint's, not bf16
        assert captioner.image_size == 48 and captioner.aspect == "pad"
        vllm_results = captioner.caption_batch(requests)
    finally:
        captioner.close()
    reference = make_captioner(checkpoint, load_recipe("tiny", SETTINGS)).caption_batch(requests)
    assert [r.id for r in vllm_results] == [r.id for r in requests]
    bad = vllm_results[5]
    assert (bad.status, bad.reason) == ("error", "bad_image") and "not a decodable image" in (bad.detail or "")
    pairs = [(v, t) for v, t in zip(vllm_results, reference) if v.status == "ok"]
    assert len(pairs) == IMAGES - 1
    same = sum(v.caption == t.caption for v, t in pairs)
    assert same >= 0.95 * len(pairs), f"{same} of {len(pairs)} captions identical"
    for v, t in pairs:
        assert v.prompt_tokens == t.prompt_tokens  # same prompt, BOS and image tokens
        if v.caption == t.caption:
            assert (v.completion_tokens, v.reason, v.detail) == (t.completion_tokens, t.reason, t.detail)


def engine_processes() -> list[int]:
    """Live vLLM engine processes on this machine (they name themselves VLLM::EngineCore, VLLM::Worker)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"VLLM::"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _wait_for_no_engines(seconds: float = 20) -> list[int]:
    deadline = time.monotonic() + seconds
    while engine_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    return engine_processes()


def test_an_engine_that_cannot_start_names_its_root_cause_and_leaves_nothing_running(checkpoint: str) -> None:
    with pytest.raises(EngineUnavailable) as err:
        VllmEngine(checkpoint, engine_args={"kv_cache_memory_bytes": 1024})  # no room for one KV block
    assert "No available memory for the cache blocks" in str(err.value) and "\n" not in str(err.value)
    assert _wait_for_no_engines() == []


def _caption_run(world_uri: str, out: Path, checkpoint: str, *extra: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "sharegpt4v", "caption", "run", "--input", world_uri, "--out", str(out), "--model",
         checkpoint, "--json", *SETTINGS, "captioning.backend=vllm", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )


def test_the_job_on_vllm_survives_sigkill_exactly_once_and_logs_throughput(
    checkpoint: str, tmp_path: Path, mlflow_sqlite: str
) -> None:
    world_uri = str(tmp_path / "world")
    generate_world(world_uri, 48, 3, WorldConfig(samples_per_shard=6), progress=False)
    out = tmp_path / "captions"
    kills = kill_at_random_moments(lambda: _caption_run(world_uri, out, checkpoint), out, kills=2, seed=7)
    assert kills == 2
    assert _wait_for_no_engines() == []  # a killed job's engine processes go with it
    records = list(iter_caption_records(str(out)))
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted(sample_meta(s)["id"] for s in open_dataset(world_uri).samples())  # no gap
    assert len(ids) == len(set(ids))  # no duplicate
    assert all(r["status"] == "ok" and 0 < r["completion_tokens"] <= TOKENS for r in records)
    client = MlflowClient(mlflow_sqlite)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'captioning'")
    finished = [r for r in runs if "images_per_s" in r.data.metrics]
    assert finished and all(r.data.metrics["images_per_s"] > 0 for r in finished)
    assert all("generated_tokens_per_s" in r.data.metrics for r in finished)


def test_a_missing_engine_environment_is_a_one_line_error(checkpoint: str, tmp_path: Path) -> None:
    world_uri = str(tmp_path / "world")
    generate_world(world_uri, 4, 0, WorldConfig(), progress=False)
    env = {**__import__("os").environ, ENGINE_PYTHON_ENV: str(tmp_path / "no-engine" / "bin" / "python")}
    proc = _caption_run(world_uri, tmp_path / "captions", checkpoint, env=env)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and stderr.count("\n") == 1, stderr
    assert "engine environment is missing" in stderr and "setup_engine.sh" in stderr
    assert not (tmp_path / "captions").exists() or not list((tmp_path / "captions").rglob("*.jsonl"))
    assert json.loads(stdout or "null") is None

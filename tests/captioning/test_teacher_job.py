"""Seed captioning with the teacher, end to end through the CLI, against the synthetic teacher.

Exactly once under 20% injected faults and under SIGKILL; the budget cap stops cleanly and
a rerun continues; retries are visible in MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sharegpt4v import storage
from sharegpt4v.captioning.job import iter_caption_records
from sharegpt4v.captioning.teacher_sim import TeacherSim, world_caption_index
from sharegpt4v.config import WorldConfig
from sharegpt4v.data.shards import open_dataset, sample_meta
from sharegpt4v.world.generate import generate_world
from tests.captioning.doubles import kill_at_random_moments, published_records

ROOT = Path(__file__).resolve().parents[2]
FAST = ["teacher.backoff_base_s=0.01", "teacher.backoff_max_s=0.2", "teacher.timeout_s=1", "teacher.max_retries=8"]
FAULTS = ("429", "500", "503", "malformed", "short", "refusal", "truncated")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("world"))
    generate_world(uri, 100, 3, WorldConfig(samples_per_shard=5), progress=False)  # 20 shards
    return uri


@pytest.fixture
def sim(world: str):
    with TeacherSim(world_uri=world, seed=7) as server:
        server.set_faults(rate=0.2, kinds=FAULTS, retry_after_s=0.05)
        yield server


def _env(sim: TeacherSim, extra: dict | None = None) -> dict:
    return {**os.environ, "OPENAI_BASE_URL": sim.url, "OPENAI_API_KEY": "sk-test-secret-123", **(extra or {})}


def _caption(world: str, out: str, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sharegpt4v", "caption", "teacher", "--input", world, "--out", out, "--batch-size", "4",
         *extra, *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )


def _check(world: str, out: str) -> list[dict]:
    truth = world_caption_index(world)
    records = list(iter_caption_records(out))
    ids = Counter(r["id"] for r in records)
    assert max(ids.values()) == 1
    assert set(ids) == {sample_meta(s)["id"] for s in open_dataset(world).samples()}
    for record in records:
        if record["status"] == "ok":
            assert record["caption"] == truth[record["image_sha256"]]
            assert record["prompt_id"].startswith("teacher-v1/")
        else:
            assert record["reason"] and record["detail"]
    return records


def test_faults_lose_nothing_and_retries_show_in_mlflow(world: str, sim: TeacherSim, tmp_path: Path,
                                                         mlflow_sqlite: str) -> None:
    out = str(tmp_path / "seed")
    proc = _caption(world, out, _env(sim))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "complete" in stdout
    records = _check(world, out)
    errors = Counter(r["reason"] for r in records if r["status"] == "error")
    assert set(errors) <= {"short", "refusal", "truncated"}  # answers; transport faults were retried away
    assert sim.stats()["faults"]  # faults were really served
    assert "sk-test-secret-123" not in stdout + stderr

    client = MlflowClient(mlflow_sqlite)
    (run,) = client.search_runs([client.get_experiment_by_name("sharegpt4v").experiment_id])
    metrics = run.data.metrics
    assert metrics["captioner.retries_total"] > 0
    assert metrics["ok"] + metrics["error"] == 100 and metrics["images_per_s"] > 0
    assert "sk-test-secret-123" not in json.dumps(run.data.params)

    sim.set_faults(rate=0.0)
    proc = _caption(world, out, _env(sim), "--retry-errors")
    assert proc.wait(timeout=300) == 0
    assert all(r["status"] == "ok" for r in _check(world, out))


def test_sigkill_at_random_moments_with_faults(world: str, sim: TeacherSim, tmp_path: Path) -> None:
    out = tmp_path / "seed"
    assert kill_at_random_moments(lambda: _caption(world, str(out), _env(sim)), out, kills=5, seed=99) == 5
    _check(world, str(out))


def test_sigkill_during_retry_errors_never_asks_the_teacher_twice_for_an_ok_image(
        world: str, sim: TeacherSim, tmp_path: Path) -> None:
    out = tmp_path / "seed"
    sim.set_faults(rate=0.4, kinds=("short", "refusal", "truncated"))
    proc = _caption(world, str(out), _env(sim))
    assert proc.wait(timeout=300) == 0
    errors = {i for i, status in published_records(out).items() if status == "error"}
    assert len(errors) >= 20
    id_of = {sample_meta(s)["sha256"]: sample_meta(s)["id"] for s in open_dataset(world).samples()}
    # retried transport faults, some errors again, and slow enough answers for the kills to land mid-run
    sim.set_faults(rate=0.2, kinds=("429", "500", "503", "short"), latency_s=0.1)
    sim.reset_stats()
    asked: Counter = Counter()
    ok_before = {i for i, status in published_records(out).items() if status == "ok"}

    def no_ok_image_asked_again() -> None:
        nonlocal ok_before
        requests = {id_of[sha]: n for sha, n in sim.requests_by_image().items()}
        sim.reset_stats()
        asked.update(requests)
        again = sorted(set(requests) & ok_before)
        assert not again, f"{len(again)} image(s) with an ok record asked again (paid twice), e.g. {again[0]}"
        ok_before = {i for i, status in published_records(out).items() if status == "ok"}

    start = lambda: _caption(world, str(out), _env(sim), "--retry-errors", "teacher.concurrency=2")  # noqa: E731
    assert kill_at_random_moments(start, out, kills=4, seed=5, after_each=no_ok_image_asked_again) == 4
    assert set(asked) <= errors  # only images whose record was an error were asked again
    _check(world, str(out))


def test_a_teacher_outage_fails_the_job_keeps_what_was_paid_for_and_a_rerun_continues(
        world: str, sim: TeacherSim, tmp_path: Path) -> None:
    out = tmp_path / "seed"
    sim.set_faults(rate=0.0, latency_s=0.02)
    proc = _caption(world, str(out), _env(sim), "teacher.concurrency=2")
    deadline = time.monotonic() + 120
    while sim.stats()["chat_requests"] < 30:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    sim.set_faults(rate=1.0, kinds=("503",), retry_after_s=0.01)  # the teacher goes down and stays down
    _, stderr = proc.communicate(timeout=300)
    *_, error = stderr.strip().splitlines()
    assert proc.returncode == 1 and error.startswith("sharegpt4v: error: teacher at ") and "server_error" in error
    assert "Traceback" not in stderr and "sk-test-secret-123" not in stderr
    published = published_records(out)
    assert published and set(published.values()) == {"ok"}  # an outage is no image's fault: no error records
    assert not storage.open_store(str(out)).is_complete()  # and no caption set pretends to be whole

    sim.set_faults(rate=0.0)
    sim.reset_stats()
    proc = _caption(world, str(out), _env(sim))
    assert proc.wait(timeout=300) == 0
    id_of = {sample_meta(s)["sha256"]: sample_meta(s)["id"] for s in open_dataset(world).samples()}
    asked = {id_of[sha] for sha in sim.requests_by_image()}
    assert not asked & set(published)  # what was paid for before the outage is not asked again
    assert all(r["status"] == "ok" for r in _check(world, str(out)))


def test_budget_cap_stops_cleanly_and_rerun_continues(world: str, sim: TeacherSim, tmp_path: Path) -> None:
    sim.set_faults(rate=0.0)
    out = str(tmp_path / "seed")
    # one caption costs ~85+~190 prompt tokens and ~100 completion tokens at the default prices: ~$0.0017
    proc = _caption(world, out, _env(sim), "--budget-usd", "0.05", "--json")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    first = json.loads(stdout)
    assert first["stopped"] == "budget" and not first["complete"] and 0 < first["captioned"] < 100
    requests_after_first = sim.stats()["requests"]
    proc = _caption(world, out, _env(sim), "--json")
    stdout, stderr = proc.communicate(timeout=300)
    second = json.loads(stdout)
    assert second["complete"] and first["captioned"] + second["captioned"] == 100
    assert sim.stats()["requests"] - requests_after_first == second["captioned"]  # nothing asked twice
    _check(world, out)


def test_missing_key_is_a_one_line_error(world: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env["OPENAI_BASE_URL"] = "http://127.0.0.1:9/v1"
    result = subprocess.run([sys.executable, "-m", "sharegpt4v", "caption", "teacher", "--input", world, "--out",
                             str(tmp_path / "x")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 1 and "OPENAI_API_KEY" in result.stderr and result.stderr.count("\n") == 1


def test_teacher_sim_serve_cli(world: str) -> None:
    import urllib.request

    from sharegpt4v.services import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sharegpt4v", "teacher-sim", "serve", "--world", world,
                             "--port", str(port), "--fault-rate", "0.5", "--fault-kinds", "503"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}/v1" in line and "100 images" in line
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer x"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)

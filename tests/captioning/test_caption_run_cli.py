"""`sharegpt4v caption run`: a saved captioner checkpoint captions a world dataset, exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sharegpt4v.captioning.job import iter_caption_records
from sharegpt4v.config import WorldConfig
from sharegpt4v.data.shards import open_dataset, sample_meta
from sharegpt4v.modeling.builder import save_model
from sharegpt4v.world.generate import generate_world
from tests.modeling.fixtures import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def test_caption_run_with_a_saved_tiny_captioner(tmp_path: Path, s3_uri: str) -> None:
    world = f"{s3_uri}/world"
    generate_world(world, 24, 5, WorldConfig(samples_per_shard=8), progress=False)
    model, processor = tiny_model()
    model_uri = f"{s3_uri}/captioner"
    save_model(model, processor, model_uri)
    out = f"{s3_uri}/captions"
    result = subprocess.run(
        [sys.executable, "-m", "sharegpt4v", "caption", "run", "--input", world, "--out", out, "--model", model_uri,
         "--json", "captioning.max_new_tokens=6", "captioning.batch_size=8"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["complete"] and summary["captioned"] == 24
    records = list(iter_caption_records(out))
    assert sorted(r["id"] for r in records) == sorted(sample_meta(s)["id"] for s in open_dataset(world).samples())
    assert {r["prompt_id"] for r in records} == {"captioner-v1"}
    assert all(r["captioner"].startswith(f"llava:{model_uri}@") for r in records)
    assert all(0 < r["completion_tokens"] <= 6 for r in records if r["status"] == "ok")

    # the same set with other decoding is another caption set: refused in one line, replaced only when asked
    def rerun(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sharegpt4v", "caption", "run", "--input", world, "--out", out, "--model", model_uri,
             "--json", "captioning.max_new_tokens=8", "captioning.batch_size=8", *extra],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )
    refused = rerun()
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "captioner.max_new_tokens: 6 -> 8" in refused.stderr and "--overwrite" in refused.stderr
    assert list(iter_caption_records(out)) == records
    replaced = rerun("--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(replaced.stdout)["captioned"] == 24


def test_caption_run_with_a_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    world = str(tmp_path / "world")
    generate_world(world, 4, 0, WorldConfig(), progress=False)
    result = subprocess.run(
        [sys.executable, "-m", "sharegpt4v", "caption", "run", "--input", world, "--out", str(tmp_path / "c"),
         "--model", str(tmp_path / "no-model")], capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr

"""The README's main job, small: the pipeline locally, then the champion served on the real Triton."""

from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient

from sharegpt4v.demo import run_demo

# Tiny steps: this checks the job's plumbing (pipeline -> registry -> repository -> Triton), not quality.
FAST = ["world.samples_per_shard=16", "foundations.vision_steps=5", "foundations.language_steps=5",
        "captioner.max_steps=10", "pretrain.max_steps=10", "sft.max_steps=10",
        "captioning.max_new_tokens=12", "eval.limit=30", "eval.max_new_tokens=4", "serving.max_new_tokens=12"]


@pytest.mark.slow
def test_demo_runs_the_pipeline_and_serves_the_champion(tmp_path, capsys) -> None:
    before = dict(os.environ)
    result = run_demo(tmp_path / "demo", images=48, seed=2, overrides=FAST, shard_groups=2)
    assert dict(os.environ) == before  # the services' settings do not leak out of the job
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # rich wraps long titles at the console width

    served = result["served"]
    assert served["caption"]["text"].strip() and served["caption"]["finish_reason"] in ("stop", "length")
    assert len(served["answers"]) == len(served["questions"]) >= 3
    assert all(a["finish_reason"] in ("stop", "length") and a["completion_tokens"] >= 1 for a in served["answers"])
    assert {q["kind"] for q in served["questions"]} == {"short", "yesno"}
    assert 0 <= served["right"] <= len(served["answers"]) and served["blind_caption"]["text"].strip()
    assert served["image_id"].startswith("w2-")
    # what the user reads: the evaluation table, the answers, the registered models, how to open MLflow
    assert "perception (MME-style, 0-100)" in flat and "never sees the image" in flat
    assert "The chat model (Triton, model `chat`)" in flat and "captioner (Triton, model `captioner`)" in flat
    assert "models:/sharegpt4v-chat/" in out and "mlflow ui --backend-store-uri" in out
    assert "fact recall" in out
    # kfp.local's task output goes to the log file, its task progress to the console
    assert "Executing task" in out and "[KFP Executor" not in out
    assert "[KFP Executor" in (tmp_path / "demo" / "pipeline.log").read_text()

    client = MlflowClient(f"sqlite:///{tmp_path / 'demo' / 'mlflow' / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("sharegpt4v-chat", "champion")
    assert str(champion.version) == result["models"]["sft"]["version"]
    assert champion.tags["serving.model_repository"].rstrip("/") == result["model_repository"].rstrip("/")

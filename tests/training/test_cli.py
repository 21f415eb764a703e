"""`sharegpt4v train STAGE`: the three stages from the CLI, each registered with its lineage."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from sharegpt4v.serving.pyfunc import example_png

ROOT = Path(__file__).resolve().parents[2]
FAST = ["captioner.max_steps=3", "pretrain.max_steps=3", "sft.max_steps=3", "captioner.max_samples=32",
        "pretrain.max_samples=32", "sft.max_samples=32", "captioning.max_new_tokens=4", "sft.epochs=1"]


def train(*args: str) -> dict:
    env = {**os.environ, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}  # a few samples even from a short run
    result = subprocess.run([sys.executable, "-m", "sharegpt4v", "train", *args, "--json", *FAST], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.slow
def test_three_stages_register_versions_with_lineage(world: str, seed_captions: str, tmp_path: Path,
                                                     mlflow_sqlite: str) -> None:
    captioner = train("captioner", "--data", world, "--captions", seed_captions, "--out", str(tmp_path / "cap"))
    pretrain = train("pretrain", "--data", world, "--out", str(tmp_path / "pt"))
    sft = train("sft", "--data", world, "--init", "models:/sharegpt4v-pretrained@candidate", "--out", str(tmp_path / "sft"))
    assert [s["registered"]["name"] for s in (captioner, pretrain, sft)] == [
        "sharegpt4v-captioner", "sharegpt4v-pretrained", "sharegpt4v-chat"]
    assert sft["steps"] == 2 and sft["checkpoint_uri"].endswith("final")  # 32 samples / global batch 16
    client = MlflowClient(mlflow_sqlite)
    chat = client.get_model_version("sharegpt4v-chat", sft["registered"]["version"])
    assert chat.tags["lineage.parent_model"] == "sharegpt4v-pretrained/1"
    assert chat.tags["lineage.dataset"] == world and len(chat.tags["lineage.dataset_digest"]) == 16
    assert chat.tags["checkpoint"] == sft["checkpoint_uri"] and chat.run_id == sft["run_id"]
    assert chat.source == f"models:/{sft['registered']['model_id']}"  # an MLflow model over the checkpoint
    cap = client.get_model_version("sharegpt4v-captioner", "1")
    assert cap.tags["lineage.captions"] == seed_captions
    assert client.get_model_version_by_alias("sharegpt4v-chat", "candidate").version == int(chat.version)
    run = client.get_run(sft["run_id"])
    assert run.data.params["sft.learning_rate"] and "loss" in run.data.metrics
    assert "system/cpu_utilization_percentage" in run.data.metrics  # system metrics of the training run
    # the registered version answers through MLflow's pyfunc
    pyfunc = mlflow.pyfunc.load_model("models:/sharegpt4v-chat@candidate")
    image = base64.b64encode(example_png()).decode()
    answers = pyfunc.predict(pd.DataFrame([{"image": image, "prompt": "What colour is the circle?"}]),
                             params={"max_new_tokens": 4})
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_trainjob_is_printed_not_run(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sharegpt4v", "train", "sft", "--data", "s3://b/world", "--out",
                             "s3://b/ckpt", "--trainjob", "--image", "registry.example/train:1", "--profile", "a100-7b"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "kind: TrainJob" in result.stdout and "numProcPerNode: 8" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "sharegpt4v", "train", "sft", "--data", "x", "--out", "y",
                              "--trainjob"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and "--image" in missing.stderr  # a usage error

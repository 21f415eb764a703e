"""`sharegpt4v eval run|score` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from sharegpt4v import tracking
from sharegpt4v.config import WorldConfig
from sharegpt4v.modeling.builder import save_model
from sharegpt4v.world.generate import generate_world
from tests.modeling.fixtures import tiny_model

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT.parent / "shared" / "reference-scores" / "llava-v1.5-13b"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sharegpt4v", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ), timeout=600)


def test_score_reference_answers() -> None:
    mme = cli("eval", "score", "--benchmark", "mme", "--answers", str(REFERENCE / "MME/MME_answers_llava-v1.5-13b.jsonl"),
              "--path", str(REFERENCE / "MME/ground_truth"))
    assert mme.returncode == 0, mme.stderr
    assert "mme.perception  1531.3187" in mme.stdout
    upload = REFERENCE / "MMBench/mmbench_answers_upload_mmbench_dev_20230712_llava-v1.5-13b.xlsx"
    mmbench = cli("eval", "score", "--benchmark", "mmbench", "--answers", str(upload), "--json")
    assert mmbench.returncode == 0, mmbench.stderr
    assert round(json.loads(mmbench.stdout)["circular"] * 100, 1) == 67.7


def test_eval_run_on_a_registered_model_and_promote(tmp_path: Path, mlflow_sqlite: str) -> None:
    world = str(tmp_path / "world")
    generate_world(world, 12, 4, WorldConfig(), progress=False)
    model, processor = tiny_model()
    save_model(model, processor, str(tmp_path / "ckpt"))
    version = tracking.register_checkpoint("sft", str(tmp_path / "ckpt"))
    result = cli("eval", "run", "--model", "models:/sharegpt4v-chat@candidate", "--data", world, "--out",
                 str(tmp_path / "eval"), "--promote", "eval.split=train", "eval.limit=20", "eval.champion_threshold=0")
    assert result.returncode == 0, result.stderr
    assert "world-vqa.overall" in result.stdout and "promoted sharegpt4v-chat/1 to champion" in result.stdout
    assert str(MlflowClient(mlflow_sqlite).get_model_version_by_alias("sharegpt4v-chat", "champion").version) == version["version"]
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["world-vqa"]["overall"] >= 0
    scored = MlflowClient(mlflow_sqlite).get_logged_model(version["model_id"]).metrics  # shown per version
    assert "world-vqa.overall" in {m.key for m in scored}
    too_high = cli("eval", "run", "--model", "models:/sharegpt4v-chat/1", "--data", world, "--out", str(tmp_path / "e2"),
                   "--promote", "eval.split=train", "eval.limit=5", "eval.champion_threshold=2")
    assert too_high.returncode == 0 and "not promoted" in too_high.stdout


def test_eval_run_without_a_data_source_fails_clearly(tmp_path: Path) -> None:
    result = cli("eval", "run", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr  # a usage error

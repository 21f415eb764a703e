"""Registered versions are MLflow models: `mlflow.pyfunc.load_model("models:/...@champion").predict(...)`
answers like the platform's own engine, the weights stay in the checkpoint, lineage stays on the version."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from sharegpt4v import tracking
from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
from sharegpt4v.config import CaptioningConfig
from sharegpt4v.modeling.builder import load_model, save_model
from sharegpt4v.modeling.inference import InferenceEngine
from sharegpt4v.modeling.templates import generation_prompt
from sharegpt4v.serving.pyfunc import example_png
from tests.modeling.fixtures import png, tiny_model

QUESTION = "What colour is the circle?"
TOKENS = 12  # short answers keep the tests fast; the same limit for the pyfunc and the engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    model, processor = tiny_model()
    uri = str(tmp_path_factory.mktemp("pyfunc") / "ckpt")
    save_model(model, processor, uri, image_aspect="pad")
    return uri


def engine_answers(checkpoint: str, images: list[bytes], prompts: list[str]) -> list[str]:
    """What the platform's own engine answers, greedily, for the same rows."""
    model, processor = load_model(checkpoint)
    engine = InferenceEngine(model, processor, None, CaptioningConfig(max_new_tokens=TOKENS), aspect="pad")
    return [g.text for g in engine.generate(images, prompts, max_new_tokens=TOKENS)]


def model_files(client: MlflowClient, model_id: str, path: str | None = None) -> list[str]:
    files = []
    for item in client.list_logged_model_artifacts(model_id, path):
        files += model_files(client, model_id, item.path) if item.is_dir else [item.path]
    return files


def test_the_champion_loads_with_pyfunc_and_answers_like_the_engine(checkpoint: str, mlflow_sqlite: str) -> None:
    lineage = {"parent_model": "sharegpt4v-pretrained/1", "dataset": "s3://data/world", "dataset_digest": "d" * 16}
    with tracking.stage_run("sft", {}) as run:
        pass
    registered = tracking.register_checkpoint("sft", checkpoint, run.info.run_id, lineage, description="tiny chat")
    tracking.promote(registered["name"], registered["version"])

    pyfunc = mlflow.pyfunc.load_model("models:/sharegpt4v-chat@champion")
    image = base64.b64encode(example_png()).decode()
    answers = pyfunc.predict(pd.DataFrame([{"image": image, "prompt": QUESTION}]), params={"max_new_tokens": TOKENS})
    assert isinstance(answers, list) and len(answers) == 1 and answers[0].strip()
    assert answers == engine_answers(checkpoint, [example_png()], [generation_prompt("vicuna_v1", QUESTION)])

    # the version: an MLflow model with a signature and an input example, the training run's output
    client = MlflowClient(mlflow_sqlite)
    version = client.get_model_version("sharegpt4v-chat", registered["version"])
    assert version.source == f"models:/{registered['model_id']}" and version.run_id == run.info.run_id
    assert version.description == "tiny chat" and version.tags["stage"] == "sft"
    assert version.tags["checkpoint"] == checkpoint
    assert {k: version.tags[f"lineage.{k}"] for k in lineage} == lineage
    info = mlflow.models.get_model_info("models:/sharegpt4v-chat@champion")
    assert info.signature.inputs.input_names() == ["image", "prompt"]
    assert [c.type.name for c in info.signature.inputs.inputs] == ["string", "string"]
    assert [c.type.name for c in info.signature.outputs.inputs] == ["string"]
    assert info.flavors["python_function"]["model_code_path"].endswith("pyfunc_model.py")  # models from code
    assert info.flavors["python_function"]["config"]["checkpoint"] == checkpoint
    assert mlflow.models.Model.load("models:/sharegpt4v-chat@champion").load_input_example().columns.tolist() == [
        "image", "prompt"]
    assert [o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs] == [registered["model_id"]]

    # weights in one place: the MLflow model describes the checkpoint, it holds no copy of it
    files = model_files(client, registered["model_id"])
    assert "MLmodel" in files and "pyfunc_model.py" in files
    assert not [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pkl"))], files
    assert not list((Path(mlflow_sqlite.removeprefix("sqlite:///")).parent / "artifacts").rglob("*.safetensors"))

    # the rest of the platform still gets the checkpoint from a models:/ reference
    assert tracking.resolve_model("models:/sharegpt4v-chat@champion") == (
        checkpoint, {"name": "sharegpt4v-chat", "version": registered["version"]})
    assert tracking.logged_model_id("models:/sharegpt4v-chat@champion") == registered["model_id"]


def test_the_captioner_captions_without_a_prompt(checkpoint: str, mlflow_sqlite: str) -> None:
    registered = tracking.register_checkpoint("captioner", checkpoint)
    pyfunc = mlflow.pyfunc.load_model(registered["uri"])
    red, blue = png((40, 30), (200, 20, 20)), png((30, 40), (20, 20, 200))
    rows = [{"image": base64.b64encode(red).decode(), "prompt": ""}, {"image": blue}]  # bytes work from Python
    answers = pyfunc.predict(rows, params={"max_new_tokens": TOKENS})
    caption = generation_prompt("vicuna_v1", CAPTION_INSTRUCTION)
    assert answers == engine_answers(checkpoint, [red, blue], [caption, caption])
    no_prompt = pyfunc.predict(pd.DataFrame([{"image": base64.b64encode(red).decode()}]), params={"max_new_tokens": TOKENS})
    assert no_prompt == answers[:1]
    with pytest.raises(mlflow.exceptions.MlflowException, match="row 0: image: not base64"):
        pyfunc.predict(pd.DataFrame([{"image": "not an image!", "prompt": "x"}]))
    with pytest.raises(mlflow.exceptions.MlflowException, match="row 0: bad_image"):
        pyfunc.predict(pd.DataFrame([{"image": base64.b64encode(b"not a png").decode(), "prompt": "x"}]))


def test_training_runs_record_system_metrics(mlflow_sqlite: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from sharegpt4v.training.tracking_hooks import _tracking_run

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with _tracking_run(0, "sft", {"stage": "sft"}, {}, None) as run:
        time.sleep(1.0)
    with _tracking_run(0, "sft", {"stage": "sft"}, {}, run.info.run_id) as resumed:  # a resumed stage too
        time.sleep(1.0)
    assert resumed.info.run_id == run.info.run_id
    client = MlflowClient(mlflow_sqlite)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")]
    assert steps == sorted(set(steps)) and len(steps) >= 2  # the resumed run continues the series


def test_a_checkpoint_in_s3_loads_with_credentials_from_the_environment(s3_uri: str, mlflow_sqlite: str,
                                                                         tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SHAREGPT4V_CACHE", str(tmp_path / "cache"))  # the download lands in a fresh cache
    model, processor = tiny_model()
    save_model(model, processor, f"{s3_uri}/ckpt", image_aspect="pad")
    tracking.register_checkpoint("sft", f"{s3_uri}/ckpt", aliases=("champion",))
    pyfunc = mlflow.pyfunc.load_model("models:/sharegpt4v-chat@champion", model_config={"device": "cpu"})
    image = base64.b64encode(example_png()).decode()
    answers = pyfunc.predict(pd.DataFrame([{"image": image, "prompt": QUESTION}]), params={"max_new_tokens": 4})
    assert len(answers) == 1 and isinstance(answers[0], str)
    assert list((tmp_path / "cache").rglob("*.safetensors"))  # the weights came from S3, once, into the cache

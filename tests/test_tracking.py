"""MLflow tracking helpers: stage runs, registry versions with lineage, aliases, dataset inputs."""

from __future__ import annotations

import os

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from sharegpt4v import tracking


def test_everything_is_a_no_op_without_tracking(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.stage_run("x", {"a": 1}) as run:
        assert run is None
        tracking.log_metrics({"m": 1.0})
        tracking.log_dataset("s3://b/data", "abc", "training")


def test_nested_stage_runs_and_batched_metrics(mlflow_sqlite: str) -> None:
    with tracking.stage_run("parent", {"p": 1}) as parent:
        with tracking.stage_run("child", {"long": "x" * 10000}) as child:
            tracking.log_metrics({"loss": 1.5, "lr": 0.1}, step=3)
            tracking.log_dataset("s3://bucket/world/manifest.json", "f" * 64, "training", name="world")
    client = MlflowClient(mlflow_sqlite)
    got = client.get_run(child.info.run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert got.data.metrics == {"loss": 1.5, "lr": 0.1}
    assert len(got.data.params["long"]) == 6000  # clipped to MLflow's limit, not rejected
    (dataset_input,) = got.inputs.dataset_inputs
    assert dataset_input.dataset.name == "world" and dataset_input.dataset.digest == "f" * 36
    assert "s3://bucket/world/manifest.json" in dataset_input.dataset.source
    assert dataset_input.tags[0].value == "training"


def test_register_versions_with_lineage_and_aliases(mlflow_sqlite: str) -> None:
    with tracking.stage_run("pretrain", {}) as run:
        first = tracking.register_checkpoint("pretrain", "s3://ckpt/pretrain/final", run.info.run_id,
                                             lineage={"parent_model": "sharegpt4v-captioner/1", "dataset": "s3://d"})
    second = tracking.register_checkpoint("pretrain", "s3://ckpt/pretrain-2/final")
    assert (first["name"], first["version"], second["version"]) == ("sharegpt4v-pretrained", "1", "2")
    client = MlflowClient(mlflow_sqlite)
    version = client.get_model_version("sharegpt4v-pretrained", "1")
    assert version.tags["lineage.parent_model"] == "sharegpt4v-captioner/1"
    # an MLflow model (the run's output) that loads the checkpoint where it is
    assert version.tags["checkpoint"] == "s3://ckpt/pretrain/final" and version.run_id == run.info.run_id
    assert version.source == f"models:/{first['model_id']}" != f"models:/{second['model_id']}"
    logged = client.get_logged_model(first["model_id"])
    assert logged.source_run_id == run.info.run_id and logged.tags["lineage.parent_model"] == "sharegpt4v-captioner/1"
    assert tracking.logged_model_id("models:/sharegpt4v-pretrained/1") == first["model_id"]
    # "candidate" moves to the newest; "champion" only by promotion
    assert tracking.resolve_model("models:/sharegpt4v-pretrained@candidate") == (
        "s3://ckpt/pretrain-2/final", {"name": "sharegpt4v-pretrained", "version": "2"})
    tracking.promote("sharegpt4v-pretrained", "1")
    assert tracking.resolve_model("models:/sharegpt4v-pretrained@champion")[0] == "s3://ckpt/pretrain/final"
    assert tracking.resolve_model("models:/sharegpt4v-pretrained/2")[0] == "s3://ckpt/pretrain-2/final"
    assert tracking.resolve_model("s3://plain/uri") == ("s3://plain/uri", {})


def test_unknown_stage_is_refused(mlflow_sqlite: str) -> None:
    with pytest.raises(KeyError):
        tracking.register_checkpoint("distill", "s3://x")
    mlflow.set_tracking_uri("")


def test_dataset_logging_survives_a_concurrent_insert(mlflow_sqlite: str, monkeypatch) -> None:
    """Two arms logging the same new dataset at once: the loser of the unique-row race retries."""
    from mlflow.exceptions import MlflowException

    real = mlflow.log_input
    calls = []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", racing)
    with tracking.stage_run("arm", {}) as run:
        tracking.log_dataset("s3://bucket/world/manifest.json", "a" * 64, "training")
    assert len(calls) == 2
    assert len(MlflowClient(mlflow_sqlite).get_run(run.info.run_id).inputs.dataset_inputs) == 1


def test_experiment_scope_is_restored(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "outer")
    with tracking.experiment("inner"):
        assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "inner"
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "outer"


def test_experiment_created_meanwhile_by_another_process(mlflow_sqlite: str, monkeypatch) -> None:
    real = mlflow.create_experiment

    def lose_the_race(name, artifact_location=None):
        real(name, artifact_location=artifact_location)  # the other process wins...
        return real(name, artifact_location=artifact_location)  # ...and our create finds it taken

    monkeypatch.setattr(mlflow, "create_experiment", lose_the_race)
    experiment_id = tracking.ensure_experiment("raced")
    assert MlflowClient(mlflow_sqlite).get_experiment_by_name("raced").experiment_id == experiment_id


def test_runs_nest_under_a_parent_run_of_another_process(mlflow_sqlite: str, monkeypatch) -> None:
    """A pipeline's run is created elsewhere: a task nests under it by argument, a launched process by env."""
    client = MlflowClient(mlflow_sqlite)
    experiment_id = tracking.ensure_experiment(tracking.DEFAULT_EXPERIMENT)
    pipeline = client.create_run(experiment_id, run_name="pipeline").info.run_id
    with tracking.stage_run("task", {}, parent_run_id=pipeline) as task:
        with tracking.stage_run("stage", {}) as stage:  # the active run wins over the environment
            pass
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, task.info.run_id)
    with tracking.stage_run("rank0", {}) as launched:
        pass
    parent_of = {r: client.get_run(r).data.tags.get("mlflow.parentRunId")
                 for r in (task.info.run_id, stage.info.run_id, launched.info.run_id)}
    assert parent_of == {task.info.run_id: pipeline, stage.info.run_id: task.info.run_id,
                         launched.info.run_id: task.info.run_id}
    assert client.get_run(pipeline).info.status == "RUNNING"  # only its owner ends it


def test_params_and_tags_carry_no_url_credentials(mlflow_sqlite: str) -> None:
    """A teacher URL with userinfo and a signed query is recorded without them (so is any tag)."""
    teacher = "https://user:pass@teacher.example.com/v1?sig=s3cr3t&deployment=vlm"
    with tracking.stage_run("seed-captions", {"teacher_endpoint": teacher, "dataset": "s3://b/world"},
                            tags={"endpoint": "http://admin:hunter2@mlflow:5000/?token=t0k"}) as run:
        pass
    got = MlflowClient(mlflow_sqlite).get_run(run.info.run_id).data
    assert got.params == {"teacher_endpoint": "https://teacher.example.com/v1?sig=REDACTED&deployment=vlm",
                          "dataset": "s3://b/world"}
    assert got.tags["endpoint"] == "http://mlflow:5000/?token=REDACTED"
    recorded = " ".join([*got.params.values(), *got.tags.values()])
    assert not any(secret in recorded for secret in ("pass", "s3cr3t", "hunter2", "t0k"))


def test_a_registry_failure_names_the_model_and_its_cause(mlflow_sqlite: str, monkeypatch) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    from sharegpt4v.errors import PlatformError

    def unavailable(self, *args, **kwargs):
        raise MlflowException("database is locked\n(details on the next lines)", error_code=TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(MlflowClient, "create_model_version", unavailable)
    with pytest.raises(PlatformError, match=r"registering s3://ckpt/sft/final as model 'sharegpt4v-chat': MLflow at "
                                            r"sqlite:///.* failed: TEMPORARILY_UNAVAILABLE: database is locked$"):
        tracking.register_checkpoint("sft", "s3://ckpt/sft/final")

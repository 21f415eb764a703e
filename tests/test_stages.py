"""What the components do around the core: the pipeline's MLflow run, task runs nested under it, content keys."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from sharegpt4v import stages as steps
from sharegpt4v import tracking


def test_start_task_runs_and_finish_track_a_pipeline_run_by_its_kfp_run_id(mlflow_sqlite: str, monkeypatch) -> None:
    """On a cluster without the MLflow plugin: tasks find the pipeline's run through $KFP_RUN_ID (pod label)."""
    client = MlflowClient(mlflow_sqlite)
    run_id = steps.start_pipeline_run("sharegpt4v", "kfp-run-7", "nightly-7", {"world_images": 6000}, "recipe-runs")
    assert steps.start_pipeline_run("sharegpt4v", "kfp-run-7", "nightly-7", {"world_images": 6000}, "x") == run_id
    monkeypatch.setenv(steps.KFP_RUN_ID_ENV, "kfp-run-7")
    with steps.task_run("pretrain", {"gpus": 8}) as task:
        with tracking.stage_run("pretrain-stage", {}) as stage:
            pass
    assert steps.finish_pipeline_run("kfp-run-7", "FAILED", "Task pretrain failed.") == "FAILED"
    parent = client.get_run(run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["kfp.error"] == "Task pretrain failed."
    assert parent.data.tags["kfp.run_id"] == "kfp-run-7" and parent.data.params["pipeline.world_images"] == "6000"
    assert client.get_experiment(parent.info.experiment_id).name == "recipe-runs"
    got = client.get_run(task.info.run_id)
    assert got.data.tags["mlflow.parentRunId"] == run_id and got.info.experiment_id == parent.info.experiment_id
    assert client.get_run(stage.info.run_id).data.tags["mlflow.parentRunId"] == task.info.run_id


def test_task_runs_honour_the_kfp_mlflow_plugin(mlflow_sqlite: str, monkeypatch) -> None:
    """The plugin creates the pipeline's run and one nested run per task, and injects MLFLOW_RUN_ID."""
    client = MlflowClient(mlflow_sqlite)
    experiment = tracking.ensure_experiment("plugin-experiment")
    pipeline = client.create_run(experiment, run_name="kfp-pipeline").info.run_id
    task = client.create_run(experiment, run_name="sft", tags={"mlflow.parentRunId": pipeline}).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", task)
    assert steps.find_pipeline_run() == pipeline
    assert steps.start_pipeline_run("sharegpt4v", "kfp-9", "run-9", {"profile": "a100-7b"}) == pipeline
    with steps.task_run("sft", {"gpus": 8}) as run:
        assert run.info.run_id == task  # resumed, not a new run
        with tracking.stage_run("sft-stage", {}) as stage:
            pass
    assert client.get_run(stage.info.run_id).data.tags["mlflow.parentRunId"] == task
    assert client.get_run(task).data.params["gpus"] == "8"
    assert client.get_run(pipeline).data.tags["kfp.run_id"] == "kfp-9"


def test_without_tracking_the_steps_track_nothing(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert steps.start_pipeline_run("p", "r", "n", {}) == "" and steps.finish_pipeline_run("r", "FAILED") == "none"
    with steps.task_run("x", {}) as run:
        assert run is None


def test_content_keys_follow_what_determines_the_output() -> None:
    key = steps.content_key("pretrain", "digest-a", {"lr": 1e-3})
    assert key == steps.content_key("pretrain", "digest-a", {"lr": 1e-3}) and len(key) == 12
    assert key != steps.content_key("pretrain", "digest-b", {"lr": 1e-3})
    assert key != steps.content_key("pretrain", "digest-a", {"lr": 2e-3})

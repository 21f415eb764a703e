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


def test_a_checkpoint_is_registered_once_and_registry_failures_surface(mlflow_sqlite: str, monkeypatch) -> None:
    """Only "no such model" reads as "no versions yet": any other registry failure stops the task (a
    failed lookup must not register the same checkpoint a second time)."""
    import pytest
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    from sharegpt4v.errors import PlatformError

    client = MlflowClient(mlflow_sqlite)
    first = steps._register_once("pretrain", "s3://ckpt/pretrain-a/final", None, {"dataset": "s3://d"})
    assert steps._register_once("pretrain", "s3://ckpt/pretrain-a/final", None, {}) == first
    search = MlflowClient.search_model_versions

    def failing(self, *args, **kwargs):
        raise MlflowException("INTERNAL_ERROR: Response: {'error': 'upstream connect error'}", error_code=INTERNAL_ERROR)

    monkeypatch.setattr(MlflowClient, "search_model_versions", failing)
    with pytest.raises(PlatformError, match=r"looking up the versions of model 'sharegpt4v-pretrained': MLflow at "
                                            r"\S+ failed: INTERNAL_ERROR: Response: .*upstream connect error"):
        steps._register_once("pretrain", "s3://ckpt/pretrain-a/final", None, {})
    monkeypatch.setattr(MlflowClient, "search_model_versions", search)
    assert [str(v.version) for v in client.search_model_versions("name='sharegpt4v-pretrained'")] == ["1"]

    def absent(self, *args, **kwargs):
        raise MlflowException("Registered Model with name=sharegpt4v-chat not found", error_code=RESOURCE_DOES_NOT_EXIST)

    monkeypatch.setattr(MlflowClient, "search_model_versions", absent)
    assert steps._register_once("sft", "s3://ckpt/sft-a/final", None, {})["version"] == "1"


def test_pipeline_params_and_errors_carry_no_url_credentials(mlflow_sqlite: str) -> None:
    teacher = "https://user:pass@teacher.example.com/v1?sig=s3cr3t"
    run_id = steps.start_pipeline_run("sharegpt4v", "kfp-run-8", "run-8", {"teacher_endpoint": teacher})
    steps.finish_pipeline_run("kfp-run-8", "FAILED", f"teacher {teacher} refused the key")
    data = MlflowClient(mlflow_sqlite).get_run(run_id).data
    assert data.params["pipeline.teacher_endpoint"] == "https://teacher.example.com/v1?sig=REDACTED"
    assert data.tags["kfp.error"] == "teacher https://teacher.example.com/v1?sig=REDACTED refused the key"

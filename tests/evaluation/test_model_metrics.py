"""Evaluating a registered version links its scores to the version's MLflow model (MLflow 3 LoggedModel)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from sharegpt4v import tracking
from sharegpt4v.config import load_recipe
from sharegpt4v.evaluation import evaluate, flat_metrics
from tests.evaluation.builders import oracle


def test_scores_of_a_registered_version_show_on_its_model(world_uri: str, mlflow_sqlite: str) -> None:
    first = tracking.register_checkpoint("sft", "s3://ckpt/sft-a/final")
    second = tracking.register_checkpoint("sft", "s3://ckpt/sft-b/final")
    results = evaluate(oracle(), load_recipe("tiny"), world_uri, model_id="models:/sharegpt4v-chat/1")
    client = MlflowClient(mlflow_sqlite)
    scored = {m.key: m.value for m in client.get_logged_model(first["model_id"]).metrics}
    assert scored == flat_metrics(results) and scored["world-vqa.overall"] == 1.0
    assert not client.get_logged_model(second["model_id"]).metrics  # only the version evaluated
    (run,) = client.search_runs([client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT).experiment_id],
                                "tags.stage = 'eval'")
    assert run.data.metrics["world-vqa.overall"] == 1.0  # the run keeps its metrics too
    assert [m.model_id for m in client.get_run(run.info.run_id).inputs.model_inputs] == [first["model_id"]]
    # a checkpoint that is not a registered version: metrics on the run only
    evaluate(oracle(), load_recipe("tiny"), world_uri, model_id="s3://ckpt/sft-b/final")
    assert not client.get_logged_model(second["model_id"]).metrics

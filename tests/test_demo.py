"""The README's main job, small: services up, world in S3, report, MLflow runs, services down."""

from __future__ import annotations

import os

import mlflow
from mlflow.tracking import MlflowClient

from sharegpt4v.demo import run_demo


def test_demo_end_to_end(tmp_path) -> None:
    before = dict(os.environ)
    result = run_demo(tmp_path / "demo", images=120, seed=1)
    assert dict(os.environ) == before  # the services' settings do not leak out of the job
    report, quality, seed = result["report"], result["quality"], result["seed_captions"]
    assert (report["ok"], report["error"], report["duplicate"]) == (120, 0, 0)
    assert report["integrity_problems"] == []
    train = report["splits"]["train"]
    assert seed["complete"] and seed["captioned"] == train and seed["ok"] == train  # faults were retried away
    rows = {row["set"]: row for row in quality["comparison"]}
    assert rows["teacher"]["fact_recall"] > 0.99 and rows["teacher"]["hallucinated_per_caption"] == 0
    assert rows["world:brief"]["fact_recall"] < 0.35

    client = MlflowClient(f"sqlite:///{tmp_path / 'demo' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sharegpt4v")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"demo", "world-generate", "caption-0-of-1", "caption-report"}
    world = runs["world-generate"]
    assert world.data.tags["mlflow.parentRunId"] == runs["demo"].info.run_id
    assert world.data.params["seed"] == "1" and world.data.metrics["images"] == 120
    assert world.data.metrics["images_per_s"] > 0
    assert runs["caption-0-of-1"].data.metrics["captioner.retries_total"] > 0
    assert runs["caption-report"].data.metrics["teacher.fact_recall"] > 0.99
    artifacts = [a.path for a in client.list_artifacts(world.info.run_id, "world")]
    assert artifacts == ["world/preview.png"]
    assert experiment.artifact_location.startswith((tmp_path / "demo").as_uri())
    mlflow.set_tracking_uri("")

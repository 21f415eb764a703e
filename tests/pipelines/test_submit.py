"""Submission to a KFP endpoint: what `pipeline submit` sends, checked on a recording fake KFP API."""

from __future__ import annotations

import json

import yaml

from pipelines import runner
from sharegpt4v.cli import main
from tests.pipelines.fake_kfp import FakeKFP


def committed(name: str) -> dict:
    return next(yaml.safe_load_all((runner.COMPILED_DIR / f"{name}.yaml").read_text()))


def test_submit_creates_a_run_in_an_experiment_with_the_spec_and_parameters(capsys) -> None:
    with FakeKFP() as kfp:
        code = main(["pipeline", "submit", "--host", kfp.url, "--experiment", "recipe-runs", "--run-name", "nightly",
                     "--param", "world_images=120", "--param", 'overrides=["pretrain.max_steps=5"]',
                     "--param", "teacher_endpoint=http://teacher.sharegpt4v:8000/v1", "--param", "champion_threshold=0.4"])
        assert code == 0
        printed = json.loads(capsys.readouterr().out)
        assert kfp.requests[0]["path"] == "/apis/v2beta1/healthz"
        [experiment] = kfp.posted("/apis/v2beta1/experiments")
        [run] = kfp.posted("/apis/v2beta1/runs")
    assert experiment["display_name"] == "recipe-runs"
    assert run["display_name"] == "nightly" and run["experiment_id"] == next(iter(kfp.experiments))
    assert printed["run_id"].startswith("run-") and printed["url"].endswith(printed["run_id"])
    assert run["runtime_config"]["parameters"] == {
        "world_images": 120, "overrides": ["pretrain.max_steps=5"],
        "teacher_endpoint": "http://teacher.sharegpt4v:8000/v1", "champion_threshold": 0.4}
    sent = run["pipeline_spec"]
    spec = sent.get("pipeline_spec", sent)
    assert spec == committed("sharegpt4v")  # the committed IR, as compiled
    if "platform_spec" in sent:
        assert "kubernetes" in sent["platform_spec"]["platforms"]
    assert set(run["runtime_config"]["parameters"]) <= set(spec["root"]["inputDefinitions"]["parameters"])


def test_recurring_run_reuses_the_experiment_and_sends_the_cron_trigger() -> None:
    with FakeKFP() as kfp:
        first = runner.submit(kfp.url, pipeline="caption-corpus", experiment="captions",
                              arguments={"dataset_uri": "s3://sharegpt4v/corpus/laion-part-7"})
        recurring = runner.submit(kfp.url, pipeline="caption-corpus", experiment="captions", recurring="0 0 3 * * *",
                                  arguments={"dataset_uri": "s3://sharegpt4v/corpus/incoming"}, max_concurrency=1)
        experiments = kfp.posted("/apis/v2beta1/experiments")
        [job] = kfp.posted("/apis/v2beta1/recurringruns")
    assert first["run_id"] and recurring["recurring_run_id"].startswith("rr-")
    assert len(experiments) == 1 and job["experiment_id"] == recurring["experiment_id"]  # found by name
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert job["max_concurrency"] == "1" or job["max_concurrency"] == 1
    assert job["runtime_config"]["parameters"] == {"dataset_uri": "s3://sharegpt4v/corpus/incoming"}
    sent = job["pipeline_spec"]
    assert sent.get("pipeline_spec", sent)["pipelineInfo"]["name"] == "caption-corpus"


def test_unknown_pipeline_and_bad_parameters_fail_with_one_line(capsys) -> None:
    assert main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--pipeline", "nope"]) == 2  # usage errors
    assert "no compiled pipeline 'nope'" in capsys.readouterr().err
    assert main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--param", "novalue"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err

"""The compiled pipelines: up to date, valid KFP IR, GPU tasks placed and provisioned, fan-out/fan-in, no secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines import runner
from sharegpt4v.cli import main
from sharegpt4v.cluster import A100_PRODUCT, GPU_PRODUCT_LABEL, GPU_RESOURCE, MLFLOW_SECRET, S3_SECRET, TEACHER_SECRET

PIPELINES = ("sharegpt4v", "caption-corpus", "train-captioner", "train-lmm")
GPU_TASKS = {"sharegpt4v": {"train-base", "train-captioner", "caption-shard-group", "pretrain", "sft", "evaluate"},
             "caption-corpus": {"caption-shard-group"}, "train-captioner": {"train-base", "train-captioner"},
             "train-lmm": {"pretrain", "sft", "evaluate"}}


def load(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all((runner.COMPILED_DIR / f"{name}.yaml").read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks(spec: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every task of every DAG: name -> (the DAG's component name, task spec)."""
    found = {"root": spec["root"]}
    found.update(spec["components"])
    return {name: (comp, task) for comp, body in found.items() for name, task in body.get("dag", {}).get("tasks", {}).items()}


def executor(spec: dict[str, Any], task: dict[str, Any]) -> str | None:
    """The task's executor label; None for a DAG (ExitHandler, If, ParallelFor)."""
    return spec["components"][task["componentRef"]["name"]].get("executorLabel")


def test_committed_yaml_is_up_to_date_and_parses_as_pipeline_and_platform_spec(capsys) -> None:
    assert sorted(p.stem for p in runner.COMPILED_DIR.glob("*.yaml")) == sorted(PIPELINES)
    assert runner.check_compiled() == []
    assert main(["pipeline", "compile", "--check"]) == 0
    assert "up to date" in capsys.readouterr().out
    spec, platform = runner.parse_ir(runner.COMPILED_DIR / "sharegpt4v.yaml")
    assert spec.pipeline_info.name == "sharegpt4v" and "kubernetes" in platform.platforms
    from kfp import components

    assert components.load_component_from_file(str(runner.COMPILED_DIR / "sharegpt4v.yaml")).name == "sharegpt4v"


def test_check_reports_stale_and_missing_files(tmp_path: Path) -> None:
    runner.compile_all(tmp_path)
    stale = tmp_path / "train-lmm.yaml"
    stale.write_text(stale.read_text().replace("champion_threshold", "threshold"))
    broken = tmp_path / "train-captioner.yaml"
    broken.write_text(broken.read_text().replace("pipelineInfo:", "pipelineInformation:"))  # not a spec field
    (tmp_path / "caption-corpus.yaml").unlink()
    (tmp_path / "old.yaml").write_text("{}\n")
    problems = runner.check_compiled(tmp_path)
    assert len(problems) == 5, problems
    assert any("train-lmm.yaml: out of date" in p for p in problems)
    assert any("train-captioner.yaml: not a valid PipelineSpec" in p and "pipelineInformation" in p for p in problems)
    assert any("caption-corpus.yaml: missing" in p for p in problems)
    assert any("old.yaml: no pipeline of that name" in p for p in problems)


@pytest.mark.parametrize("name", PIPELINES)
def test_every_gpu_task_asks_for_a100_gpus_with_toleration_shm_and_secrets(name: str, monkeypatch) -> None:
    spec, platform = load(name)
    gpu = {}
    for task_name, (_, task) in tasks(spec).items():
        label = executor(spec, task)
        if label is None:
            continue
        resources = spec["deploymentSpec"]["executors"][label]["container"].get("resources", {})
        if "accelerator" in resources:
            gpu[task_name] = (label, resources)
    assert set(gpu) == GPU_TASKS[name]
    root_params = spec["root"]["inputDefinitions"]["parameters"]
    assert root_params["gpu_product"]["defaultValue"] == A100_PRODUCT
    for task_name, (label, resources) in gpu.items():
        accelerator = resources["accelerator"]
        assert accelerator["resourceType"] == GPU_RESOURCE
        channel = accelerator["resourceCount"]  # a pipeline parameter, not a constant
        assert channel.startswith("{{$.inputs.parameters['pipelinechannel--") and channel.endswith("_gpus']}}")
        assert float(resources["resourceCpuRequest"]) >= 8 and resources["resourceMemoryRequest"].endswith("Gi")
        k8s = platform[label]
        selector = k8s["nodeSelector"]["nodeSelectorJson"]  # {gpu.product: <gpu_product>} from the start task
        assert (selector.get("taskOutputParameter", {}).get("producerTask") == "start-run"
                or selector.get("componentInputParameter") == "pipelinechannel--start-run-gpu_node_selector"), selector
        assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
        assert {"mountPath": "/dev/shm", "medium": "Memory"}.items() <= k8s["emptyDirMounts"][0].items()
        secrets = {s["secretName"] for s in k8s["secretAsEnv"]}
        assert {S3_SECRET, MLFLOW_SECRET} <= secrets
        envs = {e["envVar"] for s in k8s["secretAsEnv"] for e in s["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"} <= envs
        assert task_name in {t for t, (_, s) in tasks(spec).items() if s.get("retryPolicy", {}).get("maxRetryCount")}
    # the selector the GPU tasks get: what the start task returns for the gpu_product parameter
    from components.stages import start_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    outputs = start_run.python_func(pipeline=name, kfp_run_id="r", kfp_run_name="n", params={}, overrides=[],
                                    experiment="e", gpu_product=root_params["gpu_product"]["defaultValue"])
    assert outputs.gpu_node_selector == {GPU_PRODUCT_LABEL: A100_PRODUCT}


@pytest.mark.parametrize("name", ["sharegpt4v", "caption-corpus"])
def test_corpus_captioning_fans_out_with_parallelfor_and_in_with_collected(name: str) -> None:
    spec, _ = load(name)
    everything = tasks(spec)
    loop_component, caption_task = everything["caption-shard-group"]
    loop_task = next(t for _, t in everything.values() if t["componentRef"]["name"] == loop_component)
    iterator = loop_task["parameterIterator"]
    assert iterator["items"]["inputParameter"].endswith("shard-groups-Output")
    assert caption_task["inputs"]["parameters"]["job"]["componentInputParameter"] == iterator["itemInput"]
    collected = spec["components"][loop_component]["dag"]["outputs"]["parameters"]
    [(output_name, output)] = collected.items()
    assert output["valueFromParameter"]["producerSubtask"] == "caption-shard-group"
    _, merge = everything["merge-captions"]
    source = merge["inputs"]["parameters"]["groups"]["taskOutputParameter"]
    assert source["outputParameterKey"] == output_name
    assert everything[source["producerTask"]][1]["componentRef"]["name"] == loop_component


def test_caching_and_retries_follow_the_policy() -> None:
    spec, platform = load("sharegpt4v")
    everything = tasks(spec)
    cached = {n for n, (_, t) in everything.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert {"synthetic-world", "train-captioner", "caption-shard-group", "merge-captions", "pretrain", "sft",
            "evaluate"} <= cached
    assert not cached & {"seed-captions", "ingest", "start-run", "finish-run", "promote", "deploy",
                         "export-model-repository"}
    retried = {n for n, (_, t) in everything.items() if t.get("retryPolicy", {}).get("maxRetryCount")}
    assert {"seed-captions", "train-captioner", "caption-shard-group", "pretrain", "sft", "deploy"} <= retried
    assert everything["seed-captions"][1]["retryPolicy"]["backoffFactor"] == 2
    teacher = platform[executor(spec, everything["seed-captions"][1])]["secretAsEnv"]
    assert {"secretName": TEACHER_SECRET} .items() <= next(s for s in teacher if s["secretName"] == TEACHER_SECRET).items()


def test_pipeline_run_is_tracked_by_an_exit_handler_and_gated_on_the_score() -> None:
    spec, _ = load("sharegpt4v")
    everything = tasks(spec)
    finish = spec["root"]["dag"]["tasks"]["finish-run"]
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert finish["inputs"]["parameters"]["status"]["taskFinalStatus"]["producerTask"] == "exit-handler-1"
    assert everything["start-run"][1]["inputs"]["parameters"]["kfp_run_id"]["runtimeValue"]["constant"] == \
        "{{$.pipeline_job_uuid}}"
    condition_component, _ = everything["promote"]
    gate = next(t for _, t in everything.values() if t["componentRef"]["name"] == condition_component)
    condition = gate["triggerPolicy"]["condition"]
    assert "champion-score-Output" in condition and ">=" in condition and "champion_threshold" in condition
    assert everything["champion-score"][1]["inputs"]["parameters"]["results"]["taskOutputParameter"] == {
        "producerTask": "evaluate", "outputParameterKey": "results"}
    assert everything["deploy"][0] == condition_component and everything["export-model-repository"][0] == condition_component
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"output_root", "source_uri", "teacher_endpoint", "teacher_model", "profile", "overrides", "train_gpus",
            "caption_gpus", "eval_gpus", "gpu_product", "shard_groups", "champion_threshold"} <= set(params)


def test_no_secret_value_reaches_the_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {"AWS_ACCESS_KEY_ID": "FAKEACCESSKEY0123", "AWS_SECRET_ACCESS_KEY": "fake-secret-key-6f1d2",
            "OPENAI_API_KEY": "sk-fake-teacher-key-93ab", "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-71",
            "MLFLOW_TRACKING_URI": "http://user:fake-uri-password-55@mlflow:5000"}
    for key, value in fake.items():
        monkeypatch.setenv(key, value)
    texts = [p.read_text() for p in runner.compile_all(tmp_path).values()]
    texts += [p.read_text() for p in runner.COMPILED_DIR.glob("*.yaml")]
    for text in texts:
        for value in fake.values():
            assert value not in text
        assert "fake-uri-password" not in text

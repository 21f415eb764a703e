"""The multi-node TrainJob fits Kubeflow Trainer's CRD and asks for what the recipe needs."""

from __future__ import annotations

import json

import jsonschema
import pytest

from sharegpt4v.cluster import GPU_RESOURCE, build_trainjob
from sharegpt4v.config import load_recipe
from tests.crds import validate


def _job(runtime: str = "torch-distributed", **kw) -> dict:
    recipe = load_recipe("a100-7b", kw.pop("overrides", []))
    return build_trainjob(
        "pretrain", recipe, name="sharegpt4v-pretrain", image="registry.example/sharegpt4v-train:0.1.0",
        data="s3://sharegpt4v/data/pt-images", captions="s3://sharegpt4v/captions/sharegpt4v-pt",
        init="s3://sharegpt4v/models/captioner", out="s3://sharegpt4v/checkpoints/pretrain", runtime=runtime,
        namespace="sharegpt4v", overrides=kw.pop("cli_overrides", ()), **kw,
    )


@pytest.mark.parametrize("runtime", ["torch-distributed", "deepspeed-distributed"])
def test_trainjob_validates_against_the_crd(runtime: str) -> None:
    job = _job(runtime)
    validate(job)
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == runtime
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
    assert trainer["resourcesPerNode"]["limits"][GPU_RESOURCE] == "8"
    assert "sharegpt4v.training.run" in trainer["command"]
    args = trainer["command"]
    assert args[args.index("--stage") + 1] == "pretrain" and args[args.index("--profile") + 1] == "a100-7b"
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
        "spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"][0]["key"] == GPU_RESOURCE
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/dev/shm"


def test_credentials_come_from_secrets_only() -> None:
    job = _job()
    env = {e["name"]: e for e in job["spec"]["trainer"]["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["key"] == key
    assert "secret" not in json.dumps(job).lower().replace("secretkeyref", "").replace("aws_secret_access_key", "")


def test_node_count_follows_the_recipe_and_overrides_travel() -> None:
    four = ["compute.num_nodes=4", "captioner.micro_batch_size=4", "sft.micro_batch_size=4"]
    job = _job(overrides=four, cli_overrides=[*four, "pretrain.max_steps=10"])
    validate(job)
    assert job["spec"]["trainer"]["numNodes"] == 4
    assert job["spec"]["trainer"]["command"][-2:] == ["sft.micro_batch_size=4", "pretrain.max_steps=10"]


def test_invalid_objects_are_caught_by_the_schema() -> None:
    job = _job()
    job["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(job)
    del job["spec"]["runtimeRef"]
    with pytest.raises(jsonschema.ValidationError):
        validate(job)


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(ValueError, match="torch-distributed"):
        _job("mpi-magic")

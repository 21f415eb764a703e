"""The multi-node TrainJob fits Kubeflow Trainer's CRD and asks for what the recipe needs."""

from __future__ import annotations

import json

import jsonschema
import pytest

from sharegpt4v import cluster
from sharegpt4v.cluster import (
    GPU_RESOURCE,
    build_inference_service,
    build_kserve_service_account,
    build_serving_runtime,
    build_trainjob,
    build_vllm_serving_runtime,
    kserve_s3_annotations,
)
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


def test_platform_runtime_is_a_namespaced_training_runtime() -> None:
    job = _job(cluster.DEEPSPEED_RUNTIME)
    validate(job)
    assert job["spec"]["runtimeRef"]["kind"] == "TrainingRuntime"
    assert job["spec"]["trainer"]["command"][:3] == ["torchrun", "-m", "sharegpt4v.training.run"]
    assert _job("deepspeed-distributed")["spec"]["runtimeRef"]["kind"] == "ClusterTrainingRuntime"


def test_inference_service_fits_the_kserve_crd() -> None:
    isvc = build_inference_service("sharegpt4v-chat", "s3://sharegpt4v/serving/chat", gpus=2, min_replicas=1,
                                   max_replicas=3, memory="80Gi")
    validate(isvc)
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["protocolVersion"] == "v2"
    assert model["runtime"] == cluster.TRITON_RUNTIME and model["storageUri"] == "s3://sharegpt4v/serving/chat"
    assert model["resources"]["limits"] == {"memory": "80Gi", GPU_RESOURCE: "2"}
    assert model["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": cluster.TRITON_HTTP_PORT}
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 3)
    assert predictor["serviceAccountName"] == cluster.KSERVE_SERVICE_ACCOUNT
    assert predictor["nodeSelector"] == {cluster.GPU_PRODUCT_LABEL: cluster.A100_PRODUCT}
    assert predictor["securityContext"]["runAsNonRoot"] is True
    cpu = build_inference_service("x", "s3://b/p", gpus=0, namespace=None)
    validate(cpu)
    assert "nodeSelector" not in cpu["spec"]["predictor"] and "namespace" not in cpu["metadata"]
    assert GPU_RESOURCE not in cpu["spec"]["predictor"]["model"]["resources"]["requests"]


@pytest.mark.parametrize("kw", [dict(storage_uri="/local/repo"), dict(max_replicas=0), dict(min_replicas=3),
                                dict(gpus=-1)])
def test_inference_service_refuses_nonsense(kw: dict) -> None:
    args = {"storage_uri": "s3://b/p", **kw}
    with pytest.raises(ValueError):
        build_inference_service("x", args.pop("storage_uri"), **args)


def test_serving_runtime_and_service_account() -> None:
    runtime = build_serving_runtime()
    validate(runtime)
    container = runtime["spec"]["containers"][0]
    assert container["image"] == cluster.SERVING_IMAGE and not container["image"].endswith(":latest")
    assert container["args"][:4] == ["tritonserver", "--model-store=/mnt/models", "--http-port=8080", "--grpc-port=9000"]
    assert runtime["spec"]["supportedModelFormats"][0]["name"] == "triton" and "v2" in runtime["spec"]["protocolVersions"]
    assert container["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["runAsUser"] == 1000
    sa = build_kserve_service_account()
    assert sa["secrets"] == [{"name": cluster.S3_SECRET}] and sa["metadata"]["namespace"] == cluster.NAMESPACE
    assert "data" not in sa and "stringData" not in sa


def test_kserve_s3_annotations() -> None:
    annotations = kserve_s3_annotations()
    assert annotations["serving.kserve.io/s3-endpoint"] == cluster.MINIO_ENDPOINT
    assert annotations["serving.kserve.io/s3-usehttps"] == "0"
    assert kserve_s3_annotations("s3.amazonaws.com", use_https=True, virtual_bucket=True)[
        "serving.kserve.io/s3-usevirtualbucket"] == "1"
    with pytest.raises(ValueError, match="without a scheme"):
        kserve_s3_annotations("http://minio:9000")


def test_vllm_engine_serves_a_checkpoint_with_the_local_servers_command_line() -> None:
    from sharegpt4v.serving.vllm_server import server_args

    runtime = build_vllm_serving_runtime(dtype="bfloat16", max_model_len=4096)
    validate(runtime)
    container = runtime["spec"]["containers"][0]
    assert container["image"] == cluster.TRAIN_IMAGE and container["command"] == ["/opt/engine/bin/python"]
    assert container["args"] == server_args("/mnt/models", "{{.Name}}", cluster.TRITON_HTTP_PORT, "bfloat16", 4096)
    assert "--dtype" in container["args"] and "auto" not in container["args"]  # never vLLM's guess
    assert container["securityContext"]["runAsNonRoot"] is True
    isvc = build_inference_service("sharegpt4v-chat", "s3://sharegpt4v/checkpoints/chat", engine="vllm")
    validate(isvc)
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == cluster.VLLM_RUNTIME and model["modelFormat"] == {"name": cluster.VLLM_MODEL_FORMAT}
    assert model["readinessProbe"]["httpGet"] == {"path": "/health", "port": cluster.TRITON_HTTP_PORT}
    assert model["storageUri"] == "s3://sharegpt4v/checkpoints/chat"
    assert runtime["spec"]["supportedModelFormats"][0]["name"] == model["modelFormat"]["name"]

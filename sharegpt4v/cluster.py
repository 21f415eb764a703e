"""Cluster conventions in one place, and the Kubeflow Trainer `TrainJob` for multi-node runs.

The names here (Secrets, the GPU resource, the A100 node label and taint) are what the
manifests, the KFP components and the TrainJob generator agree on. This module builds plain
dicts; it never talks to a Kubernetes API server.
"""

from __future__ import annotations

from typing import Any, Literal

from sharegpt4v.config import RecipeConfig

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
A100_PRODUCT = "NVIDIA-A100-SXM4-80GB"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}

S3_SECRET = "sharegpt4v-s3"  # keys: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
MLFLOW_SECRET = "sharegpt4v-mlflow"  # keys: MLFLOW_TRACKING_URI (+ optional basic-auth user/password)
TEACHER_SECRET = "sharegpt4v-teacher"  # keys: OPENAI_BASE_URL, OPENAI_API_KEY

SECRET_ENV: dict[str, list[tuple[str, bool]]] = {  # secret -> [(key, optional)]
    S3_SECRET: [("AWS_ENDPOINT_URL", False), ("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False)],
    MLFLOW_SECRET: [("MLFLOW_TRACKING_URI", False), ("MLFLOW_TRACKING_USERNAME", True),
                    ("MLFLOW_TRACKING_PASSWORD", True)],
}

TRAINER_API = "trainer.kubeflow.org/v1alpha1"
# runtime -> its kind: Kubeflow Trainer's own cluster runtimes, and the platform's namespaced runtime
# (manifests/base/trainer/trainingruntime.yaml: torchrun launcher, DeepSpeed inside, non-root, A100 nodes).
DEEPSPEED_RUNTIME = "sharegpt4v-deepspeed"
RUNTIME_KINDS = {"torch-distributed": "ClusterTrainingRuntime", "deepspeed-distributed": "ClusterTrainingRuntime",
                 DEEPSPEED_RUNTIME: "TrainingRuntime"}
RUNTIMES = tuple(RUNTIME_KINDS)
_TRAINER_CONTAINER = "node"  # the container name the Trainer runtimes give the training process


def secret_env(secrets: tuple[str, ...] = (S3_SECRET, MLFLOW_SECRET)) -> list[dict[str, Any]]:
    """Env entries that read credentials from Kubernetes Secrets (never values)."""
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, **({"optional": True} if opt else {})}}}
        for secret in secrets
        for key, opt in SECRET_ENV[secret]
    ]


def _merge_env(base: list[dict[str, Any]], extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`base` with each entry of `extra` replacing the one of the same name (else appended), in order."""
    merged = {e["name"]: e for e in base}
    merged.update({e["name"]: e for e in extra})
    return list(merged.values())


def training_args(stage: str, recipe: RecipeConfig, data: str | list[str] | tuple[str, ...], out: str, init: str | None,
                  captions: str | None, overrides: list[str] | tuple[str, ...], split: str | None = None) -> list[str]:
    """`python -m sharegpt4v.training.run` arguments. `split`: None leaves the run's default (train), "" all shards."""
    args = ["--stage", stage, "--profile", recipe.profile]
    for uri in [data] if isinstance(data, str) else data:
        args += ["--data", uri]
    args += ["--out", out]
    if init:
        args += ["--init", init]
    if captions:
        args += ["--captions", captions]
    if split is not None:
        args += ["--split", split]
    return args + list(overrides)


def build_trainjob(
    stage: str,
    recipe: RecipeConfig,
    *,
    name: str,
    image: str,
    data: str | list[str] | tuple[str, ...],
    out: str,
    init: str | None = None,
    captions: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    runtime: str = "torch-distributed",
    namespace: str | None = None,
    gpu_product: str = A100_PRODUCT,
    cpu_per_node: str = "96",
    memory_per_node: str = "900Gi",
    shm_size: str = "128Gi",
    split: str | None = None,
    env: list[dict[str, Any]] | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A TrainJob running `stage` on `compute.num_nodes` x `compute.gpus_per_node` GPUs.

    `torch-distributed` and `sharegpt4v-deepspeed` (the platform's namespaced TrainingRuntime) launch
    the trainer with torchrun (the runtime sets its PET_* rendezvous variables);
    `deepspeed-distributed` launches it with mpirun over the runtime's MPI hostfile.
    `env` entries are added to the trainer's (one of the same name replaces it); `labels` and
    `annotations` go to the TrainJob's metadata.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    compute = recipe.compute
    args = training_args(stage, recipe, data, out, init, captions, overrides, split)
    if runtime != "deepspeed-distributed":
        command = ["torchrun", "-m", "sharegpt4v.training.run", *args]
    else:
        command = ["mpirun", "--hostfile", "/etc/mpi/hostfile", "-x", "PATH", "-x", "LD_LIBRARY_PATH",
                   "python", "-m", "sharegpt4v.training.run", *args]
    gpus = str(compute.gpus_per_node)
    pod_patch = {
        "nodeSelector": {GPU_PRODUCT_LABEL: gpu_product},
        "tolerations": [GPU_TOLERATION],
        # NCCL and the data loaders need far more shared memory than a container's default 64 MB.
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}],
        "containers": [{"name": _TRAINER_CONTAINER, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
    }
    return {
        "apiVersion": TRAINER_API,
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            **({"namespace": namespace} if namespace else {}),
            "labels": {"app.kubernetes.io/part-of": "sharegpt4v", "sharegpt4v/stage": stage, **(labels or {})},
            **({"annotations": dict(annotations)} if annotations else {}),
        },
        "spec": {
            "runtimeRef": {"name": runtime, "kind": RUNTIME_KINDS[runtime], "apiGroup": "trainer.kubeflow.org"},
            "trainer": {
                "image": image,
                "command": command,
                "numNodes": compute.num_nodes,
                "numProcPerNode": compute.gpus_per_node,
                "resourcesPerNode": {
                    "requests": {"cpu": cpu_per_node, "memory": memory_per_node, GPU_RESOURCE: gpus},
                    "limits": {GPU_RESOURCE: gpus, "memory": memory_per_node},
                },
                "env": _merge_env([
                    *secret_env(),
                    {"name": "MLFLOW_EXPERIMENT_NAME", "value": "sharegpt4v"},
                    {"name": "NCCL_DEBUG", "value": "WARN"},
                ], env or []),
            },
            "runtimePatches": [
                {
                    "manager": "sharegpt4v",
                    "trainingRuntimeSpec": {
                        "template": {"spec": {"replicatedJobs": [
                            {"name": _TRAINER_CONTAINER, "template": {"spec": {"template": {"spec": pod_patch}}}}
                        ]}}
                    },
                }
            ],
        },
    }


# Platform namespace, images, in-cluster endpoints ------------------------------------------

NAMESPACE = "sharegpt4v"
PART_OF = {"app.kubernetes.io/part-of": "sharegpt4v"}
IMAGE_TAG = "0.1.0"  # = the project version in pyproject.toml (checked by a test)
# Repository-less names: an overlay's `images:` (kustomize) or the deploy step's `image=` points them
# at the registry the images were pushed to (images/README.md).
TRAIN_IMAGE = f"sharegpt4v/train:{IMAGE_TAG}"
SERVING_IMAGE = f"sharegpt4v/serving:{IMAGE_TAG}"
MLFLOW_IMAGE = f"sharegpt4v/mlflow:{IMAGE_TAG}"

MINIO_SERVICE, MINIO_PORT = "minio", 9000
MINIO_ENDPOINT = f"{MINIO_SERVICE}.{NAMESPACE}.svc.cluster.local:{MINIO_PORT}"  # host:port, no scheme
MLFLOW_SERVICE, MLFLOW_PORT = "mlflow", 5000
MLFLOW_TRACKING_URI = f"http://{MLFLOW_SERVICE}.{NAMESPACE}.svc.cluster.local:{MLFLOW_PORT}"
S3_REGION = "us-east-1"
BUCKET = "sharegpt4v"  # data, caption sets, checkpoints, model repositories
MLFLOW_BUCKET = "sharegpt4v-mlflow"  # MLflow artifacts (proxied by the MLflow server)
PIPELINES_BUCKET = "sharegpt4v-pipelines"  # KFP pipeline root
PIPELINE_ROOT = f"s3://{PIPELINES_BUCKET}/v2/artifacts"

PIPELINE_RUNNER_SA = "sharegpt4v-pipeline-runner"  # runs the KFP pipelines; may create InferenceServices/TrainJobs


# KServe: Triton ServingRuntime, the S3 ServiceAccount, InferenceServices ------------------

KSERVE_API = "serving.kserve.io/v1beta1"
KSERVE_RUNTIME_API = "serving.kserve.io/v1alpha1"
TRITON_RUNTIME = "sharegpt4v-triton"
KSERVE_SERVICE_ACCOUNT = "sharegpt4v-serving"  # its Secret is S3_SECRET, annotated for KServe
TRITON_HTTP_PORT, TRITON_GRPC_PORT, TRITON_METRICS_PORT = 8080, 9000, 8002
SERVING_UID = 1000  # the serving image's non-root user (images/serving/Dockerfile)
SERVED_MODELS = ("captioner", "chat")


def model_storage_uri(model: str, bucket: str = BUCKET) -> str:
    """Where the exporter puts the Triton repository that serves `model` (KServe's storageUri)."""
    return f"s3://{bucket}/serving/{model}"


def inference_service_name(model: str) -> str:
    return f"sharegpt4v-{model}"


def kserve_s3_annotations(endpoint: str = MINIO_ENDPOINT, *, use_https: bool = False, region: str = S3_REGION,
                          virtual_bucket: bool = False) -> dict[str, str]:
    """The annotations KServe reads from a ServiceAccount's Secret to reach an S3 `storageUri`.

    `endpoint` is host:port without a scheme; MinIO wants path-style requests (`virtual_bucket=False`).
    """
    if "://" in endpoint:
        raise ValueError(f"endpoint {endpoint!r}: host:port without a scheme (set use_https instead)")
    return {
        "serving.kserve.io/s3-endpoint": endpoint,
        "serving.kserve.io/s3-usehttps": "1" if use_https else "0",
        "serving.kserve.io/s3-region": region,
        "serving.kserve.io/s3-usevirtualbucket": "1" if virtual_bucket else "0",
        "serving.kserve.io/s3-useanoncredential": "false",
    }


def build_kserve_service_account(name: str = KSERVE_SERVICE_ACCOUNT, *, secret: str = S3_SECRET,
                                 namespace: str | None = NAMESPACE) -> dict[str, Any]:
    """The ServiceAccount an InferenceService runs as: KServe takes S3 credentials from its Secret.

    The Secret itself (keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, annotations from
    `kserve_s3_annotations()`) is generated from a local env file, never from values in the repo.
    """
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, **({"namespace": namespace} if namespace else {}), "labels": dict(PART_OF)},
        "secrets": [{"name": secret}],
        "automountServiceAccountToken": False,
    }


def build_serving_runtime(name: str = TRITON_RUNTIME, *, image: str = SERVING_IMAGE, namespace: str | None = NAMESPACE,
                          cpu: str = "1", memory: str = "4Gi") -> dict[str, Any]:
    """A namespaced Triton ServingRuntime (protocol v2, model format `triton`) on the project's serving image.

    The image is NVIDIA's Triton plus the project's inference dependencies, which the repositories'
    Python-backend `model.py` files import. Resources here are defaults; each InferenceService sets its own.
    """
    return {
        "apiVersion": KSERVE_RUNTIME_API,
        "kind": "ServingRuntime",
        "metadata": {"name": name, **({"namespace": namespace} if namespace else {}), "labels": dict(PART_OF)},
        "spec": {
            "annotations": {"prometheus.kserve.io/port": str(TRITON_METRICS_PORT), "prometheus.kserve.io/path": "/metrics"},
            "supportedModelFormats": [{"name": "triton", "version": "2", "autoSelect": True, "priority": 1}],
            "protocolVersions": ["v2", "grpc-v2"],
            "multiModel": False,
            "containers": [{
                "name": "kserve-container",
                "image": image,
                "args": ["tritonserver", "--model-store=/mnt/models", f"--http-port={TRITON_HTTP_PORT}",
                         f"--grpc-port={TRITON_GRPC_PORT}", "--allow-http=true", "--allow-grpc=true"],
                "ports": [{"containerPort": TRITON_HTTP_PORT, "name": "http1", "protocol": "TCP"}],
                "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
                "securityContext": {
                    "runAsNonRoot": True, "runAsUser": SERVING_UID, "runAsGroup": SERVING_UID,
                    "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                },
            }],
        },
    }


VLLM_RUNTIME = "sharegpt4v-vllm"
VLLM_MODEL_FORMAT = "llava-hf"


def build_vllm_serving_runtime(name: str = VLLM_RUNTIME, *, image: str = TRAIN_IMAGE, dtype: str = "bfloat16",
                               max_model_len: int = 4096, namespace: str | None = NAMESPACE, cpu: str = "8",
                               memory: str = "64Gi") -> dict[str, Any]:
    """A namespaced ServingRuntime for `serving.engine=vllm`: vLLM's OpenAI server (continuous batching,
    streaming) on a llava-hf checkpoint at /mnt/models, from the train image's engine environment.

    Triton's Python backend cannot host vLLM here (serving/vllm_server.py says why, measured); the
    command line is `vllm_server.server_args`, the one the local server runs. `dtype` must be the
    checkpoint's own: vLLM's `auto` would cast an fp32 checkpoint.
    """
    from sharegpt4v.serving.vllm_server import server_args

    args = server_args("/mnt/models", "{{.Name}}", TRITON_HTTP_PORT, dtype, max_model_len)
    return {
        "apiVersion": KSERVE_RUNTIME_API,
        "kind": "ServingRuntime",
        "metadata": {"name": name, **({"namespace": namespace} if namespace else {}), "labels": dict(PART_OF)},
        "spec": {
            "annotations": {"prometheus.kserve.io/port": str(TRITON_HTTP_PORT), "prometheus.kserve.io/path": "/metrics"},
            "supportedModelFormats": [{"name": VLLM_MODEL_FORMAT, "version": "1", "autoSelect": True, "priority": 1}],
            "protocolVersions": ["v1"],
            "multiModel": False,
            "containers": [{
                "name": "kserve-container",
                "image": image,
                "command": ["/opt/engine/bin/python"],
                "args": args,
                "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "VLLM_NO_USAGE_STATS", "value": "1"}],
                "ports": [{"containerPort": TRITON_HTTP_PORT, "name": "http1", "protocol": "TCP"}],
                "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
                "securityContext": {
                    "runAsNonRoot": True, "runAsUser": SERVING_UID, "runAsGroup": SERVING_UID,
                    "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                },
            }],
        },
    }


# The OpenAI API in front of Triton (sharegpt4v.serving.openai_frontend): each Triton InferenceService's KServe
# transformer. KServe routes the service's traffic to it and appends `--model_name <service> --predictor_host
# <service>-predictor.<namespace> --http_port 8080` to its arguments (`serve openai` takes them).
OPENAI_PORT = 8080
OPENAI_FETCH_ALLOW = (f"s3://{BUCKET}/uploads/",)  # image URLs the API may read (clients upload images here)
TRITON_MODELS = {"captioner": "captioner", "chat": "chat"}  # served model -> its Triton model


def build_openai_transformer(name: str, model: str, *, image: str = TRAIN_IMAGE,
                             fetch_allow: tuple[str, ...] = OPENAI_FETCH_ALLOW, min_replicas: int = 1,
                             max_replicas: int = 1, cpu: str = "1", memory: str = "1Gi") -> dict[str, Any]:
    """The `spec.transformer` of InferenceService `name`: `sharegpt4v serve openai` (the train image has the
    project with FastAPI/uvicorn/aiohttp) serving OpenAI model id `name` from the predictor's Triton `model`;
    ready once that Triton is (`/ready`). It reads allow-listed s3:// images with the platform's S3 Secret."""
    args = ["serve", "openai", "--host", "0.0.0.0", "--port", str(OPENAI_PORT), "--model", f"{name}={TRITON_MODELS[model]}"]
    for prefix in fetch_allow:
        args += ["--fetch-allow", prefix]
    return {
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "securityContext": {"runAsNonRoot": True, "runAsUser": SERVING_UID, "runAsGroup": SERVING_UID},
        "containers": [{
            "name": "kserve-container",
            "image": image,
            "command": ["sharegpt4v"],
            "args": args,
            "env": secret_env((S3_SECRET,)),
            "ports": [{"containerPort": OPENAI_PORT, "name": "http1", "protocol": "TCP"}],
            "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
            "readinessProbe": {"httpGet": {"path": "/ready", "port": OPENAI_PORT}, "periodSeconds": 10,
                               "failureThreshold": 3},
            "livenessProbe": {"httpGet": {"path": "/health", "port": OPENAI_PORT}, "periodSeconds": 30,
                              "failureThreshold": 5},
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }],
    }


def build_inference_service(
    name: str,
    storage_uri: str,
    *,
    engine: Literal["transformers", "vllm"] = "transformers",
    namespace: str | None = NAMESPACE,
    service_account: str = KSERVE_SERVICE_ACCOUNT,
    gpus: int = 1,
    min_replicas: int = 1,
    max_replicas: int = 1,
    runtime: str | None = None,
    cpu: str = "8",
    memory: str = "64Gi",
    shm_size: str = "16Gi",
    gpu_product: str | None = A100_PRODUCT,
    labels: dict[str, str] | None = None,
    openai_model: str | None = None,
    transformer_image: str = TRAIN_IMAGE,
) -> dict[str, Any]:
    """A KServe InferenceService serving the Triton repository at `storage_uri` (an `s3://` prefix), or,
    with `engine="vllm"`, the llava-hf checkpoint at `storage_uri` on the vLLM runtime (OpenAI protocol).

    `openai_model` (captioner or chat; Triton only) adds the OpenAI API as the service's transformer
    (`build_openai_transformer`, on `transformer_image`): the service's URL then answers `/v1/...`
    and passes `/v2/...` through to Triton.

    KServe's storage initializer downloads the repository to /mnt/models with the credentials of
    `service_account`'s Secret; the `runtime` ServingRuntime starts Triton on it (protocol v2). With
    `gpus` > 0 the predictor asks for that many GPUs on a `gpu_product` node; with 0 it runs on CPU
    (dev clusters, tiny models: export the repository with KIND_CPU). Ready when Triton's
    /v2/health/ready answers, that is once every model in the repository has loaded.
    """
    if not storage_uri.startswith("s3://"):
        raise ValueError(f"storage_uri {storage_uri!r}: an s3:// prefix holding a Triton model repository")
    if gpus < 0 or min_replicas < 0 or max_replicas < max(min_replicas, 1):
        raise ValueError(f"gpus={gpus}, min_replicas={min_replicas}, max_replicas={max_replicas}: "
                         "need gpus >= 0 and max_replicas >= max(min_replicas, 1)")
    requests: dict[str, str] = {"cpu": cpu, "memory": memory}
    limits: dict[str, str] = {"memory": memory}
    if gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpus)
    vllm = engine == "vllm"
    runtime = runtime or (VLLM_RUNTIME if vllm else TRITON_RUNTIME)
    probe_get = {"path": "/health" if vllm else "/v2/health/ready", "port": TRITON_HTTP_PORT}
    live_get = {"path": "/health" if vllm else "/v2/health/live", "port": TRITON_HTTP_PORT}
    predictor: dict[str, Any] = {
        "serviceAccountName": service_account,
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "securityContext": {"runAsNonRoot": True, "runAsUser": SERVING_UID, "runAsGroup": SERVING_UID,
                            "fsGroup": SERVING_UID},
        "model": {
            "modelFormat": {"name": VLLM_MODEL_FORMAT if vllm else "triton"},
            "protocolVersion": "v1" if vllm else "v2",
            "runtime": runtime,
            "storageUri": storage_uri,
            "resources": {"requests": requests, "limits": limits},
            # Loading a 7B checkpoint takes minutes: the startup probe allows 30 min, then readiness takes over.
            "startupProbe": {"httpGet": dict(probe_get), "periodSeconds": 10, "failureThreshold": 180},
            "readinessProbe": {"httpGet": dict(probe_get), "periodSeconds": 10, "failureThreshold": 3},
            "livenessProbe": {"httpGet": live_get, "periodSeconds": 30, "failureThreshold": 5},
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        },
        # Triton's Python backend and vLLM's workers pass tensors through shared memory: 64 MB is too little.
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}],
    }
    if gpus and gpu_product:
        predictor["nodeSelector"] = {GPU_PRODUCT_LABEL: gpu_product}
        predictor["tolerations"] = [GPU_TOLERATION]
    spec: dict[str, Any] = {"predictor": predictor}
    if openai_model is not None:
        if vllm:
            raise ValueError("openai_model: the vLLM runtime serves the OpenAI API itself; no transformer")
        if openai_model not in TRITON_MODELS:
            raise ValueError(f"openai_model {openai_model!r}: choose one of {', '.join(TRITON_MODELS)}")
        spec["transformer"] = build_openai_transformer(name, openai_model, image=transformer_image,
                                                       min_replicas=min_replicas, max_replicas=max_replicas)
    return {
        "apiVersion": KSERVE_API,
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            **({"namespace": namespace} if namespace else {}),
            "labels": {**PART_OF, "app.kubernetes.io/component": "serving", **(labels or {})},
        },
        "spec": spec,
    }

"""Cluster conventions in one place, and the Kubeflow Trainer `TrainJob` for multi-node runs.

The names here (Secrets, the GPU resource, the A100 node label and taint) are what the
manifests, the KFP components and the TrainJob generator agree on. This module builds plain
dicts; it never talks to a Kubernetes API server.
"""

from __future__ import annotations

from typing import Any

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
RUNTIMES = ("torch-distributed", "deepspeed-distributed")
_TRAINER_CONTAINER = "node"  # the container name the Trainer runtimes give the training process


def secret_env(secrets: tuple[str, ...] = (S3_SECRET, MLFLOW_SECRET)) -> list[dict[str, Any]]:
    """Env entries that read credentials from Kubernetes Secrets (never values)."""
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, **({"optional": True} if opt else {})}}}
        for secret in secrets
        for key, opt in SECRET_ENV[secret]
    ]


def training_args(stage: str, recipe: RecipeConfig, data: str, out: str, init: str | None, captions: str | None,
                  overrides: list[str] | tuple[str, ...]) -> list[str]:
    args = ["--stage", stage, "--profile", recipe.profile, "--data", data, "--out", out]
    if init:
        args += ["--init", init]
    if captions:
        args += ["--captions", captions]
    return args + list(overrides)


def build_trainjob(
    stage: str,
    recipe: RecipeConfig,
    *,
    name: str,
    image: str,
    data: str,
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
) -> dict[str, Any]:
    """A TrainJob running `stage` on `compute.num_nodes` x `compute.gpus_per_node` GPUs.

    `torch-distributed` launches the trainer with torchrun (the runtime sets its PET_* rendezvous
    variables); `deepspeed-distributed` launches it with mpirun over the runtime's MPI hostfile.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    compute = recipe.compute
    args = training_args(stage, recipe, data, out, init, captions, overrides)
    if runtime == "torch-distributed":
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
            "labels": {"app.kubernetes.io/part-of": "sharegpt4v", "sharegpt4v/stage": stage},
        },
        "spec": {
            "runtimeRef": {"name": runtime, "kind": "ClusterTrainingRuntime", "apiGroup": "trainer.kubeflow.org"},
            "trainer": {
                "image": image,
                "command": command,
                "numNodes": compute.num_nodes,
                "numProcPerNode": compute.gpus_per_node,
                "resourcesPerNode": {
                    "requests": {"cpu": cpu_per_node, "memory": memory_per_node, GPU_RESOURCE: gpus},
                    "limits": {GPU_RESOURCE: gpus, "memory": memory_per_node},
                },
                "env": [
                    *secret_env(),
                    {"name": "MLFLOW_EXPERIMENT_NAME", "value": "sharegpt4v"},
                    {"name": "NCCL_DEBUG", "value": "WARN"},
                ],
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

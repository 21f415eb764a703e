"""Where pipeline tasks run and what they may use: set here, and only here.

Pipelines call `gpu_task`, `cpu_task` and `light_task` on every task they create. The names (GPU
resource, node label, toleration, Secrets) come from `sharegpt4v.cluster`, the one place the
manifests, the TrainJob generator and these components agree on them.

- GPU tasks request `nvidia.com/gpu` (count from a pipeline parameter), CPU and memory; they
  select A100 nodes through `nvidia.com/gpu.product` (value from a pipeline parameter) and
  tolerate the GPU taint; `/dev/shm` is a memory-backed emptyDir (NCCL and data loaders).
- Train tasks (`train_task`) take their GPU count, CPU and memory from the start task's outputs
  (`train_gpus`, `train_cpu`, `train_memory`; `start_run` computes them from the recipe with the
  sizes below, passed in by `train_sizes`): "train" and the pipeline's GPU count for a one-node
  recipe, which trains in the task's pod; no GPU and "follow" for a multi-node one, whose pod only
  creates and follows a TrainJob that has GPUs of its own.
- Every task reads S3 and MLflow credentials from Kubernetes Secrets as env (never values);
  teacher tasks also the teacher Secret. `KFP_RUN_ID` comes from the pod's `pipeline/runid` label
  (the Downward API), so tasks find the pipeline's MLflow run without an input that would defeat
  caching.
- Retries with exponential backoff on the steps that can fail transiently (API calls, node
  preemption, S3); caching only where a step is deterministic in its inputs, whose digests are
  inputs of the task (so the cache key follows the content, not only the URIs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kfp import kubernetes
from kfp.dsl import PipelineTask
from kfp.dsl.pipeline_channel import PipelineChannel

from sharegpt4v.cluster import (
    GPU_RESOURCE,
    GPU_TOLERATION,
    MLFLOW_SECRET,
    S3_SECRET,
    SECRET_ENV,
    TEACHER_SECRET,
    TRAIN_IMAGE,
)
from sharegpt4v.config import TeacherConfig

# The training/captioning image of images/ (torch, DeepSpeed, this project at its pinned versions),
# pinned by the project version; the name is the one the manifests and the TrainJob use.
IMAGE = TRAIN_IMAGE

KFP_RUN_ID_ENV = "KFP_RUN_ID"
KFP_RUN_ID_FIELD = "metadata.labels['pipeline/runid']"
SHM_VOLUME = "dshm"


@dataclass(frozen=True)
class Size:
    cpu: str
    memory: str
    shm: str | None = None  # size of the memory-backed /dev/shm


# Requests per kind of task. Training asks for most of an 8 x A100 80GB node (ZeRO-3 gathers the
# 16-bit weights in host memory at save time); a train task of a multi-node recipe only creates and
# follows its TrainJob (the Kubernetes API, the rank-0 log; ~0.5 GiB resident); captioning and
# evaluation one GPU with room for the image decoding workers.
SIZES = {
    "train": Size(cpu="64", memory="800Gi", shm="128Gi"),
    "follow": Size(cpu="1", memory="2Gi"),
    "caption": Size(cpu="12", memory="96Gi", shm="32Gi"),
    "eval": Size(cpu="12", memory="96Gi", shm="32Gi"),
    "cpu": Size(cpu="4", memory="16Gi"),  # world generation, ingest, teacher calls, reports
    "light": Size(cpu="500m", memory="1Gi"),  # bookkeeping: MLflow runs, registry, deploy
}

# (retries, first backoff, factor, max backoff) per kind of failure
RETRY = {
    "gpu": (2, "120s", 2.0, "1800s"),  # preempted nodes, NCCL timeouts, S3 hiccups while saving
    "api": (4, "30s", 2.0, "600s"),  # teacher endpoint, S3, MLflow, Kubernetes API
}

TEACHER_ENV = (TeacherConfig.base_url_env, TeacherConfig.api_key_env)


def _size(task: PipelineTask, size: Size) -> None:
    _requests(task, size.cpu, size.memory)
    _shm(task, size)


def _requests(task: PipelineTask, cpu: Any, memory: Any) -> None:
    """CPU request, memory request = limit: constants or task outputs (PipelineChannels)."""
    task.set_cpu_request(cpu)
    task.set_memory_request(memory)
    task.set_memory_limit(memory)


def _shm(task: PipelineTask, size: Size) -> None:
    if size.shm:
        kubernetes.empty_dir_mount(task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory",
                                   size_limit=size.shm)


def train_sizes() -> dict[str, dict[str, str]]:
    """The start task's `train_size` and `follow_size` inputs: CPU and memory of a train task that trains in
    its pod ("train") and of one that follows its TrainJob ("follow"), from `SIZES`."""
    return {f"{name}_size": {"cpu": SIZES[name].cpu, "memory": SIZES[name].memory} for name in ("train", "follow")}


def with_secrets(task: PipelineTask, teacher: bool = False) -> PipelineTask:
    """S3 and MLflow credentials (and the teacher's) as env from their Secrets; the KFP run id as env."""
    for secret in (S3_SECRET, MLFLOW_SECRET):
        required = {key: key for key, optional in SECRET_ENV[secret] if not optional}
        optional = {key: key for key, opt in SECRET_ENV[secret] if opt}
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=required)
        if optional:
            kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=optional, optional=True)
    if teacher:
        # optional: a task given an explicit endpoint (or the synthetic teacher) runs without the Secret;
        # without it and without a key, the teacher client stops with a one-line cause
        kubernetes.use_secret_as_env(task, secret_name=TEACHER_SECRET, secret_key_to_env={k: k for k in TEACHER_ENV},
                                     optional=True)
    kubernetes.use_field_path_as_env(task, env_name=KFP_RUN_ID_ENV, field_path=KFP_RUN_ID_FIELD)
    return task


_LOCAL = {"on": False}


@contextlib.contextmanager
def local_build() -> Iterator[None]:
    """Pipelines built inside run on this machine (kfp.local): no retries, so a failure stops the run
    at once (locally a failure is a bug, not a preempted node; the compiled YAML keeps its retries)."""
    _LOCAL["on"] = True
    try:
        yield
    finally:
        _LOCAL["on"] = False


def retry(task: PipelineTask, kind: str) -> PipelineTask:
    if _LOCAL["on"]:
        return task
    retries, backoff, factor, max_backoff = RETRY[kind]
    return task.set_retry(num_retries=retries, backoff_duration=backoff, backoff_factor=factor,
                          backoff_max_duration=max_backoff)


def caching(task: PipelineTask, deterministic: bool) -> PipelineTask:
    """On for steps that are deterministic in their inputs (digests included); off for the rest."""
    return task.set_caching_options(enable_caching=deterministic)


def gpu_task(task: PipelineTask, gpus: Any, node_selector: Any, *, size: str, cache: bool,
             display_name: str | None = None, cpu: Any = None, memory: Any = None) -> PipelineTask:
    """A task on A100 nodes: `gpus` (int, pipeline parameter or task output) x nvidia.com/gpu, the node selector
    (a dict or a task output holding {nvidia.com/gpu.product: <product>}), the GPU toleration, CPU/memory (the
    size's, or `cpu`/`memory`: constants or task outputs), the size's /dev/shm, credentials, retries and the
    caching policy."""
    task.set_accelerator_type(GPU_RESOURCE)
    task.set_accelerator_limit(gpus)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration(task, key=GPU_TOLERATION["key"], operator=GPU_TOLERATION["operator"],
                              effect=GPU_TOLERATION["effect"])
    _requests(task, SIZES[size].cpu if cpu is None else cpu, SIZES[size].memory if memory is None else memory)
    _shm(task, SIZES[size])
    # kfp 2.17 wires a task output used only in the resources into an enclosing dsl.If / ParallelFor only when
    # the task registers it (kfp.kubernetes does the same for the node selector)
    task.register_pipeline_channels([value for value in (gpus, cpu, memory) if isinstance(value, PipelineChannel)])
    with_secrets(task)
    retry(task, "gpu")
    caching(task, cache)
    if display_name:
        task.set_display_name(display_name)
    return task


def train_task(task: PipelineTask, start: PipelineTask, *, cache: bool,
               display_name: str | None = None) -> PipelineTask:
    """A train task (train-base, train-captioner, pretrain, sft): a GPU task whose GPU count, CPU and memory
    are the start task's `train_gpus`, `train_cpu` and `train_memory` outputs (no GPU and the "follow" size
    when the recipe is multi-node and the task only follows its TrainJob), on the start task's node selector,
    with the "train" size's /dev/shm."""
    return gpu_task(task, start.outputs["train_gpus"], start.outputs["gpu_node_selector"], size="train",
                    cache=cache, display_name=display_name, cpu=start.outputs["train_cpu"],
                    memory=start.outputs["train_memory"])


def cpu_task(task: PipelineTask, *, cache: bool, size: str = "cpu", teacher: bool = False, retries: bool = True,
             display_name: str | None = None) -> PipelineTask:
    """A CPU task: CPU/memory, credentials (the teacher's when asked), retries, the caching policy."""
    _size(task, SIZES[size])
    with_secrets(task, teacher=teacher)
    if retries:
        retry(task, "api")
    caching(task, cache)
    if display_name:
        task.set_display_name(display_name)
    return task


def light_task(task: PipelineTask, *, display_name: str | None = None) -> PipelineTask:
    """Bookkeeping (MLflow runs, registry, deploy): small, never cached, retried on API errors."""
    return cpu_task(task, cache=False, size="light", display_name=display_name)

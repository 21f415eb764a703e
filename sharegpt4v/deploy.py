"""Serving deployment: the KServe objects for a profile, and creating or patching an InferenceService.

`render_deployment(profile)` returns the objects that the kustomize overlay of the same name holds
(manifests/overlays/<profile>/), built by `sharegpt4v.cluster`; a test renders the overlays and
compares, and `sharegpt4v deploy render --write` regenerates the files, so the pipeline's deploy
step and the manifests cannot drift apart.

`apply_inference_service(obj, dry_run=...)` is what the KFP deploy step calls: it creates the
InferenceService, or merge-patches it when one of that name exists (a new `storageUri` rolls out a
new model version). The `kubernetes` client is imported inside the functions that talk to an API
server, so the rest of the platform does not need it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from sharegpt4v.cluster import (
    NAMESPACE,
    SERVED_MODELS,
    SERVING_IMAGE,
    TRAIN_IMAGE,
    build_inference_service,
    build_kserve_service_account,
    build_serving_runtime,
    build_vllm_serving_runtime,
    inference_service_name,
    model_storage_uri,
)
from sharegpt4v.errors import PlatformError

KSERVE_GROUP, KSERVE_VERSION, ISVC_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class DeployError(PlatformError):
    """The InferenceService could not be created, patched or made ready."""


@dataclass(frozen=True)
class Predictor:
    """What one model's predictor asks for in a profile."""

    gpus: int
    cpu: str
    memory: str
    min_replicas: int
    max_replicas: int
    shm_size: str = "16Gi"


# dev: a small cluster without GPUs (tiny models, repositories exported with KIND_CPU).
# prod: one A100 80GB per replica holds a 7B model in bf16 with room for the KV cache.
PROFILES: dict[str, dict[str, Predictor]] = {
    "dev": {
        "captioner": Predictor(gpus=0, cpu="1", memory="4Gi", min_replicas=1, max_replicas=1, shm_size="1Gi"),
        "chat": Predictor(gpus=0, cpu="1", memory="4Gi", min_replicas=1, max_replicas=1, shm_size="1Gi"),
    },
    "prod": {
        "captioner": Predictor(gpus=1, cpu="8", memory="64Gi", min_replicas=1, max_replicas=4),
        "chat": Predictor(gpus=1, cpu="8", memory="64Gi", min_replicas=2, max_replicas=8),
    },
}


def render_inference_service(model: str, profile: str = "prod", *, storage_uri: str | None = None,
                             namespace: str | None = NAMESPACE, engine: str = "transformers",
                             transformer_image: str = TRAIN_IMAGE) -> dict[str, Any]:
    """The InferenceService of `model` (captioner or chat) in `profile`, serving `storage_uri`
    (default: where the exporter puts that model's repository; with `engine="vllm"`, a checkpoint).
    On Triton its transformer is the OpenAI API (`sharegpt4v serve openai`, on `transformer_image`);
    vLLM's server speaks OpenAI itself."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r}: choose one of {', '.join(PROFILES)}")
    if model not in PROFILES[profile]:
        raise ValueError(f"model {model!r}: choose one of {', '.join(PROFILES[profile])}")
    p = PROFILES[profile][model]
    return build_inference_service(
        inference_service_name(model), storage_uri or model_storage_uri(model), namespace=namespace, gpus=p.gpus,
        min_replicas=p.min_replicas, max_replicas=p.max_replicas, cpu=p.cpu, memory=p.memory, shm_size=p.shm_size,
        labels={"sharegpt4v/model": model}, engine=engine,  # type: ignore[arg-type]
        openai_model=model if engine == "transformers" else None, transformer_image=transformer_image,
    )


def render_deployment(profile: str = "prod", *, models: tuple[str, ...] = SERVED_MODELS,
                      storage_uris: dict[str, str] | None = None, namespace: str | None = NAMESPACE,
                      image: str | None = None, include_shared: bool = True,
                      engine: str = "transformers", transformer_image: str = TRAIN_IMAGE) -> list[dict[str, Any]]:
    """Every serving object of a profile: the ServingRuntime (Triton, or vLLM's OpenAI server with
    `engine="vllm"`) and the S3 ServiceAccount (`include_shared`), then one InferenceService per model
    (on Triton with the OpenAI API as its transformer, on `transformer_image`)."""
    runtime = (build_vllm_serving_runtime(image=image or TRAIN_IMAGE, namespace=namespace) if engine == "vllm"
               else build_serving_runtime(image=image or SERVING_IMAGE, namespace=namespace))
    objects = [runtime, build_kserve_service_account(namespace=namespace)] if include_shared else []
    return objects + [render_inference_service(m, profile, storage_uri=(storage_uris or {}).get(m), namespace=namespace,
                                               engine=engine, transformer_image=transformer_image) for m in models]


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # a shared dict is written twice, never as &anchor/*alias
        return True


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Multi-document YAML, keys in the order the builders wrote them."""
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, default_flow_style=False) for o in objects)


GENERATED_HEADER = "# Generated by `sharegpt4v deploy render --write` from sharegpt4v.cluster / sharegpt4v.deploy: do not edit.\n"


def manifest_files(manifests: Path) -> dict[Path, str]:
    """The YAML files under manifests/ that are generated from the builders, with their content."""
    files = {
        manifests / "base" / "kserve" / "servingruntime.yaml": to_yaml([build_serving_runtime(namespace=None)]),
        manifests / "base" / "kserve" / "servingruntime-vllm.yaml": to_yaml([build_vllm_serving_runtime(namespace=None)]),
        manifests / "base" / "kserve" / "serviceaccount.yaml": to_yaml([build_kserve_service_account(namespace=None)]),
    }
    for profile in PROFILES:
        isvcs = render_deployment(profile, namespace=None, include_shared=False)
        files[manifests / "overlays" / profile / "inferenceservices.yaml"] = to_yaml(isvcs)
    return {path: GENERATED_HEADER + text for path, text in files.items()}


def write_manifests(manifests: Path) -> list[Path]:
    """(Re)write the generated manifests; returns the files whose content changed."""
    changed = []
    for path, text in manifest_files(manifests).items():
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(path)
    return changed


# Kubernetes API --------------------------------------------------------------------------------


def _api_client(kube_client: Any | None) -> Any:
    """`kube_client` (a kubernetes.client.ApiClient) or one from the in-cluster config / kubeconfig."""
    if kube_client is not None:
        return kube_client
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # None: ~/.kube/config
        except (config.ConfigException, OSError) as exc:
            raise DeployError(f"no Kubernetes configuration (in-cluster or kubeconfig): {exc}") from None
    return client.ApiClient()


def _namespace(obj: dict[str, Any]) -> str:
    ns = obj.get("metadata", {}).get("namespace")
    if ns:
        return ns
    if SA_NAMESPACE_FILE.is_file():  # in a pod: its own namespace
        return SA_NAMESPACE_FILE.read_text().strip()
    return NAMESPACE


def apply_inference_service(obj: dict[str, Any], *, dry_run: bool, kube_client: Any | None = None,
                            out: TextIO | None = None) -> str:
    """Create the InferenceService `obj`, or merge-patch it if one of that name exists.

    dry_run: print the object as YAML to `out` (default stdout) and call nothing.
    kube_client: a `kubernetes.client.ApiClient`; default: in-cluster config, else ~/.kube/config.
    Returns "dry-run", "created" or "patched". The object's namespace, else the pod's own, else
    `sharegpt4v`.
    """
    if obj.get("kind") != "InferenceService" or not obj.get("apiVersion", "").startswith(KSERVE_GROUP + "/"):
        raise ValueError(f"not a KServe InferenceService: {obj.get('apiVersion')}/{obj.get('kind')}")
    if dry_run:
        (out or sys.stdout).write(to_yaml([obj]))
        return "dry-run"
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    api = client.CustomObjectsApi(_api_client(kube_client))
    group, version = obj["apiVersion"].split("/")
    name, namespace = obj["metadata"]["name"], _namespace(obj)
    body = {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}
    try:
        try:
            api.get_namespaced_custom_object(group, version, namespace, ISVC_PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            api.create_namespaced_custom_object(group, version, namespace, ISVC_PLURAL, body)
            return "created"
        api.patch_namespaced_custom_object(group, version, namespace, ISVC_PLURAL, name, body)  # merge-patch
        return "patched"
    except ApiException as exc:
        raise DeployError(f"InferenceService {namespace}/{name}: {exc.status} {exc.reason}") from None


def inference_service_status(name: str, namespace: str = NAMESPACE, *, kube_client: Any | None = None) -> dict[str, Any]:
    """(ready, url, message) of an InferenceService, from its status conditions."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    api = client.CustomObjectsApi(_api_client(kube_client))
    try:
        obj = api.get_namespaced_custom_object(KSERVE_GROUP, KSERVE_VERSION, namespace, ISVC_PLURAL, name)
    except ApiException as exc:
        raise DeployError(f"InferenceService {namespace}/{name}: {exc.status} {exc.reason}") from None
    status = obj.get("status") or {}
    ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), {})
    return {"ready": ready.get("status") == "True", "url": status.get("url"),
            "message": ready.get("message") or ready.get("reason") or ""}


def wait_ready(name: str, namespace: str = NAMESPACE, *, timeout_s: float = 1800.0, poll_s: float = 10.0,
               kube_client: Any | None = None) -> dict[str, Any]:
    """Poll until the InferenceService is Ready; its status, or DeployError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = inference_service_status(name, namespace, kube_client=kube_client)
        if status["ready"]:
            return status
        if time.monotonic() >= deadline:
            raise DeployError(f"InferenceService {namespace}/{name} not ready after {timeout_s:.0f}s: "
                              f"{status['message'] or 'no Ready condition yet'}")
        time.sleep(poll_s)

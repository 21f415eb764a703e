"""Helpers for checking Kubernetes objects offline: render overlays, schema checks, walks over pod specs."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from tests.crds import crd_schema, validate

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
OVERLAYS = ("dev", "prod")
K8S_VERSION = "1.33.0"  # a Kubernetes release kubernetes-validate 1.37 ships schemas for
CRD_GROUPS = ("serving.kserve.io/", "trainer.kubeflow.org/")


def render(overlay: str, workdir: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of an overlay, on a copy of manifests/ with every *.env.example copied to *.env."""
    if shutil.which("kubectl") is None:
        raise RuntimeError("kubectl is not installed: the manifest tests render overlays with `kubectl kustomize`")
    copy = workdir / "manifests"
    if not copy.exists():
        shutil.copytree(MANIFESTS, copy, ignore=shutil.ignore_patterns("*.env"))  # never a developer's real env file
        for example in copy.rglob("*.env.example"):
            shutil.copy(example, example.with_name(example.name.removesuffix(".example")))
    out = subprocess.run(["kubectl", "kustomize", str(copy / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize overlays/{overlay} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields a structural CRD schema does not know: the API server would silently drop them."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                found += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and not (path == "" and key in ("apiVersion", "kind", "metadata")):
                found.append(f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def validate_object(obj: dict[str, Any]) -> None:
    """Kubernetes' own schema (strict: unknown fields fail) or, for KServe/Trainer kinds, the CRD's."""
    if obj["apiVersion"].startswith(CRD_GROUPS):
        validate(obj)
        unknown = unknown_fields(obj, crd_schema(obj["kind"]))
        assert not unknown, f"{obj['kind']}/{obj['metadata']['name']}: fields the CRD does not know: {unknown}"
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod template an object carries."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job"):
        yield f"{kind}/{obj['metadata']['name']}", spec["template"]["spec"]
    elif kind in ("TrainingRuntime", "ClusterTrainingRuntime"):
        for job in spec["template"]["spec"]["replicatedJobs"]:
            yield f"{kind}/{obj['metadata']['name']}/{job['name']}", job["template"]["spec"]["template"]["spec"]


def containers(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, the pod-level securityContext) for every container an object defines."""
    for where, pod in pod_specs(obj):
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield f"{where}/{c['name']}", c, pod.get("securityContext", {})
    if obj["kind"] in ("ServingRuntime", "ClusterServingRuntime"):
        for c in obj["spec"]["containers"]:
            yield f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}", c, {}
    if obj["kind"] == "InferenceService":
        predictor = obj["spec"]["predictor"]
        yield f"InferenceService/{obj['metadata']['name']}", predictor["model"], predictor.get("securityContext", {})
        transformer = obj["spec"].get("transformer", {})
        for c in transformer.get("containers", []):
            yield (f"InferenceService/{obj['metadata']['name']}/transformer/{c['name']}", c,
                   transformer.get("securityContext", {}))


def images(obj: Any) -> Iterator[str]:
    """Every `image` value anywhere in an object."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from images(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from images(item)

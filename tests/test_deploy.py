"""The deploy step: rendering the serving objects of a profile, and creating or merge-patching an
InferenceService through the Kubernetes API (against a recording fake API server on loopback)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from sharegpt4v import cluster, deploy
from sharegpt4v.cli import main
from sharegpt4v.deploy import DeployError, apply_inference_service, render_deployment, render_inference_service
from tests.crds import validate
from tests.kube_fake import FakeKubeApiServer

ISVCS = "/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices"


@pytest.fixture
def api():
    with FakeKubeApiServer() as server:
        yield server


def _isvc(uri: str = "s3://sharegpt4v/serving/chat-v1", **kw: Any) -> dict[str, Any]:
    return render_inference_service("chat", "prod", storage_uri=uri, **kw)


def test_creates_when_missing(api: FakeKubeApiServer) -> None:
    obj = _isvc()
    assert apply_inference_service(obj, dry_run=False, kube_client=api.client()) == "created"
    path = ISVCS.format(ns=cluster.NAMESPACE)
    assert api.methods() == ["GET", "POST"]
    assert api.requests[0][1] == f"{path}/sharegpt4v-chat" and api.requests[1][1] == path
    assert api.requests[1][3] == obj  # the object as rendered, nothing added or lost on the way
    stored = api.objects[f"{path}/sharegpt4v-chat"]
    assert stored["spec"]["predictor"]["model"]["storageUri"] == "s3://sharegpt4v/serving/chat-v1"


def test_merge_patches_when_it_exists(api: FakeKubeApiServer) -> None:
    client = api.client()
    apply_inference_service(_isvc(), dry_run=False, kube_client=client)
    key = f"{ISVCS.format(ns=cluster.NAMESPACE)}/sharegpt4v-chat"
    api.objects[key]["metadata"]["annotations"] = {"owner": "someone-else"}  # set by another tool: kept
    api.objects[key]["status"] = {"url": "http://chat"}
    assert apply_inference_service(_isvc("s3://sharegpt4v/serving/chat-v2"), dry_run=False,
                                   kube_client=client) == "patched"
    method, path, content_type, body = api.requests[-1]
    assert (method, path, content_type) == ("PATCH", key, "application/merge-patch+json")
    assert body["spec"]["predictor"]["model"]["storageUri"] == "s3://sharegpt4v/serving/chat-v2"
    stored = api.objects[key]
    assert stored["spec"]["predictor"]["model"]["storageUri"] == "s3://sharegpt4v/serving/chat-v2"
    assert stored["metadata"]["annotations"] == {"owner": "someone-else"} and stored["metadata"]["uid"] == "uid-1"
    assert api.methods() == ["GET", "POST", "GET", "PATCH"]


def test_dry_run_prints_yaml_and_calls_nothing(api: FakeKubeApiServer) -> None:
    out = io.StringIO()
    obj = _isvc()
    assert apply_inference_service(obj, dry_run=True, kube_client=api.client(), out=out) == "dry-run"
    assert api.requests == []
    assert yaml.safe_load(out.getvalue()) == obj


def test_api_errors_become_one_line_deploy_errors(api: FakeKubeApiServer) -> None:
    api.fail["GET"] = 403
    with pytest.raises(DeployError, match="sharegpt4v/sharegpt4v-chat: 403"):
        apply_inference_service(_isvc(), dry_run=False, kube_client=api.client())
    assert api.methods() == ["GET"]


def test_refuses_other_kinds() -> None:
    with pytest.raises(ValueError, match="InferenceService"):
        apply_inference_service(cluster.build_kserve_service_account(), dry_run=True)


def test_namespace_falls_back_to_the_pods_own(api: FakeKubeApiServer, tmp_path: Path, monkeypatch) -> None:
    ns_file = tmp_path / "namespace"
    ns_file.write_text("team-a\n")
    monkeypatch.setattr(deploy, "SA_NAMESPACE_FILE", ns_file)
    obj = _isvc(namespace=None)
    assert "namespace" not in obj["metadata"]
    apply_inference_service(obj, dry_run=False, kube_client=api.client())
    assert api.requests[-1][1] == ISVCS.format(ns="team-a")
    assert api.requests[-1][3]["metadata"]["namespace"] == "team-a"


def test_wait_ready_reads_the_ready_condition(api: FakeKubeApiServer) -> None:
    client = api.client()
    apply_inference_service(_isvc(), dry_run=False, kube_client=client)
    key = f"{ISVCS.format(ns=cluster.NAMESPACE)}/sharegpt4v-chat"
    api.objects[key]["status"] = {"conditions": [{"type": "Ready", "status": "False", "reason": "RevisionMissing"}]}
    with pytest.raises(DeployError, match="not ready after 0s: RevisionMissing"):
        deploy.wait_ready("sharegpt4v-chat", kube_client=client, timeout_s=0)
    api.objects[key]["status"] = {"url": "http://sharegpt4v-chat.sharegpt4v.example.com",
                                  "conditions": [{"type": "Ready", "status": "True"}]}
    status = deploy.wait_ready("sharegpt4v-chat", kube_client=client, timeout_s=5, poll_s=0.01)
    assert status == {"ready": True, "url": "http://sharegpt4v-chat.sharegpt4v.example.com", "message": ""}


def test_cli_applies_through_the_kubeconfig(api: FakeKubeApiServer, tmp_path: Path, monkeypatch, capsys) -> None:
    from kubernetes import client

    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "users": [{"name": "u", "user": {"token": "test-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    saved = client.Configuration.get_default_copy()
    try:
        rc = main(["deploy", "apply", "--model", "captioner", "--storage-uri", "s3://sharegpt4v/serving/cap-v3",
                   "--profile", "dev"])
    finally:
        client.Configuration.set_default(saved)
    assert rc == 0
    assert api.methods() == ["GET", "POST"]
    created = api.requests[1][3]
    assert created == render_inference_service("captioner", "dev", storage_uri="s3://sharegpt4v/serving/cap-v3")
    assert "sharegpt4v/sharegpt4v-captioner: created" in capsys.readouterr().err


def test_cli_dry_run_and_render(capsys) -> None:
    assert main(["deploy", "apply", "--model", "chat", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == render_inference_service("chat", "prod")
    assert main(["deploy", "render", "--profile", "dev", "--storage-uri", "chat=s3://b/chat", "--image",
                 "registry.example/sharegpt4v/serving:0.1.0"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [o["kind"] for o in objects] == ["ServingRuntime", "ServiceAccount", "InferenceService", "InferenceService"]
    assert objects[0]["spec"]["containers"][0]["image"] == "registry.example/sharegpt4v/serving:0.1.0"
    assert objects[3]["spec"]["predictor"]["model"]["storageUri"] == "s3://b/chat"
    assert main(["deploy", "render", "--storage-uri", "chat"]) == 2  # a usage error


def test_cli_check_and_write_keep_the_manifests_in_step(tmp_path: Path, capsys) -> None:
    import shutil

    manifests = tmp_path / "manifests"
    shutil.copytree(Path(__file__).resolve().parents[1] / "manifests", manifests)
    assert main(["deploy", "render", "--check", "--manifests", str(manifests)]) == 0
    target = manifests / "overlays" / "prod" / "inferenceservices.yaml"
    target.write_text(target.read_text().replace("maxReplicas: 8", "maxReplicas: 9"))
    assert main(["deploy", "render", "--check", "--manifests", str(manifests)]) == 1
    assert "inferenceservices.yaml" in capsys.readouterr().err
    assert main(["deploy", "render", "--write", "--manifests", str(manifests)]) == 0
    assert main(["deploy", "render", "--check", "--manifests", str(manifests)]) == 0
    assert main(["deploy", "render", "--check", "--manifests", str(tmp_path)]) == 1


@pytest.mark.parametrize("profile", sorted(deploy.PROFILES))
def test_rendered_objects_validate_against_the_crds(profile: str) -> None:
    objects = render_deployment(profile)
    for obj in objects:
        if obj["apiVersion"].startswith("serving.kserve.io/"):
            validate(obj)
    isvcs = [o for o in objects if o["kind"] == "InferenceService"]
    assert [o["metadata"]["name"] for o in isvcs] == ["sharegpt4v-captioner", "sharegpt4v-chat"]
    for isvc in isvcs:
        model = isvc["spec"]["predictor"]["model"]
        gpus = model["resources"]["limits"].get(cluster.GPU_RESOURCE)
        assert (gpus == "1") == (profile == "prod")
        assert model["storageUri"] == cluster.model_storage_uri(isvc["metadata"]["labels"]["sharegpt4v/model"])


def test_unknown_profile_or_model_is_refused() -> None:
    with pytest.raises(ValueError, match="dev, prod"):
        render_inference_service("chat", "staging")
    with pytest.raises(ValueError, match="captioner, chat"):
        render_inference_service("whisper", "prod")


@pytest.mark.parametrize("profile", sorted(deploy.PROFILES))
def test_each_triton_service_runs_the_openai_api_as_its_transformer(profile: str) -> None:
    """The transformer's command line, with what KServe appends to a custom transformer's arguments
    (`--model_name`, `--predictor_host <service>-predictor.<namespace>`, `--http_port`), is a valid
    `sharegpt4v serve openai` that serves the service's model from its own predictor."""
    from sharegpt4v.cli import build_parser

    for isvc in render_deployment(profile, include_shared=False):
        validate(isvc)
        name, model = isvc["metadata"]["name"], isvc["metadata"]["labels"]["sharegpt4v/model"]
        transformer = isvc["spec"]["transformer"]
        container = transformer["containers"][0]
        assert container["image"] == cluster.TRAIN_IMAGE and container["command"] == ["sharegpt4v"]
        assert container["ports"] == [{"containerPort": cluster.OPENAI_PORT, "name": "http1", "protocol": "TCP"}]
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]} == {cluster.S3_SECRET}
        assert transformer["maxReplicas"] == isvc["spec"]["predictor"]["maxReplicas"]
        kserve = ["--model_name", name, "--predictor_host", f"{name}-predictor.{cluster.NAMESPACE}", "--http_port", "8080"]
        args = build_parser().parse_args([*container["args"], *kserve])
        assert args.fn.__name__ == "cmd_serve_openai" and (args.host, args.port) == ("0.0.0.0", 8080)
        assert args.triton_url == f"{name}-predictor.{cluster.NAMESPACE}"
        assert args.model == [f"{name}={model}"] and args.fetch_allow == list(cluster.OPENAI_FETCH_ALLOW)
    image = "registry.example.com/sharegpt4v/train@sha256:" + "0" * 64
    isvc = render_inference_service("chat", profile, transformer_image=image)
    assert isvc["spec"]["transformer"]["containers"][0]["image"] == image
    assert "transformer" not in render_inference_service("chat", profile, engine="vllm")["spec"]  # vLLM speaks OpenAI


def test_the_openai_api_reaches_triton_at_the_predictor_host() -> None:
    from sharegpt4v.serving.triton_http import triton_base_url

    assert triton_base_url("sharegpt4v-chat-predictor.sharegpt4v") == "http://sharegpt4v-chat-predictor.sharegpt4v"
    assert triton_base_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="expected http://host:port"):
        triton_base_url("grpc://x:8001")

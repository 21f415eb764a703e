"""Every overlay renders with `kubectl kustomize`, and every rendered object is valid and follows the
platform's rules: Kubernetes schemas (strict) or the KServe/Trainer CRDs, pinned images, non-root
containers with resource requests, Secrets only from git-ignored env files, namespace-scoped RBAC,
NetworkPolicies, and serving objects equal to what `sharegpt4v.deploy` renders."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml

from sharegpt4v import cluster
from sharegpt4v.deploy import manifest_files, render_deployment
from tests.manifests.k8s import MANIFESTS, OVERLAYS, REPO, containers, images, pod_specs, render, validate_object


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    work = tmp_path_factory.mktemp("kustomize")
    return {overlay: render(overlay, work) for overlay in OVERLAYS}


def _by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return _by_kind(objects, kind)[name]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_platform(rendered, overlay: str) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered[overlay]}
    for expected in [("Namespace", cluster.NAMESPACE), ("StatefulSet", "minio"), ("Service", "minio"),
                     ("Job", "minio-buckets"), ("StatefulSet", "postgres"), ("Deployment", "mlflow"),
                     ("Service", "mlflow"), ("ConfigMap", "kfp-launcher"), ("ServingRuntime", cluster.TRITON_RUNTIME),
                     ("ServiceAccount", cluster.KSERVE_SERVICE_ACCOUNT), ("Secret", cluster.S3_SECRET),
                     ("Secret", cluster.MLFLOW_SECRET), ("Secret", cluster.TEACHER_SECRET),
                     ("InferenceService", "sharegpt4v-captioner"), ("InferenceService", "sharegpt4v-chat"),
                     ("TrainingRuntime", cluster.DEEPSPEED_RUNTIME), ("Role", cluster.PIPELINE_RUNNER_SA),
                     ("RoleBinding", cluster.PIPELINE_RUNNER_SA), ("ServiceAccount", cluster.PIPELINE_RUNNER_SA),
                     ("NetworkPolicy", "minio"), ("NetworkPolicy", "mlflow")]:
        assert expected in kinds, f"{overlay}: {expected} missing"
    for obj in rendered[overlay]:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == cluster.NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_its_schema(rendered, overlay: str) -> None:
    for obj in rendered[overlay]:
        validate_object(obj)


def test_the_schema_checks_catch_mistakes(rendered) -> None:
    import jsonschema
    import kubernetes_validate

    deployment = yaml.safe_load(yaml.safe_dump(_one(rendered["dev"], "Deployment", "mlflow")))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo: strict validation fails
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(deployment)
    isvc = yaml.safe_load(yaml.safe_dump(_one(rendered["dev"], "InferenceService", "sharegpt4v-chat")))
    isvc["spec"]["predictor"]["model"]["storageURI"] = "s3://x"  # the API server would drop it silently
    with pytest.raises(AssertionError, match="storageURI"):
        validate_object(isvc)
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_object(isvc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_pinned(rendered, overlay: str) -> None:
    found = [image for obj in rendered[overlay] for image in images(obj)]
    assert len(found) >= 6
    for image in found:
        name, _, digest = image.partition("@")
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        assert digest.startswith("sha256:") or (tag and tag != "latest"), f"{image}: pin a tag or digest"
        if image.startswith("sharegpt4v/"):  # the project's own images: one per images/<name>/Dockerfile
            assert tag == cluster.IMAGE_TAG
            assert (REPO / "images" / name.split("/")[1].partition(":")[0] / "Dockerfile").is_file(), image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_run_as_non_root_with_resource_requests(rendered, overlay: str) -> None:
    seen = 0
    for obj in rendered[overlay]:
        for where, container, pod_security in containers(obj):
            seen += 1
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
            uid = sc.get("runAsUser", pod_security.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, f"{where}: numeric non-root runAsUser"
            assert sc.get("allowPrivilegeEscalation") is False, where
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{where}: resource requests"
    assert seen >= 10  # minio, mc, postgres, mlflow, triton runtime, 2 predictors, their 2 transformers, trainer node


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_and_configmap_reference_resolves(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    secrets = {n: set(o.get("data", {})) for n, o in _by_kind(objects, "Secret").items()}
    configmaps = set(_by_kind(objects, "ConfigMap"))
    for obj in objects:
        for where, container, _ in containers(obj):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, f"{where}: Secret {ref['name']}"
                    assert ref.get("optional") or ref["key"] in secrets[ref["name"]], f"{where}: {ref}"
            for source in container.get("envFrom", []):
                assert source["secretRef"]["name"] in secrets, where
        for where, pod in pod_specs(obj):
            for volume in pod.get("volumes", []):
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in configmaps, where
    for sa in _by_kind(objects, "ServiceAccount").values():
        for ref in sa.get("secrets", []):
            assert ref["name"] in secrets


def test_secrets_come_only_from_git_ignored_env_files() -> None:
    # No Secret object with values anywhere under manifests/.
    for path in MANIFESTS.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                assert not doc.get("data") and not doc.get("stringData"), f"{path}: a Secret with values"
    base = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())
    generators = base["secretGenerator"]
    assert {g["name"] for g in generators} >= {cluster.S3_SECRET, cluster.MLFLOW_SECRET, cluster.TEACHER_SECRET}
    for generator in generators:
        assert set(generator) <= {"name", "envs", "options"}, f"{generator['name']}: only env files (no literals)"
        for env in generator["envs"]:
            env_file, example = MANIFESTS / "base" / env, MANIFESTS / "base" / f"{env}.example"
            assert env.endswith(".env") and example.is_file(), f"{env}: commit {example.name}"
            ignored = subprocess.run(["git", "check-ignore", "-q", str(env_file.relative_to(REPO))], cwd=REPO)
            assert ignored.returncode == 0, f"{env} must be git-ignored"
            keys = [line.split("=", 1)[0] for line in example.read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
            assert keys and all(re.fullmatch(r"[A-Z][A-Z0-9_]*", k) for k in keys), example
    # The keys the platform's pods read (cluster.SECRET_ENV) are all in the examples.
    example_keys = {g["name"]: {line.split("=", 1)[0] for env in g["envs"]
                                for line in (MANIFESTS / "base" / f"{env}.example").read_text().splitlines()
                                if "=" in line and not line.startswith("#")} for g in generators}
    for secret, keys in cluster.SECRET_ENV.items():
        assert {k for k, _ in keys} <= example_keys[secret], secret
    assert {"OPENAI_BASE_URL", "OPENAI_API_KEY"} <= example_keys[cluster.TEACHER_SECRET]


def test_generated_serving_manifests_are_up_to_date() -> None:
    for path, text in manifest_files(MANIFESTS).items():
        assert path.is_file() and path.read_text() == text, (
            f"{path.relative_to(REPO)} differs from the builders: run `sharegpt4v deploy render --write`")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_serving_objects_equal_the_deploy_step(rendered, overlay: str) -> None:
    """What kustomize deploys is what the pipeline's deploy step (sharegpt4v.deploy) renders."""
    expected = {(o["kind"], o["metadata"]["name"]): o for o in render_deployment(overlay)}
    actual = {(o["kind"], o["metadata"]["name"]): o for o in rendered[overlay] if (o["kind"], o["metadata"]["name"])
              in expected}
    assert actual == expected


def test_kserve_s3_secret_and_service_account(rendered) -> None:
    for objects in rendered.values():
        secret = _one(objects, "Secret", cluster.S3_SECRET)
        assert secret["metadata"]["annotations"] == cluster.kserve_s3_annotations()
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["data"])  # KServe's default key names
        sa = _one(objects, "ServiceAccount", cluster.KSERVE_SERVICE_ACCOUNT)
        assert sa["secrets"] == [{"name": cluster.S3_SECRET}]
        for isvc in _by_kind(objects, "InferenceService").values():
            predictor = isvc["spec"]["predictor"]
            assert predictor["serviceAccountName"] == cluster.KSERVE_SERVICE_ACCOUNT
            model = predictor["model"]
            assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
            assert model["runtime"] == cluster.TRITON_RUNTIME and model["storageUri"].startswith("s3://")
            assert model["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        runtime = _one(objects, "ServingRuntime", cluster.TRITON_RUNTIME)
        assert "v2" in runtime["spec"]["protocolVersions"]
        assert {"name": "triton", "version": "2", "autoSelect": True, "priority": 1} in runtime["spec"]["supportedModelFormats"]
        assert runtime["spec"]["containers"][0]["args"][:4] == [
            "tritonserver", "--model-store=/mnt/models", "--http-port=8080", "--grpc-port=9000"]


def test_prod_serves_on_gpus_and_dev_on_cpu(rendered) -> None:
    for name in ("sharegpt4v-captioner", "sharegpt4v-chat"):
        prod = _one(rendered["prod"], "InferenceService", name)["spec"]["predictor"]
        dev = _one(rendered["dev"], "InferenceService", name)["spec"]["predictor"]
        assert prod["model"]["resources"]["limits"][cluster.GPU_RESOURCE] == "1"
        assert prod["nodeSelector"] == {cluster.GPU_PRODUCT_LABEL: cluster.A100_PRODUCT}
        assert prod["tolerations"] == [cluster.GPU_TOLERATION]
        assert prod["maxReplicas"] > prod["minReplicas"] >= 1
        assert cluster.GPU_RESOURCE not in dev["model"]["resources"]["limits"] and "nodeSelector" not in dev
        assert dev["minReplicas"] == dev["maxReplicas"] == 1


def _size(quantity: str) -> int:
    units = {"Gi": 2**30, "Ti": 2**40, "Mi": 2**20}
    return int(quantity[:-2]) * units[quantity[-2:]]


def test_prod_is_bigger_and_has_basic_auth(rendered) -> None:
    def storage(overlay: str, name: str) -> int:
        sts = _one(rendered[overlay], "StatefulSet", name)
        return _size(sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"])

    for name in ("minio", "postgres"):
        assert storage("prod", name) > storage("dev", name)
    env = {overlay: {e["name"]: e.get("value") for e in _one(rendered[overlay], "Deployment", "mlflow")["spec"][
        "template"]["spec"]["containers"][0]["env"]} for overlay in OVERLAYS}
    assert env["prod"]["MLFLOW_BASIC_AUTH"] == "true" and env["dev"]["MLFLOW_BASIC_AUTH"] == "false"
    assert _one(rendered["prod"], "Deployment", "mlflow")["spec"]["replicas"] == 2
    assert _one(rendered["dev"], "Deployment", "mlflow")["spec"]["replicas"] == 1
    start = _one(rendered["prod"], "ConfigMap", "mlflow-scripts")["data"]["start.sh"]
    assert "--app-name basic-auth" in start and "MLFLOW_AUTH_CONFIG_PATH" in start
    assert "--artifacts-destination" in start and "MLFLOW_BACKEND_STORE_URI" in start
    # MLflow 3 refuses Host headers it does not know: the in-cluster name clients use must be allowed.
    allowed = env["prod"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    host = cluster.MLFLOW_TRACKING_URI.split("//")[1]
    import fnmatch

    assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed)
    assert env["prod"]["MLFLOW_ARTIFACTS_BUCKET"] == cluster.MLFLOW_BUCKET


def test_kfp_launcher_points_pipeline_artifacts_at_minio(rendered) -> None:
    data = _one(rendered["prod"], "ConfigMap", "kfp-launcher")["data"]
    assert data["defaultPipelineRoot"] == cluster.PIPELINE_ROOT
    s3 = yaml.safe_load(data["providers"])["s3"]["default"]
    assert s3["endpoint"] == cluster.MINIO_ENDPOINT and s3["disableSSL"] is True and s3["forcePathStyle"] is True
    credentials = s3["credentials"]
    assert credentials["fromEnv"] is False
    assert credentials["secretRef"] == {"secretName": cluster.S3_SECRET, "accessKeyKey": "AWS_ACCESS_KEY_ID",
                                        "secretKeyKey": "AWS_SECRET_ACCESS_KEY"}


def test_bucket_job_creates_the_platform_buckets(rendered) -> None:
    job = _one(rendered["dev"], "Job", "minio-buckets")
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    for bucket in (cluster.BUCKET, cluster.MLFLOW_BUCKET, cluster.PIPELINES_BUCKET):
        assert bucket in script
    assert "mc admin user add" in script and f"http://{cluster.MINIO_SERVICE}:{cluster.MINIO_PORT}" in script
    assert cluster.PIPELINE_ROOT.startswith(f"s3://{cluster.PIPELINES_BUCKET}/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_is_namespace_scoped(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = _one(objects, "Role", cluster.PIPELINE_RUNNER_SA)

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in role["rules"])

    for verb in ("create", "patch", "get"):
        assert allowed("serving.kserve.io", "inferenceservices", verb)
        assert allowed("trainer.kubeflow.org", "trainjobs", verb)
    assert not allowed("", "secrets", "list") and not any("*" in r["verbs"] + r["resources"] for r in role["rules"])
    binding = _one(objects, "RoleBinding", cluster.PIPELINE_RUNNER_SA)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": cluster.PIPELINE_RUNNER_SA}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": cluster.PIPELINE_RUNNER_SA,
                                    "namespace": cluster.NAMESPACE}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_minio_and_mlflow_reachable_only_from_the_namespace(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    policies = _by_kind(objects, "NetworkPolicy")
    for workload, kind in (("minio", "StatefulSet"), ("mlflow", "Deployment"), ("postgres", "StatefulSet")):
        labels = _one(objects, kind, workload)["spec"]["template"]["metadata"]["labels"]
        selecting = [p for p in policies.values()
                     if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert selecting, f"no NetworkPolicy selects {workload}"
        for policy in selecting:
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            for rule in policy["spec"]["ingress"]:
                # a podSelector alone means: pods of this namespace; no namespaceSelector / ipBlock
                assert rule["from"] and all(set(peer) == {"podSelector"} for peer in rule["from"]), policy


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_their_pods(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    pods = [(o, o["spec"]["template"]["metadata"]["labels"]) for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    for name, service in _by_kind(objects, "Service").items():
        targets = [o for o, labels in pods if service["spec"]["selector"].items() <= labels.items()]
        assert len(targets) == 1, name
        ports = {p["name"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{name}: {port}"
    assert _one(objects, "Service", cluster.MINIO_SERVICE)["spec"]["ports"][0]["port"] == cluster.MINIO_PORT
    assert _one(objects, "Service", cluster.MLFLOW_SERVICE)["spec"]["ports"][0]["port"] == cluster.MLFLOW_PORT


def test_trainer_runtime_fits_the_trainjobs_the_platform_renders(rendered) -> None:
    from sharegpt4v.config import load_recipe

    for overlay in OVERLAYS:
        runtime = _one(rendered[overlay], "TrainingRuntime", cluster.DEEPSPEED_RUNTIME)
        job = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
        container = job["template"]["spec"]["template"]["spec"]["containers"][0]
        assert job["name"] == container["name"] == "node"  # what build_trainjob's runtimePatches target
        assert "torch" in runtime["spec"]["mlPolicy"]  # torchrun + PET_* rendezvous, no SSH
        secret_env = [e for e in container["env"] if "valueFrom" in e]
        assert secret_env == cluster.secret_env()
    prod = _one(rendered["prod"], "TrainingRuntime", cluster.DEEPSPEED_RUNTIME)["spec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert prod["nodeSelector"] == {cluster.GPU_PRODUCT_LABEL: cluster.A100_PRODUCT}
    assert prod["tolerations"] == [cluster.GPU_TOLERATION]
    job = cluster.build_trainjob("sft", load_recipe("a100-7b"), name="sft", image=cluster.TRAIN_IMAGE, data="s3://b/d",
                                 out="s3://b/o", runtime=cluster.DEEPSPEED_RUNTIME, namespace=cluster.NAMESPACE)
    validate_object(job)
    assert job["spec"]["runtimeRef"] == {"name": cluster.DEEPSPEED_RUNTIME, "kind": "TrainingRuntime",
                                         "apiGroup": "trainer.kubeflow.org"}
    assert job["spec"]["trainer"]["command"][:3] == ["torchrun", "-m", "sharegpt4v.training.run"]


def test_env_files_are_git_ignored_and_examples_are_not() -> None:
    for path in ("manifests/base/s3.env", "manifests/overlays/prod/extra.env"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path
    for example in MANIFESTS.rglob("*.env.example"):
        rel = str(example.relative_to(REPO))
        assert subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO).returncode == 1, rel


def test_deploy_guide_covers_install_order_pipelines_and_endpoints() -> None:
    guide = (MANIFESTS / "README.md").read_text()
    for needle in ("kubectl kustomize", "kubectl apply", "port-forward", "Upload pipeline", "/v2/models",
                   "env.example", "sharegpt4v deploy", cluster.PIPELINE_RUNNER_SA):
        assert needle in guide, needle
    assert not re.search(r"/(home|Users|work)/", guide)


def test_manifests_name_no_machine_paths() -> None:
    for path in list(MANIFESTS.rglob("*")) + list((REPO / "images").rglob("*")):
        if path.is_file():
            assert not re.search(r"/(home/(?!sharegpt4v|mlflow)|Users/|work/)", path.read_text()), path


_SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_reaches_a_command_line_or_a_plain_value(rendered, overlay: str) -> None:
    """Passwords and keys reach containers only as Secret-backed environment variables: never in `command` or
    `args` (`ps` shows them, so does the pod spec), neither as text nor as a `$(VAR)` that Kubernetes expands."""
    import base64

    objects = rendered[overlay]
    secrets = {name: {k: base64.b64decode(v).decode() for k, v in o.get("data", {}).items()}
               for name, o in _by_kind(objects, "Secret").items()}
    values = {v for data in secrets.values() for k, v in data.items() if _SECRET_KEY.search(k)}
    assert "change-me-postgres-password" in values
    for obj in objects:
        for where, container, _ in containers(obj):
            env = container.get("env", [])
            from_secrets = {e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
            from_secrets |= {k for source in container.get("envFrom", []) if "secretRef" in source
                             for k in secrets[source["secretRef"]["name"]]}
            argv = "\n".join(map(str, [*container.get("command", []), *container.get("args", [])]))
            plain = "\n".join(str(e.get("value", "")) for e in env)
            for value in values:
                assert value not in argv and value not in plain, f"{where}: a Secret's value in its spec"
            for ref in re.findall(r"\$\((\w+)\)", argv):
                assert ref not in from_secrets, f"{where}: $({ref}) puts a Secret on the command line"


def test_mlflow_reads_its_database_uri_from_the_environment(rendered) -> None:
    """The Postgres password is in MLFLOW_BACKEND_STORE_URI (which `mlflow server` reads for --backend-store-uri),
    built by Kubernetes from Secret-backed entries before it; start.sh puts no database URI on a command line."""
    import base64

    from mlflow.cli import server

    (option,) = [p for p in server.params if "--backend-store-uri" in getattr(p, "opts", [])]
    assert option.envvar == "MLFLOW_BACKEND_STORE_URI"
    for overlay in OVERLAYS:
        (container,) = _one(rendered[overlay], "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
        assert not any(s.get("secretRef", {}).get("name") == "sharegpt4v-postgres" for s in container.get("envFrom", []))
        env = container["env"]
        names = [e["name"] for e in env]
        uri = env[names.index("MLFLOW_BACKEND_STORE_URI")]["value"]
        refs = re.findall(r"\$\((\w+)\)", uri)
        assert "POSTGRES_PASSWORD" in refs
        postgres = {k: base64.b64decode(v).decode()
                    for k, v in _one(rendered[overlay], "Secret", "sharegpt4v-postgres")["data"].items()}
        for ref in refs:  # Kubernetes expands $(VAR) only from entries defined before this one
            assert names.index(ref) < names.index("MLFLOW_BACKEND_STORE_URI"), ref
            assert env[names.index(ref)]["valueFrom"]["secretKeyRef"] == {"name": "sharegpt4v-postgres", "key": ref}
        expanded = re.sub(r"\$\((\w+)\)", lambda m: postgres[m.group(1)], uri)
        assert expanded == "postgresql://mlflow:change-me-postgres-password@postgres:5432/mlflow"
        start = _one(rendered[overlay], "ConfigMap", "mlflow-scripts")["data"]["start.sh"]
        code = "\n".join(line for line in start.splitlines() if not line.lstrip().startswith("#"))
        assert "--backend-store-uri" not in code and "postgresql://" not in code and "POSTGRES_PASSWORD}" not in code
        assert "database_uri = ${MLFLOW_BACKEND_STORE_URI}_auth" in start

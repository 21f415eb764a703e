"""Multi-node training from the pipeline task: a TrainJob created, followed, failed, cancelled, re-attached and
cleaned up, against the recording fake Kubernetes API (tests/kube_fake.py) playing its lifecycle."""

from __future__ import annotations

import functools
import re
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from sharegpt4v import cluster, deploy, storage, tracking
from sharegpt4v import stages as steps
from sharegpt4v.config import load_recipe
from sharegpt4v.training import trainjob
from sharegpt4v.training.data import StageInputs
from sharegpt4v.training.trainer import StageResult, finished_result
from sharegpt4v.training.trainjob import (
    OUT_ANNOTATION,
    RUN_LABEL,
    TrainJobCancelled,
    TrainJobError,
    TrainJobFailed,
    run_trainjob,
    trainjob_name,
)
from tests.crds import validate
from tests.kube_fake import TRAINJOBS, FakeKubeApiServer

REPO = Path(__file__).resolve().parents[2]
NS = cluster.NAMESPACE
IMAGE = "registry.example/sharegpt4v/train:0.1.0"
# The tiny profile on two "nodes" (one process each): micro-batches that keep the global batch divisible.
TWO_NODES = ["compute.num_nodes=2", "captioner.micro_batch_size=16", "pretrain.micro_batch_size=16",
             "sft.micro_batch_size=8"]
RECIPE = load_recipe("tiny", TWO_NODES)


@pytest.fixture
def kube():
    with FakeKubeApiServer() as server:
        yield server


@pytest.fixture
def in_pod(kube: FakeKubeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Code that loads its own configuration finds the fake (a kubeconfig; the in-cluster loader finds no token)
    and believes it runs in a pod of namespace sharegpt4v."""
    from kubernetes import client

    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump(kube.kubeconfig()))
    ns_file = tmp_path / "namespace"
    ns_file.write_text(f"{NS}\n")
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "1")
    monkeypatch.setattr(deploy, "SA_NAMESPACE_FILE", ns_file)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("HOSTNAME", raising=False)
    saved = client.Configuration.get_default_copy()
    yield kube
    client.Configuration.set_default(saved)


@functools.lru_cache(maxsize=1)
def _model() -> tuple[Any, Any]:
    from tests.modeling.fixtures import tiny_model

    return tiny_model()


def write_final(out: str, stage: str, recipe: Any, inputs: StageInputs, init: str | None = None, steps: int = 7,
                loss: float = 1.25) -> None:
    """What the trainer's rank 0 leaves at `out` when it finishes: `final/` with the stage's manifest."""
    from sharegpt4v.modeling.builder import save_model
    from sharegpt4v.training.checkpoint import stage_made_from

    model, processor = _model()
    save_model(model, processor, storage.join(out, "final"), stage=stage, steps=steps, final_loss=loss,
               samples_seen=steps * 32, flagged_samples=1, flagged={"truncated": 1}, examples=96, run_id=None,
               data=inputs.data, captions=inputs.captions, init=init,
               made_from=stage_made_from(stage, recipe, inputs, init))


def finishes(kube: FakeKubeApiServer, stage: str, inputs: StageInputs, recipe: Any = RECIPE) -> None:
    """On succeeded, the fake's job leaves a final checkpoint at the prefix it was given."""
    kube.on_complete = lambda job: write_final(job["metadata"]["annotations"][OUT_ANNOTATION], stage, recipe, inputs)


def follow(kube: FakeKubeApiServer, stage: str, inputs: StageInputs, out: str, lines: list[str], **kw: Any) -> StageResult:
    return run_trainjob(stage, RECIPE, inputs, out, kube_client=kube.client(), image=IMAGE, namespace=NS, poll_s=0.01,
                        log=lines.append, **kw)


def job_path(stage: str, out: str) -> str:
    return f"{TRAINJOBS.format(ns=NS)}/{trainjob_name(stage, out)}"


def posts(kube: FakeKubeApiServer) -> list[dict[str, Any]]:
    return [body for method, path, _, body in kube.requests if method == "POST" and path.endswith("/trainjobs")]


def test_names_are_deterministic_dns_labels_keyed_by_the_prefix() -> None:
    a = trainjob_name("pretrain", "s3://sharegpt4v/pipeline/models/pretrain-0123456789ab")
    assert a == trainjob_name("pretrain", "s3://sharegpt4v/pipeline/models/pretrain-0123456789ab/")
    assert a != trainjob_name("pretrain", "s3://sharegpt4v/pipeline/models/pretrain-ba9876543210")
    for stage in ("captioner", "pretrain", "sft"):
        name = trainjob_name(stage, "s3://b/x")
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    assert trainjob.label_value("0b4f2c1e-1111-2222-3333-444455556666") == "0b4f2c1e-1111-2222-3333-444455556666"
    assert re.fullmatch(r"[0-9a-f]{16}", trainjob.label_value("run id with spaces"))


def test_the_trainjob_fits_the_crd_and_carries_the_platform_settings(world: str, tmp_path: Path) -> None:
    out = str(tmp_path / "sft-abc")
    inputs = StageInputs([world], captions=None, split="sft")
    body = trainjob.render("sft", RECIPE, inputs, out, "s3://b/pretrain/final", image=IMAGE, overrides=TWO_NODES,
                           namespace=NS, kfp_run_id="run-1", env={tracking.PARENT_RUN_ENV: "task-run-7"})
    validate(body)
    meta, spec = body["metadata"], body["spec"]
    assert meta["name"] == trainjob_name("sft", out) and meta["namespace"] == NS
    assert meta["labels"] == {"app.kubernetes.io/part-of": "sharegpt4v", "sharegpt4v/stage": "sft",
                              "sharegpt4v/prefix": trainjob.prefix_hash(out), RUN_LABEL: "run-1"}
    assert meta["annotations"] == {OUT_ANNOTATION: out}
    assert spec["runtimeRef"] == {"name": cluster.DEEPSPEED_RUNTIME, "kind": "TrainingRuntime",
                                  "apiGroup": "trainer.kubeflow.org"}
    trainer = spec["trainer"]
    assert (trainer["image"], trainer["numNodes"], trainer["numProcPerNode"]) == (IMAGE, 2, 1)
    command = trainer["command"]
    args = dict(zip(command[3::2], command[4::2]))
    assert command[:3] == ["torchrun", "-m", "sharegpt4v.training.run"]
    assert {k: args[k] for k in ("--stage", "--profile", "--data", "--out", "--init", "--split")} == {
        "--stage": "sft", "--profile": "tiny", "--data": world, "--out": out, "--init": "s3://b/pretrain/final",
        "--split": "sft"}
    assert command[-len(TWO_NODES):] == TWO_NODES and "--no-resume" not in command  # a new job resumes
    env = {e["name"]: e for e in trainer["env"]}
    assert env[tracking.PARENT_RUN_ENV]["value"] == "task-run-7"  # the stage's MLflow run nests under the task's
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"):
        assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["key"] == key
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
        "spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {cluster.GPU_PRODUCT_LABEL: cluster.A100_PRODUCT}
    assert pod["tolerations"] == [cluster.GPU_TOLERATION]
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    for runtime in ("torch-distributed", "deepspeed-distributed"):
        validate(trainjob.render("sft", RECIPE, inputs, out, image=IMAGE, runtime=runtime))
    with pytest.raises(TrainJobError, match="packaged profile"):
        trainjob.render("sft", RECIPE, inputs, out, image=IMAGE, profile=str(tmp_path / "mine.yaml"))


def test_success_streams_transitions_and_rank0_logs_and_returns_the_stage_result(
        kube: FakeKubeApiServer, world: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFP_RUN_ID", "run-1")
    out = str(tmp_path / "pretrain-abc")
    inputs = StageInputs([world])
    finishes(kube, "pretrain", inputs)
    lines: list[str] = []
    result = follow(kube, "pretrain", inputs, out, lines)

    from sharegpt4v.training.checkpoint import stage_made_from

    assert result == finished_result(out, "pretrain", stage_made_from("pretrain", RECIPE, inputs, None))  # as in-pod
    assert (result.steps, result.final_loss, result.samples_seen, result.flagged_samples) == (7, 1.25, 224, 1)
    assert result.checkpoint_uri == storage.join(out, "final")
    path = job_path("pretrain", out)
    assert kube.phases[path] == ["created", "running", "running", "succeeded"]
    [body] = posts(kube)
    validate(body)
    assert body["metadata"]["labels"][RUN_LABEL] == "run-1"
    assert not [c for c in kube.calls() if c[0] == "DELETE"]  # a finished job stays for inspection
    where = f"TrainJob {NS}/{trainjob_name('pretrain', out)}"
    assert f"{where}: Created=True (JobsCreationSucceeded: Succeeded to create Jobs)" in lines
    assert f"{where}: node: 2 active, 2 ready" in lines
    assert f"{where}: Complete=True (AllJobsCompleted: jobset completed successfully)" in lines
    # rank 0's lines once each, in order; rank 1's (rank 8 on the second node) never
    assert [line for line in lines if line.startswith("[rank 0]")] == [
        "[rank 0] rank 0: step 0 loss 2.0000", "[rank 0] rank 0: step 1 loss 1.0000", "[rank 0] rank 0: done"]
    assert not [line for line in lines if "rank 8" in line]
    selectors = {q["labelSelector"][0] for (_, p, *_), q in zip(kube.requests, kube.queries) if p.endswith("/pods")}
    assert selectors == {f"jobset.sigs.k8s.io/jobset-name={trainjob_name('pretrain', out)},"
                         "jobset.sigs.k8s.io/replicatedjob-name=node,batch.kubernetes.io/job-completion-index=0"}
    log_reads = [q for (_, p, *_), q in zip(kube.requests, kube.queries) if p.endswith("/log")]
    assert log_reads and all(q["container"] == ["node"] and q["timestamps"][0].lower() == "true" for q in log_reads)


def test_a_failed_trainjob_fails_the_task_with_the_trainers_reason(kube: FakeKubeApiServer, world: str,
                                                                   tmp_path: Path) -> None:
    kube.script = ["created", "running", "failed"]
    kube.failure = ("FailedJobs", "jobset failed due to node-0 exited with code 1")
    out = str(tmp_path / "pretrain-abc")
    lines: list[str] = []
    with pytest.raises(TrainJobFailed, match=rf"TrainJob {NS}/sharegpt4v-pretrain-\w+ failed: FailedJobs: "
                                             "jobset failed due to node-0 exited with code 1"):
        follow(kube, "pretrain", StageInputs([world]), out, lines)
    assert "[rank 0] rank 0: Traceback: CUDA error: out of memory" in lines  # the cause, in the task's log
    assert not [c for c in kube.calls() if c[0] == "DELETE"]  # kept for `kubectl describe`; a retry replaces it
    assert not storage.open_store(out).is_complete("final")


def test_sigterm_deletes_the_trainjob(kube: FakeKubeApiServer, world: str, tmp_path: Path) -> None:
    kube.script = ["created", "running"]  # it would run for ever
    sent: list[str] = []

    def cancel(phase: str, job: dict[str, Any]) -> None:  # KFP stops the task's pod while it follows
        if phase == "running" and not sent:
            sent.append(phase)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    kube.on_phase = cancel
    out = str(tmp_path / "pretrain-abc")
    before = signal.getsignal(signal.SIGTERM)
    lines: list[str] = []
    with pytest.raises(TrainJobCancelled, match="SIGTERM"):
        follow(kube, "pretrain", StageInputs([world]), out, lines)
    path = job_path("pretrain", out)
    assert kube.calls()[-1] == ("DELETE", path) and path not in kube.objects
    assert f"TrainJob {NS}/{trainjob_name('pretrain', out)}: SIGTERM: deleting it" in lines
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_job_deleted_under_the_task_fails_it(kube: FakeKubeApiServer, world: str, tmp_path: Path) -> None:
    kube.script = ["created", "deleted"]
    with pytest.raises(TrainJobError, match="was deleted while this task followed it"):
        follow(kube, "pretrain", StageInputs([world]), str(tmp_path / "pretrain-abc"), [])


def test_an_unreachable_api_fails_the_task_and_leaves_the_job_running(kube: FakeKubeApiServer, world: str,
                                                                      tmp_path: Path) -> None:
    kube.script = ["created", "running"]
    kube.on_phase = lambda phase, job: kube.fail.update(GET=503) if phase == "running" else None
    with pytest.raises(TrainJobError, match=r"sharegpt4v-pretrain-\w+: 503 .*a retried task re-attaches"):
        follow(kube, "pretrain", StageInputs([world]), str(tmp_path / "pretrain-abc"), [])
    assert not [c for c in kube.calls() if c[0] == "DELETE"]


def test_a_retried_task_reattaches_to_the_running_job(kube: FakeKubeApiServer, world: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "pretrain-abc")
    inputs = StageInputs([world])
    path = job_path("pretrain", out)
    earlier = trainjob.render("pretrain", RECIPE, inputs, out, image=IMAGE, namespace=NS, kfp_run_id="run-1")
    kube.add(path, earlier, phases=["running", "running", "succeeded"])
    kube.play(path, "running")  # what the first attempt saw before its pod went away
    finishes(kube, "pretrain", inputs)
    monkeypatch.setenv("KFP_RUN_ID", "run-2")  # a later run with the same inputs takes it over
    lines: list[str] = []
    result = follow(kube, "pretrain", inputs, out, lines)
    assert result.steps == 7 and posts(kube) == []  # no second job on the prefix
    assert f"TrainJob {NS}/{trainjob_name('pretrain', out)}: running already: re-attaching (no second job on {out})" \
        in lines
    patches = [body for method, p, _, body in kube.requests if method == "PATCH"]
    assert patches == [{"metadata": {"labels": {RUN_LABEL: "run-2"}}}]  # run-2's exit handler now owns it
    assert kube.objects[path]["metadata"]["labels"][RUN_LABEL] == "run-2"


def test_one_job_per_prefix_a_409_follows_the_job_that_won(kube: FakeKubeApiServer, world: str, tmp_path: Path) -> None:
    out = str(tmp_path / "pretrain-abc")
    inputs = StageInputs([world])
    finishes(kube, "pretrain", inputs)

    def race(key: str, body: dict[str, Any]) -> None:  # another task creates the same job just before this one
        if key not in kube.objects:
            kube.add(key, {**body, "metadata": {**body["metadata"], "labels": {RUN_LABEL: "run-other"}}})

    kube.before_post = race
    lines: list[str] = []
    result = follow(kube, "pretrain", inputs, out, lines)
    assert result.steps == 7 and len(posts(kube)) == 1  # answered 409
    assert [k for k in kube.objects if "/trainjobs/" in k] == [job_path("pretrain", out)]
    assert kube.objects[job_path("pretrain", out)]["metadata"]["labels"] == {RUN_LABEL: "run-other"}
    assert any("created by another task meanwhile; following it" in line for line in lines)


def test_a_failed_job_is_gone_before_its_replacement_is_created(kube: FakeKubeApiServer, world: str,
                                                                tmp_path: Path) -> None:
    out = str(tmp_path / "pretrain-abc")
    inputs = StageInputs([world])
    path = job_path("pretrain", out)
    kube.add(path, trainjob.render("pretrain", RECIPE, inputs, out, image=IMAGE, namespace=NS), phases=["failed"])
    kube.play(path, "failed")
    kube.delete_delay = 2  # foreground deletion: the old job lingers while its pods stop
    existed_at_post: list[bool] = []
    kube.before_post = lambda key, body: existed_at_post.append(key in kube.objects)
    finishes(kube, "pretrain", inputs)
    lines: list[str] = []
    result = follow(kube, "pretrain", inputs, out, lines)
    assert result.steps == 7
    calls = kube.calls()
    assert calls.index(("DELETE", path)) < calls.index(("POST", TRAINJOBS.format(ns=NS)))
    assert existed_at_post == [False]  # never two jobs writing one prefix
    assert kube.phases[path] == ["created", "running", "running", "succeeded"]  # the replacement's life
    assert any("failed before (FailedJobs" in line for line in lines)


def test_a_complete_final_checkpoint_needs_no_job(kube: FakeKubeApiServer, world: str, tmp_path: Path) -> None:
    out = str(tmp_path / "pretrain-abc")
    inputs = StageInputs([world])
    write_final(out, "pretrain", RECIPE, inputs)
    assert follow(kube, "pretrain", inputs, out, []).steps == 7
    assert kube.requests == []


def test_the_exit_handler_deletes_the_unfinished_jobs_of_its_run(in_pod: FakeKubeApiServer, world: str,
                                                                 tmp_path: Path) -> None:
    kube = in_pod
    inputs = StageInputs([world])
    jobs = {}
    for stage, run, phase in (("pretrain", "run-7", "running"), ("captioner", "run-7", "succeeded"),
                              ("sft", "run-8", "running")):
        out = str(tmp_path / stage)
        jobs[stage] = job_path(stage, out)
        kube.add(jobs[stage], trainjob.render(stage, RECIPE, inputs, out, image=IMAGE, namespace=NS, kfp_run_id=run))
        kube.play(jobs[stage], phase)
    assert steps.finish_pipeline_run("run-7", "SUCCEEDED") == "none"  # tracking off; nothing to stop
    assert kube.requests == []
    assert steps.finish_pipeline_run("run-7", "CANCELED", "cancelled by user") == "none"
    assert [c for c in kube.calls() if c[0] == "DELETE"] == [("DELETE", jobs["pretrain"])]
    assert jobs["pretrain"] not in kube.objects and jobs["captioner"] in kube.objects and jobs["sft"] in kube.objects
    assert kube.queries[0]["labelSelector"] == [f"{RUN_LABEL}=run-7"]
    kube.fail["GET"] = 403  # a clean-up that cannot list is raised (after the MLflow run is marked)
    with pytest.raises(TrainJobError, match="403"):
        steps.finish_pipeline_run("run-8", "FAILED")


def _allowed(role: dict[str, Any], method: str, path: str, query: dict[str, list[str]]) -> bool:
    m = re.fullmatch(r"/apis?(?:/([^/]+))?/v1\w*/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?(?:/([^/]+))?", path)
    assert m, path
    group, namespace, resource, name, sub = m.groups()
    group = "" if group is None else group
    if sub:
        resource = f"{resource}/{sub}"
    verb = {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}.get(method) or (
        "get" if name else "watch" if query.get("watch", [""])[0].lower() == "true" else "list")
    return namespace == NS and any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                                   for r in role["rules"])


def test_the_pipeline_runner_role_allows_every_request_and_only_in_its_namespace(
        kube: FakeKubeApiServer, world: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = list(yaml.safe_load_all((REPO / "manifests/base/rbac/pipeline-runner.yaml").read_text()))
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["metadata"]["name"] == cluster.PIPELINE_RUNNER_SA
    out = str(tmp_path / "pretrain-abc")
    inputs = StageInputs([world])
    path = job_path("pretrain", out)
    kube.add(path, trainjob.render("pretrain", RECIPE, inputs, out, image=IMAGE, namespace=NS, kfp_run_id="run-0"),
             phases=["failed"])
    kube.play(path, "failed")
    finishes(kube, "pretrain", inputs)
    follow(kube, "pretrain", inputs, out, [])  # delete the failed one, create, follow, read logs
    monkeypatch.setenv("KFP_RUN_ID", "run-2")
    other = str(tmp_path / "sft-abc")
    kube.add(job_path("sft", other), trainjob.render("sft", RECIPE, inputs, other, image=IMAGE, namespace=NS,
                                                     kfp_run_id="run-1"), phases=["running", "succeeded"])
    finishes(kube, "sft", inputs)
    follow(kube, "sft", inputs, other, [])  # re-attach (patch the run label)
    kube.add(job_path("captioner", other), trainjob.render("captioner", RECIPE, inputs, other, image=IMAGE,
                                                           namespace=NS, kfp_run_id="run-9"))
    trainjob.cleanup_trainjobs("run-9", namespace=NS, kube_client=kube.client(), log=lambda line: None)
    methods = {m for m, *_ in kube.requests}
    assert methods == {"GET", "POST", "PATCH", "DELETE"}
    for (method, p, *_), query in zip(kube.requests, kube.queries):
        assert _allowed(role, method, p, query), (method, p)
    # and nothing more than the follower needs on TrainJobs, in one namespace
    assert not _allowed(role, "GET", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/kubeflow/trainjobs", {})
    assert not _allowed(role, "DELETE", f"/api/v1/namespaces/{NS}/pods/x", {})


def test_a_two_node_profile_compiles_and_its_train_task_runs_as_a_trainjob(in_pod: FakeKubeApiServer, world: str,
                                                                           tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled pipeline's train task calls `stages.train`; with `compute.num_nodes=2` that creates a TrainJob
    whose own command (run here, in process, as its one-process-per-node stand-in) trains into the task's
    prefix, and the task answers what an in-pod run answers."""
    from pipelines import runner
    from sharegpt4v.environment import patched_environ
    from sharegpt4v.training.distributed import single_process_env
    from sharegpt4v.training.run import main as run_main

    kube = in_pod
    compiled = runner.compile_pipeline("train-lmm", tmp_path / "train-lmm.yaml")
    spec, _ = yaml.safe_load_all(compiled.read_text())
    assert {"profile", "overrides"} <= set(spec["root"]["inputDefinitions"]["parameters"])
    bodies = [" ".join(e["container"]["command"]) for e in spec["deploymentSpec"]["executors"].values()]
    assert any('steps.train("pretrain"' in body for body in bodies) and any('steps.train("sft"' in body for body in bodies)

    monkeypatch.setenv("KFP_RUN_ID", "run-2n")
    monkeypatch.setenv(trainjob.POLL_ENV, "0.01")
    monkeypatch.setenv(trainjob.IMAGE_ENV, IMAGE)
    ran: list[list[str]] = []

    def run_the_jobs_command(job: dict[str, Any]) -> None:
        command = job["spec"]["trainer"]["command"]
        args = command[command.index("sharegpt4v.training.run") + 1:]
        ran.append(args)
        with patched_environ(single_process_env()):  # one process stands in for the two nodes
            assert run_main([*args, "compute.num_nodes=1"]) == 0

    kube.on_complete = run_the_jobs_command
    overrides = [*TWO_NODES, "pretrain.max_steps=2", "pretrain.max_samples=32"]
    digest = steps.folder_digest(world)
    result = steps.train("pretrain", world, digest, "", "", "", str(tmp_path / "models"), 8, "tiny", overrides)

    [body] = posts(kube)
    validate(body)
    assert body["spec"]["trainer"]["numNodes"] == 2 and body["metadata"]["namespace"] == NS
    assert body["spec"]["trainer"]["image"] == IMAGE and body["metadata"]["labels"][RUN_LABEL] == "run-2n"
    assert ran and ran[0][ran[0].index("--out") + 1] == body["metadata"]["annotations"][OUT_ANNOTATION]
    assert set(result) == {"checkpoint_uri", "digest", "model_uri", "name", "version", "steps", "final_loss",
                           "samples_seen", "flagged_samples"}  # what an in-pod run returns
    assert result["steps"] == 2 and result["checkpoint_uri"].endswith("/final")
    assert result["checkpoint_uri"].startswith(str(tmp_path / "models" / "pretrain-"))
    from sharegpt4v.modeling.builder import checkpoint_digest

    assert result["digest"] == checkpoint_digest(result["checkpoint_uri"]) and result["version"] == ""
    # a retried task finds final/ complete: the same answer, no second job
    again = steps.train("pretrain", world, digest, "", "", "", str(tmp_path / "models"), 8, "tiny", overrides)
    assert again == result and len(posts(kube)) == 1


def test_one_node_stays_in_the_pod(in_pod: FakeKubeApiServer, world: str, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from sharegpt4v.training import run

    launched: list[int] = []

    def launch(stage: str, recipe: Any, inputs: StageInputs, out: str, init: str | None = None, nproc: int = 1,
               **kw: Any) -> StageResult:
        launched.append(nproc)
        write_final(out, stage, recipe, inputs, init)
        return StageResult(storage.join(out, "final"), 7, 1.25, 224, 1, None)

    monkeypatch.setattr(run, "launch", launch)
    result = steps.train("pretrain", world, steps.folder_digest(world), "", "", "", str(tmp_path / "m"), 2, "tiny",
                         ["pretrain.max_steps=2"])
    assert launched == [2] and result["steps"] == 7 and in_pod.requests == []

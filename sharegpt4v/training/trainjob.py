"""Multi-node training from a pipeline task: a Kubeflow Trainer `TrainJob`, created and followed.

    run_trainjob(stage, recipe, inputs, out, init, ...) -> StageResult   what `launch()` returns in-pod
    cleanup_trainjobs(kfp_run_id)                        -> names         the exit handler's clean-up

`sharegpt4v.stages.train` calls `run_trainjob` when `compute.num_nodes > 1` (one node trains in the
task's own pod). The TrainJob is `sharegpt4v.cluster.build_trainjob` (the project image, S3/MLflow
credentials from Secrets, the A100 node selector and toleration, /dev/shm) running
`python -m sharegpt4v.training.run` on `num_nodes x gpus_per_node` GPUs into the task's
content-keyed prefix `out`. The task's result is read from `out/final`'s manifest, as in-pod.

One job per prefix. The TrainJob's name is `sharegpt4v-<stage>-<sha256(out)[:12]>`, so Kubernetes
itself refuses a second job on the same prefix in a namespace (409: the loser follows the winner).
At the start, a TrainJob of that name that is
  - running (or suspended, or not started yet): is followed (a retried task re-attaches);
  - complete: gives its result (`final/`), or, without one, is replaced;
  - failed: is deleted, and once it is gone a new one is created; it resumes from the newest complete
    checkpoint in `out` (the trainer resumes by default);
and a complete `final/` returns at once, creating nothing.

Following prints each status transition (conditions, child-job counts) and the rank-0 pod's log
(pods labelled `jobset.sigs.k8s.io/jobset-name=<name>`, `jobset.sigs.k8s.io/replicatedjob-name=node`
(`launcher` for the MPI runtime), `batch.kubernetes.io/job-completion-index=0`: the labels JobSet
and the indexed Job give the pods Kubeflow Trainer creates; container `node`) into the task's log.
A Failed condition fails the task with the trainer's reason and message; SIGTERM (KFP cancelling or
terminating the run) or Ctrl-C deletes the TrainJob before the task exits; the pipeline's exit
handler deletes the TrainJobs labelled with its KFP run id when the run did not succeed.

Labels: `sharegpt4v/stage`, `sharegpt4v/prefix` (= the hash in the name), `sharegpt4v/kfp-run-id`
(`$KFP_RUN_ID`; a re-attaching task of another run takes the job over); annotation `sharegpt4v/out`.
The `kubernetes` client is imported where it is used (as in `sharegpt4v.deploy`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from sharegpt4v import cluster
from sharegpt4v.errors import PlatformError

if TYPE_CHECKING:
    from sharegpt4v.config import RecipeConfig
    from sharegpt4v.training.trainer import StageResult

GROUP, VERSION = cluster.TRAINER_API.split("/")
PLURAL = "trainjobs"
STAGE_LABEL = "sharegpt4v/stage"
PREFIX_LABEL = "sharegpt4v/prefix"
RUN_LABEL = "sharegpt4v/kfp-run-id"
OUT_ANNOTATION = "sharegpt4v/out"
KFP_RUN_ID_ENV = "KFP_RUN_ID"
IMAGE_ENV = "SHAREGPT4V_IMAGE"  # the TrainJob's image; default: the task pod's own, else cluster.TRAIN_IMAGE
RUNTIME_ENV = "SHAREGPT4V_TRAINER_RUNTIME"  # default: the platform's TrainingRuntime (manifests/base/trainer)
POLL_ENV = "SHAREGPT4V_TRAINJOB_POLL_S"  # the longest wait between two looks at the TrainJob
KFP_MAIN_CONTAINER = "main"  # the container of a KFP v2 task pod that runs the component

# Pod labels of the Trainer's JobSet (JobSet and the indexed Job set them); what the Kubeflow SDK selects on.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
TRAINER_CONTAINER = "node"
LOG_TAIL = 200  # lines of the rank-0 log printed when the task first sees a pod (a re-attach skips the rest)
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _print(line: str) -> None:
    print(line, flush=True)  # the task's log in the KFP UI


class TrainJobError(PlatformError):
    """The TrainJob could not be created, followed or read back."""


class TrainJobFailed(TrainJobError):
    """The TrainJob's Failed condition is True: the message carries the trainer's reason."""


class TrainJobCancelled(TrainJobError):
    """The task was told to stop (SIGTERM, Ctrl-C) while it followed a TrainJob; the job was deleted."""


# names and labels -----------------------------------------------------------------------------------


def prefix_hash(out: str) -> str:
    """12 hex digits of the checkpoint prefix: the TrainJob's name suffix and its `sharegpt4v/prefix` label."""
    return hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:12]


def trainjob_name(stage: str, out: str) -> str:
    """`sharegpt4v-<stage>-<prefix hash>`: a DNS-1123 label, short enough for the JobSet's pod names."""
    name = f"sharegpt4v-{stage}-{prefix_hash(out)}"
    if not DNS_LABEL.match(name) or len(name) > 40:
        raise ValueError(f"stage {stage!r}: TrainJob name {name!r} is not a short DNS-1123 label")
    return name


def label_value(text: str) -> str:
    """`text` when it is a valid label value, else 16 hex digits of it."""
    return text if len(text) <= 63 and LABEL_VALUE.match(text) else hashlib.sha256(text.encode()).hexdigest()[:16]


def default_namespace() -> str:
    """The pod's own namespace (its service-account file), else `cluster.NAMESPACE`."""
    from sharegpt4v import deploy

    if deploy.SA_NAMESPACE_FILE.is_file():
        return deploy.SA_NAMESPACE_FILE.read_text().strip()
    return cluster.NAMESPACE


def in_cluster() -> bool:
    """True in a pod (Kubernetes sets KUBERNETES_SERVICE_HOST): where TrainJobs can be looked up."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def render(stage: str, recipe: "RecipeConfig", inputs: Any, out: str, init: str | None = None, *,
           image: str, overrides: list[str] | tuple[str, ...] = (), profile: str | None = None,
           runtime: str | None = None, namespace: str | None = None, kfp_run_id: str | None = None,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """The TrainJob `run_trainjob` creates for this stage and prefix (named, labelled and annotated)."""
    from sharegpt4v.config import available_profiles
    from sharegpt4v.training.trainer import as_stage_inputs

    inputs = as_stage_inputs(inputs)
    profile = profile or recipe.profile
    if profile not in available_profiles():  # the job's pods load the recipe by name from the image
        raise TrainJobError(f"profile {profile!r}: a multi-node TrainJob loads its recipe from the image, so it needs "
                            f"a packaged profile ({', '.join(available_profiles())}) plus overrides, not a file")
    runtime = runtime or os.environ.get(RUNTIME_ENV) or cluster.DEEPSPEED_RUNTIME
    kfp_run_id = os.environ.get(KFP_RUN_ID_ENV, "") if kfp_run_id is None else kfp_run_id
    labels = {PREFIX_LABEL: prefix_hash(out), **({RUN_LABEL: label_value(kfp_run_id)} if kfp_run_id else {})}
    recipe = _with_profile(recipe, profile)
    return cluster.build_trainjob(
        stage, recipe, name=trainjob_name(stage, out), image=image, data=list(inputs.data), out=out, init=init,
        captions=inputs.captions, overrides=list(overrides), runtime=runtime, namespace=namespace,
        split=inputs.split or "", env=[{"name": k, "value": v} for k, v in (env or {}).items()], labels=labels,
        annotations={OUT_ANNOTATION: out},
    )


def _with_profile(recipe: "RecipeConfig", profile: str) -> "RecipeConfig":
    import dataclasses

    return recipe if recipe.profile == profile else dataclasses.replace(recipe, profile=profile)


# the Kubernetes API ----------------------------------------------------------------------------------


class _Kube:
    """TrainJobs (custom objects) and pods of one namespace, through the `kubernetes` client."""

    def __init__(self, kube_client: Any | None, namespace: str) -> None:
        from kubernetes import client

        from sharegpt4v.deploy import _api_client

        api_client = _api_client(kube_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace

    def where(self, name: str) -> str:
        return f"TrainJob {self.namespace}/{name}"

    def _fail(self, what: str, exc: Any) -> TrainJobError:
        return TrainJobError(f"{what}: {exc.status} {exc.reason}")

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise self._fail(self.where(name), exc) from None

    def create(self, body: dict[str, Any]) -> bool:
        """True when created; False when one of that name exists (409)."""
        from kubernetes.client.rest import ApiException

        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise self._fail(f"creating {self.where(body['metadata']['name'])}", exc) from None

    def delete(self, name: str) -> bool:
        """Delete with its JobSet and pods (foreground); False when it was gone already."""
        from kubernetes.client.rest import ApiException

        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                        propagation_policy="Foreground")
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise self._fail(f"deleting {self.where(name)}", exc) from None

    def patch_labels(self, name: str, labels: dict[str, str]) -> None:
        from kubernetes.client.rest import ApiException

        try:
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                       {"metadata": {"labels": labels}})
        except ApiException as exc:
            raise self._fail(f"labelling {self.where(name)}", exc) from None

    def list(self, selector: str) -> list[dict[str, Any]]:
        from kubernetes.client.rest import ApiException

        try:
            found = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                              label_selector=selector)
        except ApiException as exc:
            if exc.status == 404:  # the Trainer's CRD is not installed: there are no TrainJobs
                return []
            raise self._fail(f"listing TrainJobs in {self.namespace} ({selector})", exc) from None
        return list(found.get("items") or [])

    def pods(self, selector: str) -> list[dict[str, Any]]:
        resp = self.core.list_namespaced_pod(self.namespace, label_selector=selector, _preload_content=False)
        return list(json.loads(resp.data).get("items") or [])

    def pod(self, name: str) -> dict[str, Any]:
        return json.loads(self.core.read_namespaced_pod(name, self.namespace, _preload_content=False).data)

    def log(self, pod: str, **kwargs: Any) -> str:
        resp = self.core.read_namespaced_pod_log(pod, self.namespace, container=TRAINER_CONTAINER, timestamps=True,
                                                 _preload_content=False, **kwargs)
        return resp.data.decode("utf-8", "replace")


# TrainJob status ---------------------------------------------------------------------------------------


def _conditions(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in (job.get("status") or {}).get("conditions") or []}


def state(job: dict[str, Any]) -> str:
    """"Complete", "Failed", "Suspended" (its condition is True), else "Running" (created or not yet)."""
    conditions = _conditions(job)
    for kind in ("Failed", "Complete", "Suspended"):
        if conditions.get(kind, {}).get("status") == "True":
            return kind
    return "Running"


def failure(job: dict[str, Any]) -> str:
    c = _conditions(job).get("Failed", {})
    return ": ".join(x for x in (c.get("reason"), c.get("message")) if x) or "no reason given"


def _transitions(job: dict[str, Any], seen: dict[str, tuple[Any, ...]]) -> list[str]:
    """Lines for what changed since `seen` (updated): each condition, each child job's counts."""
    lines = []
    for kind, c in _conditions(job).items():
        key = (c.get("status"), c.get("reason"), c.get("message"))
        if seen.get(f"condition/{kind}") != key:
            seen[f"condition/{kind}"] = key
            detail = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
            lines.append(f"{kind}={c.get('status')}" + (f" ({detail})" if detail else ""))
    for js in (job.get("status") or {}).get("jobsStatus") or []:
        counts = tuple(int(js.get(k) or 0) for k in ("active", "ready", "succeeded", "failed", "suspended"))
        if seen.get(f"jobs/{js.get('name')}") != counts:
            seen[f"jobs/{js.get('name')}"] = counts
            lines.append(f"{js.get('name')}: " + ", ".join(f"{n} {k}" for k, n in zip(
                ("active", "ready", "succeeded", "failed", "suspended"), counts) if n or k == "active"))
    return lines


# the rank-0 log ---------------------------------------------------------------------------------------


_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z$")


def _ts_key(text: str) -> str | None:
    """An RFC 3339 timestamp (kubelet trims the nanoseconds' trailing zeros) as a string that sorts by time."""
    m = _TIMESTAMP.match(text)
    return f"{m.group(1)}.{(m.group(2) or '').ljust(9, '0')}" if m else None


class _RankZeroLog:
    """Prints new lines of the rank-0 pod's log, once each: timestamps say what was printed already."""

    def __init__(self, kube: _Kube, name: str, runtime: str, log: Callable[[str], None]) -> None:
        step = "launcher" if runtime == "deepspeed-distributed" else "node"  # the MPI runtime's rank 0 is its launcher
        self.selector = f"{JOBSET_NAME_LABEL}={name},{REPLICATED_JOB_LABEL}={step},{COMPLETION_INDEX_LABEL}=0"
        self.kube, self.log = kube, log
        self.pod: str | None = None
        self.last = ""
        self.fetched = 0.0

    def poll(self) -> None:
        try:
            pods = [p for p in self.kube.pods(self.selector) if (p.get("status") or {}).get("phase") != "Pending"]
            if not pods:
                return
            pod = max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")["metadata"]["name"]
            first = pod != self.pod
            if first:
                self.pod, self.last = pod, ""
                self.log(f"rank 0: pod {pod}")
            window = {"tail_lines": LOG_TAIL} if first else {"since_seconds": int(time.monotonic() - self.fetched) + 30}
            started = time.monotonic()
            text = self.kube.log(pod, **window)
            self.fetched = started
        except Exception:  # a pod starting or gone, a log not readable yet, a blip: the next poll tries again
            return
        for line in text.splitlines():
            stamp, _, message = line.partition(" ")
            key = _ts_key(stamp)
            if key is None:
                message = line
            elif key <= self.last:
                continue
            else:
                self.last = key
            self.log(f"[rank 0] {message}")


# following ---------------------------------------------------------------------------------------------


def _poll_limit(poll_s: float | None) -> float:
    return float(poll_s if poll_s is not None else os.environ.get(POLL_ENV) or 30.0)


def _follow(kube: _Kube, name: str, runtime: str, *, poll_s: float, timeout_s: float,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Poll until Complete (returns the job) or Failed (raises TrainJobFailed); print what changes."""
    where = kube.where(name)
    seen: dict[str, tuple[Any, ...]] = {}
    logs = _RankZeroLog(kube, name, runtime, log)
    deadline = time.monotonic() + timeout_s
    wait = min(1.0, poll_s)
    errors = 0
    while True:
        try:
            job = kube.get(name)
            errors = 0
        except Exception as exc:  # the API server restarting, a network blip: try a few more times
            errors += 1
            if errors >= 5:
                text = str(exc) if isinstance(exc, TrainJobError) else f"{where}: {exc}"
                raise TrainJobError(f"{text} (while following it; a retried task re-attaches)") from None
            time.sleep(wait)
            continue
        if job is None:
            raise TrainJobError(f"{where} was deleted while this task followed it")
        changed = _transitions(job, seen)
        for line in changed:
            log(f"{where}: {line}")
        logs.poll()
        current = state(job)
        if current == "Complete":
            return job
        if current == "Failed":
            raise TrainJobFailed(f"{where} failed: {failure(job)}")
        if time.monotonic() >= deadline:
            kube.delete(name)
            raise TrainJobError(f"{where} did not finish within {timeout_s:.0f}s; deleted it")
        wait = min(1.0, poll_s) if changed else min(wait * 2, poll_s)
        time.sleep(wait)


def _wait_gone(kube: _Kube, name: str, poll_s: float, timeout_s: float = 900.0) -> None:
    """Until the TrainJob (and with foreground deletion its JobSet and pods) is gone: never two jobs on a prefix."""
    deadline = time.monotonic() + timeout_s
    wait = min(1.0, poll_s)
    while kube.get(name) is not None:
        if time.monotonic() >= deadline:
            raise TrainJobError(f"{kube.where(name)} is still being deleted after {timeout_s:.0f}s; "
                                "a new job on its prefix waits until it is gone (retry the task)")
        time.sleep(wait)
        wait = min(wait * 2, poll_s)


class _Stop(BaseException):
    """Raised by the SIGTERM handler inside the follow loop (a BaseException: nothing on the way swallows it)."""


@contextlib.contextmanager
def _deleted_on_stop(kube: _Kube, name: str, log: Callable[[str], None]) -> Iterator[None]:
    """SIGTERM (KFP cancels or terminates the run: the pod is stopped) or Ctrl-C deletes the TrainJob."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None

    def stop(signum: int, frame: Any) -> None:
        raise _Stop()

    if main:
        signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except (_Stop, KeyboardInterrupt) as exc:
        why = "SIGTERM" if isinstance(exc, _Stop) else "interrupted"
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the deletion short
        log(f"{kube.where(name)}: {why}: deleting it")
        kube.delete(name)
        raise TrainJobCancelled(f"{kube.where(name)}: the task was stopped ({why}); the TrainJob was deleted") from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# the task's entry points ---------------------------------------------------------------------------------


def _result(out: str, stage: str, made_from: dict[str, Any]) -> "StageResult | None":
    from sharegpt4v.training.trainer import finished_result

    return finished_result(out, stage, made_from)


def _own_image(kube: _Kube) -> str | None:
    """The image of this task's container (KFP runs the component in container `main`), when in a pod."""
    pod = os.environ.get("HOSTNAME")
    if not (in_cluster() and pod):
        return None
    try:
        containers = (kube.pod(pod).get("spec") or {}).get("containers") or []
    except Exception:  # not allowed, not a KFP pod: fall back to the configured image
        return None
    return next((c.get("image") for c in containers if c.get("name") == KFP_MAIN_CONTAINER), None)


def run_trainjob(stage: str, recipe: "RecipeConfig", inputs: Any, out: str, init: str | None = None, *,
                 overrides: list[str] | tuple[str, ...] = (), profile: str | None = None, image: str | None = None,
                 namespace: str | None = None, runtime: str | None = None, kube_client: Any | None = None,
                 poll_s: float | None = None, timeout_s: float = 14 * 24 * 3600.0,
                 log: Callable[[str], None] = _print) -> "StageResult":
    """Train `stage` into `out` as a TrainJob on `compute.num_nodes` nodes; returns its StageResult.

    `overrides` and `profile` (default `recipe.profile`, a packaged profile) rebuild the recipe in the
    job's pods. `image`: default `$SHAREGPT4V_IMAGE`, else this task pod's own image, else
    `cluster.TRAIN_IMAGE`. `namespace`: default the pod's own, else `cluster.NAMESPACE`. `runtime`:
    default `$SHAREGPT4V_TRAINER_RUNTIME`, else the platform's `sharegpt4v-deepspeed`. `poll_s`: the
    longest wait between two looks (default `$SHAREGPT4V_TRAINJOB_POLL_S` or 30 s; it starts at 1 s
    after each change). See the module docstring for re-attaching and the one-job-per-prefix rule.
    """
    from sharegpt4v import tracking
    from sharegpt4v.training.checkpoint import stage_made_from
    from sharegpt4v.training.trainer import as_stage_inputs

    inputs = as_stage_inputs(inputs)
    made_from = stage_made_from(stage, recipe, inputs, init)
    done = _result(out, stage, made_from)
    if done is not None:
        log(f"{stage}: {done.checkpoint_uri} is complete ({done.steps} steps); no TrainJob needed")
        return done
    poll = _poll_limit(poll_s)
    kube = _Kube(kube_client, namespace or default_namespace())
    image = image or os.environ.get(IMAGE_ENV) or _own_image(kube) or cluster.TRAIN_IMAGE
    env = {k: os.environ[k] for k in (tracking.PARENT_RUN_ENV, "MLFLOW_EXPERIMENT_NAME", KFP_RUN_ID_ENV)
           if os.environ.get(k)}  # the stage's MLflow run nests under this task's run, in the same experiment
    body = render(stage, recipe, inputs, out, init, image=image, overrides=overrides, profile=profile, runtime=runtime,
                  namespace=kube.namespace, env=env)
    name = body["metadata"]["name"]
    runtime = body["spec"]["runtimeRef"]["name"]
    where = kube.where(name)
    with _deleted_on_stop(kube, name, log):
        job = kube.get(name)
        if job is not None:
            adopted = _adopt(kube, job, body, out, stage, made_from, poll, log)
            if adopted is not None and not isinstance(adopted, dict):
                return adopted  # complete already
            job = adopted
        if job is None:
            nodes, per_node = recipe.compute.num_nodes, recipe.compute.gpus_per_node
            if kube.create(body):
                log(f"{where}: created ({nodes} nodes x {per_node} GPUs, runtime {runtime}, image {image}) -> {out}")
            else:
                log(f"{where}: created by another task meanwhile; following it (one job per prefix)")
        _follow(kube, name, runtime, poll_s=poll, timeout_s=timeout_s, log=log)
    result = _result(out, stage, made_from)
    if result is None:
        raise TrainJobError(f"{where} is complete but {out.rstrip('/')}/final has no complete {stage} manifest")
    log(f"{where}: complete: {result.steps} steps, final loss {result.final_loss:.4f} -> {result.checkpoint_uri}")
    return result


def _adopt(kube: _Kube, job: dict[str, Any], body: dict[str, Any], out: str, stage: str, made_from: dict[str, Any],
           poll: float, log: Callable[[str], None]) -> "dict[str, Any] | None | StageResult":
    """What to do with the TrainJob of this name found at the start: follow it (returned), a result,
    or None (it was deleted: create a new one)."""
    name = job["metadata"]["name"]
    where = kube.where(name)
    theirs = (job["metadata"].get("annotations") or {}).get(OUT_ANNOTATION)
    if theirs is not None and theirs.rstrip("/") != out.rstrip("/"):
        raise TrainJobError(f"{where} trains into {theirs}, not {out}: a name clash; delete it by hand")
    current = state(job)
    if current == "Complete":
        result = _result(out, stage, made_from)
        if result is not None:
            log(f"{where}: complete already -> {result.checkpoint_uri}")
            return result
        log(f"{where}: complete but {out.rstrip('/')}/final is not: replacing it")
    elif current == "Failed":
        log(f"{where}: failed before ({failure(job)}): deleting it; a new one resumes from the newest checkpoint")
    else:
        log(f"{where}: {current.lower()} already: re-attaching (no second job on {out})")
        run = (body["metadata"].get("labels") or {}).get(RUN_LABEL)
        if run and (job["metadata"].get("labels") or {}).get(RUN_LABEL) != run:
            kube.patch_labels(name, {RUN_LABEL: run})  # this run's exit handler now owns it
        return job
    kube.delete(name)
    _wait_gone(kube, name, poll)
    return None


def cleanup_trainjobs(kfp_run_id: str, *, namespace: str | None = None, kube_client: Any | None = None,
                      log: Callable[[str], None] = _print) -> list[str]:
    """Delete the unfinished TrainJobs labelled with this KFP run id (the exit handler of a run that did not
    succeed); returns their names. Complete ones stay (their checkpoints are done)."""
    if not kfp_run_id:
        return []
    kube = _Kube(kube_client, namespace or default_namespace())
    deleted = []
    for job in kube.list(f"{RUN_LABEL}={label_value(kfp_run_id)}"):
        name = job["metadata"]["name"]
        if state(job) == "Complete":
            continue
        if kube.delete(name):
            log(f"{kube.where(name)}: deleted (KFP run {kfp_run_id} ended without success)")
            deleted.append(name)
    return deleted

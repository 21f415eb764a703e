"""A recording fake of the Kubernetes API server on loopback, for the deploy step and the TrainJob follower.

Custom objects and pods are kept by path; every request is recorded as (method, path, content type,
body), its query string in `queries`. GET answers an object or, on a collection, a list filtered by
`labelSelector` (equality terms); POST creates (409 if the name exists); PATCH applies a JSON merge
patch (415 for any other patch type); DELETE removes (with `delete_delay` GETs of grace during which
the object carries a deletionTimestamp, like a foreground deletion) and answers 404 when missing.
`fail` maps a method to a status it answers instead.

TrainJobs play a scripted lifecycle: each GET of a TrainJob moves it one phase along `script`
(created -> running -> succeeded / failed / suspended / deleted; the last phase stays). Running puts
the JobSet's two node pods there (labels as JobSet and the indexed Job set them) and appends a line
to each one's log (`GET .../pods/<pod>/log`, with kubelet-style RFC 3339 timestamps when asked); on
succeeded `on_complete(trainjob)` runs first (a test writes the checkpoint there), then the Complete
condition is set. The statuses follow the TrainJob CRD (conditions with reason, message and
lastTransitionTime; jobsStatus counts).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.json_http import JsonHandler

TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs"
PODS = "/api/v1/namespaces/{ns}/pods"
COLLECTIONS = ("trainjobs", "pods", "inferenceservices")
EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)

CREATED = ("Created", "True", "JobsCreationSucceeded", "Succeeded to create Jobs")
COMPLETE = ("Complete", "True", "AllJobsCompleted", "jobset completed successfully")
FAILED = ("Failed", "True", "FailedJobs", "jobset failed due to one or more job failures")
SUSPENDED = ("Suspended", "True", "Suspended", "TrainJob is suspended")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def rfc3339(moment: datetime) -> str:
    """As kubelet writes log timestamps (RFC 3339 with nanoseconds, trailing zeros trimmed)."""
    base = moment.strftime("%Y-%m-%dT%H:%M:%S")
    nanos = f"{moment.microsecond * 1000:09d}".rstrip("0")
    return f"{base}.{nanos}Z" if nanos else f"{base}Z"


def condition(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2025-01-01T00:00:00Z"}


def matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKubeApiServer:
    """Test double of the Kubernetes API server (see the module docstring)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str | None, Any]] = []
        self.queries: list[dict[str, list[str]]] = []
        self.fail: dict[str, int] = {}
        self.logs: dict[str, list[tuple[str, str]]] = {}  # pod name -> [(timestamp, line)]
        self.script: list[str] = ["created", "running", "running", "succeeded"]
        self.failure: tuple[str, str] = ("FailedJobs", "jobset failed due to one or more job failures")
        self.on_complete: Callable[[dict[str, Any]], None] | None = None
        self.on_phase: Callable[[str, dict[str, Any]], None] | None = None  # after each phase is applied
        self.before_post: Callable[[str, dict[str, Any]], None] | None = None
        self.delete_delay = 0
        self.phases: dict[str, list[str]] = {}  # TrainJob path -> phases played so far
        self._left: dict[str, list[str]] = {}
        self._dying: dict[str, int] = {}
        self._clock = 0
        self._uid = 0
        self.lock = threading.RLock()
        fake = self

        class Handler(JsonHandler):

            def _status(self, code: int, reason: str) -> None:
                self._reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                                   "code": code})

            def _text(self, text: str) -> None:
                data = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                url = urlsplit(self.path)
                path, query = url.path, parse_qs(url.query)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with fake.lock:
                    fake.requests.append((method, path, self.headers.get("Content-Type"), body))
                    fake.queries.append(query)
                    if method in fake.fail:
                        return self._status(fake.fail[method], "Forbidden")
                    return getattr(self, f"_{method.lower()}")(path, query, body)

            def _get(self, path: str, query: dict[str, list[str]], body: Any) -> None:
                if path.endswith("/log"):
                    pod = path.rsplit("/", 2)[-2]
                    if pod not in fake.logs:
                        return self._status(404, "NotFound")
                    lines = fake.logs[pod]
                    if "tailLines" in query:
                        lines = lines[-int(query["tailLines"][0]):]
                    stamps = query.get("timestamps", [""])[0].lower() == "true"  # the Python client sends "True"
                    return self._text("".join(f"{ts} {line}\n" if stamps else f"{line}\n" for ts, line in lines))
                if path in fake.objects:
                    fake._on_get(path)
                    if path in fake.objects:
                        return self._reply(200, fake.objects[path])
                    return self._status(404, "NotFound")
                items = [o for key, o in sorted(fake.objects.items()) if key.rsplit("/", 1)[0] == path]
                if items or path.rsplit("/", 1)[-1] in COLLECTIONS:
                    selector = query.get("labelSelector", [""])[0]
                    items = [o for o in items if matches(o["metadata"].get("labels") or {}, selector)]
                    return self._reply(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items})
                return self._status(404, "NotFound")

            def _post(self, path: str, query: dict[str, list[str]], body: Any) -> None:
                key = f"{path}/{body['metadata']['name']}"
                if fake.before_post:
                    fake.before_post(key, body)
                if key in fake.objects:
                    return self._status(409, "AlreadyExists")
                fake.add(key, body)
                return self._reply(201, fake.objects[key])

            def _patch(self, path: str, query: dict[str, list[str]], body: Any) -> None:
                if self.headers.get("Content-Type") != "application/merge-patch+json":
                    return self._status(415, "UnsupportedMediaType")
                if path not in fake.objects:
                    return self._status(404, "NotFound")
                fake.objects[path] = merge_patch(fake.objects[path], body)
                return self._reply(200, fake.objects[path])

            def _delete(self, path: str, query: dict[str, list[str]], body: Any) -> None:
                if path not in fake.objects:
                    return self._status(404, "NotFound")
                fake.delete(path)
                return self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PATCH(self) -> None:
                self._handle("PATCH")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeKubeApiServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def client(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    def kubeconfig(self) -> dict[str, Any]:
        """A kubeconfig pointing at this server (for code that loads its own configuration)."""
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "u", "user": {"token": "test-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
        }

    def methods(self) -> list[str]:
        return [method for method, *_ in self.requests]

    def calls(self, resource: str = "trainjobs") -> list[tuple[str, str]]:
        """(method, path) of the requests on one kind of resource (its collection or its objects)."""
        return [(m, p) for m, p, *_ in self.requests if f"/{resource}" in p]

    # state changes (also for tests that set the scene) -------------------------------------------------

    def _now(self) -> datetime:
        self._clock += 1
        return EPOCH + timedelta(milliseconds=100 * self._clock)

    def add(self, key: str, body: dict[str, Any], phases: list[str] | None = None) -> dict[str, Any]:
        """Store an object as the API server would create it; a TrainJob starts `phases` (default `script`)."""
        with self.lock:
            self._uid += 1
            ns = key.split("/namespaces/", 1)[1].split("/", 1)[0]
            self.objects[key] = merge_patch(body, {"metadata": {
                "uid": f"uid-{self._uid}", "resourceVersion": "1", "namespace": ns,
                "creationTimestamp": self._now().strftime("%Y-%m-%dT%H:%M:%SZ")}})
            if "/trainjobs/" in key:
                self._left[key] = list(self.script if phases is None else phases)
                self.phases[key] = []
            return self.objects[key]

    def delete(self, key: str) -> None:
        with self.lock:
            if self.delete_delay and key not in self._dying:
                self._dying[key] = self.delete_delay
                self.objects[key]["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
                return
            self._gone(key)

    def _gone(self, key: str) -> None:
        obj = self.objects.pop(key, None)
        self._dying.pop(key, None)
        self._left.pop(key, None)
        if obj and "/trainjobs/" in key:
            for pod_key in [k for k, o in self.objects.items() if "/pods/" in k and
                            (o["metadata"].get("labels") or {}).get("jobset.sigs.k8s.io/jobset-name") ==
                            obj["metadata"]["name"]]:
                self.objects.pop(pod_key)

    def _on_get(self, key: str) -> None:
        if key in self._dying:
            self._dying[key] -= 1
            if self._dying[key] < 0:
                self._gone(key)
            return
        if "/trainjobs/" not in key or not self._left.get(key):
            return
        phase = self._left[key].pop(0) if len(self._left[key]) > 1 else self._left[key][0]
        self.play(key, phase)

    def play(self, key: str, phase: str) -> None:
        """Move the TrainJob at `key` to `phase` (what the Trainer's controller and the pods would do)."""
        with self.lock:
            job = self.objects[key]
            name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
            nodes = int(job["spec"]["trainer"].get("numNodes") or 1)
            self.phases[key].append(phase)
            created = condition(*CREATED)
            if phase == "created":
                job["status"] = {"conditions": [created]}
            elif phase == "running":
                pods = self._pods(ns, name, nodes, "Running")
                for index, pod in enumerate(pods):
                    step = len(self.logs[pod])
                    self.logs[pod].append((rfc3339(self._now()), f"rank {index * 8}: step {step} loss {2.0 / (step + 1):.4f}"))
                job["status"] = {"conditions": [created], "jobsStatus": [_jobs(active=nodes, ready=nodes)]}
            elif phase == "succeeded":
                if self.on_complete:
                    self.on_complete(job)
                for index, pod in enumerate(self._pods(ns, name, nodes, "Succeeded")):
                    self.logs[pod].append((rfc3339(self._now()), f"rank {index * 8}: done"))
                job["status"] = {"conditions": [created, condition(*COMPLETE)],
                                 "jobsStatus": [_jobs(succeeded=nodes)]}
            elif phase == "failed":
                for index, pod in enumerate(self._pods(ns, name, nodes, "Failed")):
                    self.logs[pod].append((rfc3339(self._now()), f"rank {index * 8}: Traceback: CUDA error: out of memory"))
                job["status"] = {"conditions": [created, condition("Failed", "True", *self.failure)],
                                 "jobsStatus": [_jobs(failed=nodes)]}
            elif phase == "suspended":
                job["status"] = {"conditions": [created, condition(*SUSPENDED)],
                                 "jobsStatus": [_jobs(suspended=nodes)]}
            elif phase == "deleted":
                self._gone(key)
            else:
                raise ValueError(f"unknown TrainJob phase {phase!r}")
            if self.on_phase:
                self.on_phase(phase, job)

    def _pods(self, ns: str, name: str, nodes: int, phase: str) -> list[str]:
        """The JobSet's node pods, one per node (index = node rank), in `phase`; their names."""
        names = []
        for index in range(nodes):
            pod = f"{name}-node-0-{index}-abcde"
            key = f"{PODS.format(ns=ns)}/{pod}"
            if key not in self.objects:
                self.objects[key] = {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod, "namespace": ns, "creationTimestamp": "2025-01-01T00:00:01Z", "labels": {
                        "jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                        "jobset.sigs.k8s.io/job-index": "0", "batch.kubernetes.io/job-completion-index": str(index),
                        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                    "spec": {"containers": [{"name": "node", "image": "sharegpt4v/train:0.1.0"}]},
                    "status": {},
                }
                self.logs.setdefault(pod, [])
            self.objects[key]["status"] = {"phase": phase}
            names.append(pod)
        return names


def _jobs(**counts: int) -> dict[str, Any]:
    return {"name": "node", **{k: counts.get(k, 0) for k in ("active", "ready", "succeeded", "failed", "suspended")}}

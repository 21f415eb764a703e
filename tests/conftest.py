"""Shared fixtures: a real S3 server (SeaweedFS) for the session, per-test prefixes, MLflow."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sharegpt4v import services
from tests.faulty_proxy import FaultyProxy

TEST_BUCKET = "test-bucket"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.LocalS3]:
    server = services.start_s3(tmp_path_factory.mktemp("seaweedfs"), buckets=(TEST_BUCKET, "other-bucket"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: services.LocalS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The S3 server's endpoint and keys in os.environ for this test (and its subprocesses)."""
    for key in list(os.environ):
        if key.startswith("AWS_") or key in ("S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
            monkeypatch.delenv(key)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SHAREGPT4V_S3_MAX_ATTEMPTS", "4")
    return s3_server.env


@pytest.fixture
def proxy(s3_server: services.LocalS3, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyProxy]:
    """The S3 server behind a fault-injecting proxy (tests/faulty_proxy.py), as this test's endpoint."""
    proxy = FaultyProxy(s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.close()


@pytest.fixture
def s3_uri(s3_env: dict[str, str], request: pytest.FixtureRequest) -> str:
    """A fresh, empty prefix in the test bucket."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:40]
    return f"s3://{TEST_BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Run a test against a local folder and against the real S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_uri")


@pytest.fixture
def mlflow_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """MLflow on a sqlite file, switched on for this test through the environment (and for mlflow's own
    in-process API, whose global URI an earlier test may have pointed at its own database)."""
    import mlflow

    service = services.start_mlflow(tmp_path / "mlflow")
    for key, value in service.env.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(service.tracking_uri)
    yield service.tracking_uri
    mlflow.set_tracking_uri("")

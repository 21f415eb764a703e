"""Embedded services: SeaweedFS S3 and MLflow start on loopback and stop with their process group."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from sharegpt4v import services, storage


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_s3_starts_on_loopback_and_stops_cleanly(tmp_path, monkeypatch) -> None:
    server = services.start_s3(tmp_path / "s3", buckets=("alpha", "beta"))
    try:
        assert server.endpoint.startswith("http://127.0.0.1:")
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        storage.open_store("s3://beta/x").put_bytes("k", b"v")
        assert storage.open_store("s3://beta/x").get_bytes("k") == b"v"
        proc = psutil.Process(server.process.pid)
        listening = [c.laddr for p in [proc, *proc.children(recursive=True)] for c in p.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        assert len(listening) >= 4, listening
        assert {addr.ip for addr in listening} == {"127.0.0.1"}  # nothing on 0.0.0.0
    finally:
        server.stop()
    assert server.process.poll() is not None
    deadline = time.monotonic() + 5
    while _group_alive(server.process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(server.process.pid)


def test_invalid_bucket_name_is_refused(tmp_path) -> None:
    with pytest.raises(services.ServiceError, match="3-63"):
        services.start_s3(tmp_path, buckets=("ab",))


def test_mlflow_sqlite_tracks_runs(tmp_path) -> None:
    import mlflow

    service = services.start_mlflow(tmp_path / "mlflow")
    assert service.tracking_uri.startswith("sqlite:///") and service.process is None
    mlflow.set_tracking_uri(service.tracking_uri)
    mlflow.set_experiment("services-test")
    with mlflow.start_run() as run:
        mlflow.log_metric("m", 1.5)
    assert mlflow.get_run(run.info.run_id).data.metrics["m"] == 1.5
    assert (tmp_path / "mlflow" / "mlflow.db").exists()


@pytest.mark.slow
def test_mlflow_server_stores_artifacts_in_s3(tmp_path, s3_server, s3_env, monkeypatch) -> None:
    import mlflow

    service = services.start_mlflow(
        tmp_path / "mlflow", server=True, artifacts_uri="s3://other-bucket/mlflow", s3_env=s3_server.env
    )
    try:
        assert service.tracking_uri.startswith("http://127.0.0.1:")
        mlflow.set_tracking_uri(service.tracking_uri)
        mlflow.set_experiment("server-test")
        (tmp_path / "note.txt").write_text("artifact body")
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(tmp_path / "note.txt"))
        keys = [o.key for o in storage.open_store("s3://other-bucket/mlflow").list()]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
    finally:
        service.stop()
        mlflow.set_tracking_uri("")
    assert service.process.poll() is not None


def test_restarted_s3_keeps_data_and_credentials(tmp_path, monkeypatch) -> None:
    first = services.start_s3(tmp_path / "s3", buckets=("keep",))
    for key, value in first.env.items():
        monkeypatch.setenv(key, value)
    try:
        storage.open_store("s3://keep").put_bytes("object.txt", b"still here")
    finally:
        first.stop()
    second = services.start_s3(tmp_path / "s3", buckets=("keep",))
    try:
        assert second.access_key == first.access_key
        for key, value in second.env.items():
            monkeypatch.setenv(key, value)
        assert storage.open_store("s3://keep").get_bytes("object.txt") == b"still here"
    finally:
        second.stop()

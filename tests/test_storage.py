"""Object store API against a local folder and the real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import boto3
import pytest

from sharegpt4v import storage, storage_s3
from sharegpt4v.storage import (
    BucketNotFound,
    CredentialsError,
    IncompleteFolder,
    ObjectNotFound,
    StoreError,
    open_store,
)
from tests.faulty_proxy import FaultyProxy


def test_put_get_exists_list_delete(store_uri: str, tmp_path) -> None:
    store = open_store(store_uri)
    store.put_bytes("a/one.txt", b"1")
    store.put_bytes("a/b/two.txt", b"22")
    store.put_bytes("three.txt", b"333")
    assert store.get_bytes("a/b/two.txt") == b"22"
    assert store.exists("a/one.txt") and not store.exists("a/nope.txt")
    assert [(o.key, o.size) for o in store.list()] == [("a/b/two.txt", 2), ("a/one.txt", 1), ("three.txt", 3)]
    assert [o.key for o in store.list("a")] == ["a/b/two.txt", "a/one.txt"]
    assert store.size("three.txt") == 3
    store.get_file("a/one.txt", tmp_path / "down" / "one.txt")
    assert (tmp_path / "down" / "one.txt").read_bytes() == b"1"
    store.delete("three.txt")
    assert not store.exists("three.txt")
    assert store.delete_prefix("a") == 2
    assert list(store.list()) == []


def test_streaming_read_in_chunks(store_uri: str) -> None:
    store = open_store(store_uri)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    store.put_bytes("big.bin", payload)
    digest = hashlib.sha256()
    with store.open("big.bin") as stream:
        while chunk := stream.read(64 * 1024):
            assert len(chunk) <= 64 * 1024
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert store.sha256("big.bin") == (hashlib.sha256(payload).hexdigest(), len(payload))


def test_writer_publishes_only_on_success(store_uri: str) -> None:
    store = open_store(store_uri)
    with pytest.raises(RuntimeError):
        with store.writer("half.bin") as out:
            out.write(b"x" * 1000)
            raise RuntimeError("writer died")
    assert not store.exists("half.bin")
    assert list(store.list()) == []
    with store.writer("whole.bin") as out:
        out.write(b"y" * 1000)
    assert store.get_bytes("whole.bin") == b"y" * 1000


@pytest.mark.parametrize("key", ["../escape.txt", "/etc/passwd", "a/../../b", "a/./b", "a\\b"])
def test_unsafe_keys_are_refused(store_uri: str, key: str) -> None:
    with pytest.raises(ValueError, match="unsafe key"):
        open_store(store_uri).put_bytes(key, b"x")


def test_missing_object_is_a_clear_error(store_uri: str) -> None:
    store = open_store(store_uri)
    store.put_bytes("present.txt", b"x")  # the folder / prefix exists
    with pytest.raises(ObjectNotFound, match="missing.txt"):
        store.get_bytes("missing.txt")


def test_folder_manifest_marks_completion_and_detects_corruption(store_uri: str) -> None:
    store = open_store(store_uri)
    store.put_bytes("ckpt/model.safetensors", b"weights")
    store.put_bytes("ckpt/config.json", b"{}")
    assert not store.is_complete("ckpt")
    with pytest.raises(IncompleteFolder, match="incomplete"):
        store.read_manifest("ckpt")
    manifest = store.commit_folder("ckpt", step=7)
    assert store.is_complete("ckpt")
    assert manifest["step"] == 7
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        "config.json": hashlib.sha256(b"{}").hexdigest(),
        "model.safetensors": hashlib.sha256(b"weights").hexdigest(),
    }
    assert store.verify_folder("ckpt") == []
    store.put_bytes("ckpt/model.safetensors", b"tampered")
    store.delete("ckpt/config.json")
    assert sorted(store.verify_folder("ckpt")) == ["config.json: missing", "model.safetensors: sha256/size mismatch"]


# S3-specific failures ------------------------------------------------------------------


def test_missing_bucket(s3_env) -> None:
    with pytest.raises(BucketNotFound, match="bucket 'no-such-bucket' does not exist"):
        open_store("s3://no-such-bucket/x").get_bytes("k")
    with pytest.raises(BucketNotFound):
        open_store("s3://no-such-bucket/x").exists("k")


def test_bad_and_missing_credentials(s3_uri: str, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(CredentialsError, match="AWS_ACCESS_KEY_ID"):
        open_store(s3_uri).put_bytes("x", b"1")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CredentialsError, match="no S3 credentials"):
        open_store(s3_uri).get_bytes("x")


def test_unreachable_endpoint(s3_env, monkeypatch) -> None:
    from sharegpt4v.services import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("SHAREGPT4V_S3_MAX_ATTEMPTS", "2")
    with pytest.raises(StoreError, match="cannot reach S3 endpoint"):
        open_store("s3://test-bucket/x").get_bytes("k")


def test_transient_errors_are_retried(proxy, s3_uri: str) -> None:
    store = open_store(s3_uri)
    proxy.fail_next(2, status=503)
    store.put_bytes("retried.txt", b"made it")
    proxy.fail_next(2, status=500)
    assert store.get_bytes("retried.txt") == b"made it"
    assert proxy.faults_served == 4


def test_persistent_errors_give_up_with_a_clear_error(proxy, s3_uri: str, monkeypatch) -> None:
    monkeypatch.setenv("SHAREGPT4V_S3_MAX_ATTEMPTS", "3")
    proxy.fail_next(100, status=503)
    with pytest.raises(StoreError, match="S3 error"):
        open_store(s3_uri).put_bytes("never.txt", b"x")
    assert proxy.faults_served == 3  # one call, three attempts


def test_broken_stream_resumes_with_a_range_request(proxy, s3_uri: str) -> None:
    store = open_store(s3_uri)
    payload = os.urandom(2 * 1024 * 1024)
    store.put_bytes("stream.bin", payload)
    proxy.cut_next_get(after_bytes=300_000)
    with store.open("stream.bin") as stream:
        assert stream.read() == payload
    ranges = [h.get("Range") or h.get("range") for m, p, h in proxy.requests if m == "GET"]
    assert ranges[-1] is not None and ranges[-1].startswith("bytes=")


# interrupted writes ----------------------------------------------------------------------

_WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from sharegpt4v.storage import open_store
    store = open_store(sys.argv[1])
    with store.writer("big.bin") as out:
        for _ in range(int(sys.argv[2])):
            out.write(b"z" * (1 << 20))
        print("written", flush=True)
        if sys.argv[3] == "hang":
            time.sleep(60)
    print("published", flush=True)
    """
)


def _start_writer(uri: str, megabytes: int, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER_SCRIPT, uri, str(megabytes), mode], stdout=subprocess.PIPE, text=True
    )


def test_killed_writer_leaves_nothing_visible_local(tmp_path) -> None:
    uri = str(tmp_path / "store")
    proc = _start_writer(uri, 4, "hang")
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = open_store(uri)
    assert not store.exists("big.bin")
    assert list(store.list()) == []


def test_killed_multipart_upload_leaves_nothing_visible_s3(proxy, s3_uri: str) -> None:
    """SIGKILL during a multipart upload (slowed down by the proxy): no object, no listing."""
    proxy.delay = 0.3
    proc = _start_writer(s3_uri, 130, "go")  # > 64 MB: multipart
    assert proc.stdout.readline().strip() == "written"
    deadline = time.monotonic() + 60
    while not any(m == "POST" and "uploads" in p for m, p, _ in proxy.requests):
        assert time.monotonic() < deadline and proc.poll() is None, "upload never started"
        time.sleep(0.01)
    time.sleep(0.5)  # some parts are in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proxy.delay = 0
    store = open_store(s3_uri)
    assert not store.exists("big.bin")
    assert list(store.list()) == []
    # The unfinished upload exists server-side but is invisible to readers.
    bucket, prefix = s3_uri[5:].split("/", 1)
    uploads = storage_s3.s3_client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [f"{prefix}/big.bin"]


def test_open_store_rejects_unknown_schemes() -> None:
    with pytest.raises(StoreError, match="unsupported scheme"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="no bucket"):
        open_store("s3:///x")


def test_resolve_keeps_absolute_and_joins_relative() -> None:
    assert storage.resolve("s3://b/data", "train-000000.tar") == "s3://b/data/train-000000.tar"
    assert storage.resolve("s3://b/data", "s3://c/x.tar") == "s3://c/x.tar"
    assert storage.resolve("/data/set", "/abs/x.tar") == "/abs/x.tar"


def test_boto3_sees_the_same_objects(s3_uri: str) -> None:
    """What the store writes is plain S3: any client (KServe, MLflow, aws cli) reads it."""
    open_store(s3_uri).put_bytes("plain.txt", b"interop")
    bucket, prefix = s3_uri[5:].split("/", 1)
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    assert client.get_object(Bucket=bucket, Key=f"{prefix}/plain.txt")["Body"].read() == b"interop"


# per-key failures of DeleteObjects, local folders of get_file ------------------------------------


def _fail_deletes(proxy: FaultyProxy, key: str, code: str, times: int) -> list[int]:
    """Make the next `times` DeleteObjects answers list `key` as failed with `code` (the server did
    delete it: the answer is what the proxy changes). Returns a counter of DeleteObjects calls."""
    calls = [0]

    def rewrite(method: str, path: str, body: bytes) -> bytes | None:
        if method != "POST" or "delete" not in path:
            return None
        calls[0] += 1
        if calls[0] > times:
            return None
        error = f"<Error><Key>{key}</Key><Code>{code}</Code><Message>injected {code}</Message></Error>"
        return body.replace(b"</DeleteResult>", error.encode() + b"</DeleteResult>")

    proxy.rewrite = rewrite
    return calls


def _three_objects(s3_uri: str):
    store = open_store(s3_uri)
    for name in ("a.txt", "b.txt", "c.txt"):
        store.put_bytes(f"dir/{name}", b"x")
    return store, f"{s3_uri[len('s3://test-bucket/'):]}/dir/b.txt"


def test_delete_prefix_retries_keys_that_failed_transiently(proxy, s3_uri: str, monkeypatch) -> None:
    monkeypatch.setattr(storage_s3, "_backoff_delay", lambda attempt: 0.0)
    store, failing = _three_objects(s3_uri)
    calls = _fail_deletes(proxy, failing, "InternalError", times=2)
    assert store.delete_prefix("dir") == 3
    assert calls[0] == 3  # the batch, then the failed key twice more
    assert list(store.list()) == []


def test_delete_prefix_raises_on_a_key_that_failed(proxy, s3_uri: str, monkeypatch) -> None:
    monkeypatch.setattr(storage_s3, "_backoff_delay", lambda attempt: 0.0)
    store, failing = _three_objects(s3_uri)
    calls = _fail_deletes(proxy, failing, "AccessDenied", times=1)
    with pytest.raises(StoreError, match=rf"1 of 3 objects not deleted; first: s3://test-bucket/{failing} "
                                         r"\(AccessDenied: injected AccessDenied\)"):
        store.delete_prefix("dir")
    assert calls[0] == 1  # a permanent failure is not sent again

    store.put_bytes("dir/b.txt", b"x")
    calls = _fail_deletes(proxy, failing, "SlowDown", times=100)
    with pytest.raises(StoreError, match=r"1 of 1 objects not deleted after 5 attempts; .*SlowDown"):
        store.delete_prefix("dir")
    assert calls[0] == 5


@pytest.mark.parametrize("key", ["../escape.txt", "missing/file.txt"])
def test_get_file_with_a_bad_key_creates_no_folder(store_uri: str, tmp_path, key: str) -> None:
    store = open_store(store_uri)
    store.put_bytes("present.txt", b"x")
    with pytest.raises((ValueError, ObjectNotFound)):
        store.get_file(key, tmp_path / "down" / "deeper" / "file.txt")
    assert not (tmp_path / "down").exists()

"""The S3 backend of `sharegpt4v.storage` (any S3 endpoint: MinIO, SeaweedFS, AWS): `open_store`
returns an `S3Store` for `s3://bucket/prefix`. Endpoint and keys come from the environment; transient
errors are retried by botocore's "standard" mode; a streaming read that breaks resumes with a ranged
GET; outages and missing credentials are translated into the storage errors callers handle."""

from __future__ import annotations

import io
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sharegpt4v.storage import (
    _CHUNK,
    BucketNotFound,
    CredentialsError,
    ObjectInfo,
    ObjectNotFound,
    Store,
    StoreError,
    StoreUnavailable,
    check_key,
    join,
)

# S3 error codes that mean "the service is overloaded or down", whatever the HTTP status says.
_OUTAGE_CODES = ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling")
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def s3_endpoint() -> str | None:
    for name in _ENDPOINT_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def s3_client() -> Any:
    """A cached boto3 client for the endpoint and keys currently in the environment."""
    import boto3
    from botocore.config import Config

    endpoint = s3_endpoint()
    key_id = os.environ.get("AWS_ACCESS_KEY_ID")
    tuning = ("SHAREGPT4V_S3_MAX_ATTEMPTS", "SHAREGPT4V_S3_CONNECT_TIMEOUT", "SHAREGPT4V_S3_READ_TIMEOUT")
    cache_key = (
        endpoint,
        key_id,
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
        os.environ.get("AWS_SESSION_TOKEN"),
        *(os.environ.get(name) for name in tuning),
    )
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            config = Config(
                retries={"mode": "standard", "total_max_attempts": int(os.environ.get("SHAREGPT4V_S3_MAX_ATTEMPTS", "6"))},
                connect_timeout=float(os.environ.get("SHAREGPT4V_S3_CONNECT_TIMEOUT", "10")),
                read_timeout=float(os.environ.get("SHAREGPT4V_S3_READ_TIMEOUT", "60")),
                s3={"addressing_style": "path"},  # MinIO / SeaweedFS
                max_pool_connections=32,
            )
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint,
                region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                config=config,
            )
            _clients[cache_key] = client
    return client


# Per-key DeleteObjects error codes worth sending again (the rest are permanent: AccessDenied, ...).
_TRANSIENT_DELETE_CODES = frozenset({"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout"})


def _backoff_delay(attempt: int) -> float:
    """Seconds before retry `attempt` (0-based): exponential, capped at 8 s, with jitter."""
    return min(8.0, 0.2 * 2**attempt) * (0.5 + random.random())


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = ""):
        self.bucket = bucket
        self.prefix = prefix
        self.uri = join(f"s3://{bucket}", prefix)
        self._bucket_checked = False

    @property
    def client(self) -> Any:
        return s3_client()

    def _key(self, key: str) -> str:
        return join(self.prefix, check_key(key))

    def _translate(self, exc: Exception, key: str | None = None) -> StoreError:
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = self.url(key) if key is not None else self.uri
        endpoint = s3_endpoint() or "the default AWS endpoint"
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return CredentialsError(
                f"{where}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(from a Kubernetes Secret in cluster)"
            )
        if isinstance(exc, EndpointConnectionError):
            return StoreUnavailable(f"{where}: cannot reach S3 endpoint {endpoint}")
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",):
                return BucketNotFound(f"{where}: bucket '{self.bucket}' does not exist at {endpoint}")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return ObjectNotFound(f"{where}: no such object")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or status == 403:
                return CredentialsError(
                    f"{where}: S3 refused the request ({code or status}); check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY and the bucket policy"
                )
            if (isinstance(status, int) and status >= 500) or code in _OUTAGE_CODES:
                return StoreUnavailable(f"{where}: S3 error {code or status} (HTTP {status}), still failing after retries")
            return StoreError(f"{where}: S3 error {code or status}")
        # timeouts, dropped connections, ...: botocore retried them already
        return StoreUnavailable(f"{where}: {type(exc).__name__}: {exc}")

    def _call(self, fn: Any, key: str | None = None, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:  # translated into one actionable line
            err = self._translate(exc, key)
            if type(err) is ObjectNotFound:
                self._check_bucket()
            raise err from None

    def _check_bucket(self) -> None:
        """A 404 may mean the bucket is missing: say so instead of 'no such object'."""
        if self._bucket_checked:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            err = self._translate(exc)
            if type(err) is ObjectNotFound:
                err = BucketNotFound(f"{self.uri}: bucket '{self.bucket}' does not exist at {s3_endpoint()}")
            raise err from None
        self._bucket_checked = True

    def put_file(self, key: str, local_path: str | Path) -> None:
        from boto3.s3.transfer import TransferConfig

        # Multipart above 64 MB: an interrupted multipart upload never becomes visible.
        config = TransferConfig(multipart_threshold=64 * _CHUNK, multipart_chunksize=64 * _CHUNK)
        self._call(
            self.client.upload_file, key, Filename=str(local_path), Bucket=self.bucket, Key=self._key(key), Config=config
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(self.client.put_object, key, Bucket=self.bucket, Key=self._key(key), Body=data)

    def open(self, key: str) -> BinaryIO:
        return io.BufferedReader(_S3ReadStream(self, key), buffer_size=_CHUNK)  # type: ignore[arg-type]

    def exists(self, key: str) -> bool:
        try:
            self._call(self.client.head_object, key, Bucket=self.bucket, Key=self._key(key))
            return True
        except BucketNotFound:
            raise
        except ObjectNotFound:
            return False

    def size(self, key: str) -> int:
        head = self._call(self.client.head_object, key, Bucket=self.bucket, Key=self._key(key))
        return int(head["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._key(prefix)
        # "a/b" should list "a/b/..." (a folder), and "a/b" itself if it is an object.
        search = full + "/" if full and not full.endswith("/") else full
        strip = len(self.prefix) + 1 if self.prefix else 0
        if prefix and self.exists(prefix):
            yield ObjectInfo(full[strip:], self.size(prefix))
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=search):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][strip:], int(obj["Size"]))
        except Exception as exc:
            raise self._translate(exc, prefix) from None

    def delete(self, key: str) -> None:
        self._call(self.client.delete_object, key, Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = [self._key(info.key) for info in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            self._delete_batch(prefix, keys[start : start + 1000])
        return len(keys)

    def _delete_batch(self, prefix: str, keys: list[str], attempts: int = 5) -> None:
        """One DeleteObjects call (<= 1000 keys). Its answer lists the keys it failed to delete: transient
        failures are sent again with backoff, any other failure raises naming the first failed key."""
        pending = keys
        for attempt in range(attempts):
            batch = [{"Key": k} for k in pending]
            response = self._call(self.client.delete_objects, prefix, Bucket=self.bucket,
                                  Delete={"Objects": batch, "Quiet": True})
            errors = [e for e in response.get("Errors") or [] if e.get("Code") != "NoSuchKey"]  # gone is deleted
            if not errors:
                return
            permanent = [e for e in errors if e.get("Code") not in _TRANSIENT_DELETE_CODES]
            if permanent or attempt == attempts - 1:
                first = (permanent or errors)[0]
                again = f" after {attempts} attempts" if not permanent else ""
                raise StoreError(
                    f"{self.url(prefix)}: {len(errors)} of {len(pending)} objects not deleted{again}; first: "
                    f"s3://{self.bucket}/{first.get('Key', '?')} ({first.get('Code', '?')}: {first.get('Message', '')})"
                )
            pending = [e["Key"] for e in errors]
            time.sleep(_backoff_delay(attempt))


class _S3ReadStream(io.RawIOBase):
    """A GET body that survives broken connections: it reopens at the current offset."""

    def __init__(self, store: S3Store, key: str, max_resumes: int = 5):
        self.store, self.key, self.max_resumes = store, key, max_resumes
        self.pos = 0
        self.body = self._open()

    def _open(self) -> Any:
        extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        response = self.store._call(
            self.store.client.get_object, self.key, Bucket=self.store.bucket, Key=self.store._key(self.key), **extra
        )
        return response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import (
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )
        from urllib3.exceptions import ProtocolError

        for attempt in range(self.max_resumes + 1):
            try:
                data = self.body.read(len(buffer))
                break
            except (
                IncompleteReadError,
                ResponseStreamingError,
                ReadTimeoutError,
                BotoConnectionError,
                ProtocolError,
                OSError,
            ):
                if attempt == self.max_resumes:
                    raise StoreError(f"{self.store.url(self.key)}: read kept failing at byte {self.pos}") from None
                time.sleep(min(8.0, 0.2 * 2**attempt) * (0.5 + random.random()))
                self.body = self._open()
        n = len(data)
        buffer[:n] = data
        self.pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self.body.close()
        super().close()

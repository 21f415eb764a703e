"""One small object-store API over `s3://bucket/prefix` (any S3 endpoint) and local folders.

- Keys are relative to the store's root and use `/`; `..` segments and absolute keys are refused.
- Writes are atomic: an object becomes visible only when complete (local: temp file + rename;
  S3: a single PUT or a completed multipart upload). A folder is complete when its manifest
  (file list + sha256), written last, exists: see :meth:`Store.commit_folder`.
- S3 endpoint and keys come from the environment (a Kubernetes Secret in cluster):
  `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` / `S3_ENDPOINT_URL` / `MLFLOW_S3_ENDPOINT_URL`,
  `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`.
- Transient errors (connection resets, 5xx, throttling) are retried with exponential backoff and
  jitter by botocore's "standard" retry mode; a streaming read that breaks mid-way resumes with a
  ranged GET from the byte it reached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from sharegpt4v.errors import PlatformError

MANIFEST_NAME = "manifest.json"
_PARTIAL_MARK = ".partial-"
_CHUNK = 1 << 20


class StoreError(PlatformError):
    """An object-store operation failed; the message is one line a user can act on."""


class ObjectNotFound(StoreError):
    pass


class BucketNotFound(StoreError):
    pass


class CredentialsError(StoreError):
    pass


class StoreUnavailable(StoreError):
    """The store cannot be reached, or kept failing (5xx, throttling, timeouts) after the retries.

    An outage, never a sample's fault: a job stops on it with this one line and publishes nothing
    partial; a rerun continues. Only content problems (a missing or undecodable object) become
    per-sample error records.
    """


class IncompleteFolder(StoreError):
    """The folder has no manifest yet: it is being written, or its writer died."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


@dataclass(frozen=True)
class FileEntry:
    """One file in a folder manifest."""

    path: str  # relative to the folder
    bytes: int
    sha256: str


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI or path segments with `/` (no normalisation of the base)."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}" if out else part
    return out


def resolve(base_folder: str, ref: str) -> str:
    """Resolve a reference found in a manifest: absolute URIs stay, relative ones join the folder."""
    if "://" in ref or ref.startswith("/"):
        return ref
    return join(base_folder, ref)


def check_key(key: str) -> str:
    """Refuse keys that could escape the store's root."""
    if key.startswith("/") or "\\" in key:
        raise ValueError(f"unsafe key {key!r}: must be relative and use '/'")
    parts = key.split("/")
    if any(p in ("..", ".") for p in parts):
        raise ValueError(f"unsafe key {key!r}: '.' and '..' segments are not allowed")
    return "/".join(p for p in parts if p)


def sha256_stream(stream: IO[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def open_store(uri: str) -> "Store":
    """A store rooted at `uri`: `s3://bucket[/prefix]`, `file:///path` or a plain path."""
    if is_s3(uri):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise StoreError(f"{uri}: no bucket in S3 URI")
        from sharegpt4v.storage_s3 import S3Store  # boto3 only where S3 is used

        return S3Store(bucket, prefix.strip("/"))
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise StoreError(f"{uri}: unsupported scheme (use s3://bucket/prefix or a local path)")
    return LocalStore(Path(uri))


def split(uri: str) -> tuple["Store", str]:
    """`s3://b/x/y.json` -> (store at s3://b/x, "y.json"); same for local paths."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    if is_s3(uri) and parent == "s3:/":  # s3://bucket with no key
        raise StoreError(f"{uri}: names a bucket, not an object")
    return open_store(parent or "."), name


class Store:
    """Common behaviour; subclasses implement the primitive operations."""

    uri: str

    # primitives -----------------------------------------------------------------------
    def put_file(self, key: str, local_path: str | Path) -> None:
        raise NotImplementedError

    def open(self, key: str) -> BinaryIO:
        """A streaming binary reader; memory use does not grow with the object's size."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Complete objects under `prefix`, in key order."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    # derived --------------------------------------------------------------------------
    def url(self, key: str = "") -> str:
        return join(self.uri, check_key(key))

    def child(self, prefix: str) -> "Store":
        return open_store(self.url(prefix))

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.writer(key) as out:
            out.write(data)

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as stream:
            return stream.read()

    def get_file(self, key: str, local_path: str | Path) -> None:
        local_path = Path(local_path)
        with self.open(key) as src:  # an unsafe or missing key fails here, before any local folder exists
            local_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = local_path.with_name(f".{local_path.name}{_PARTIAL_MARK}{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                os.replace(tmp, local_path)
            finally:
                tmp.unlink(missing_ok=True)

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json_bytes(obj))

    def get_json(self, key: str) -> Any:
        try:
            return json.loads(self.get_bytes(key))
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.url(key)}: not valid JSON ({exc.msg} at line {exc.lineno})") from None

    @contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        """Write through a local temp file; the object appears only if the block succeeds."""
        check_key(key)
        fd, tmp = tempfile.mkstemp(prefix="sharegpt4v-upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                yield out  # type: ignore[misc]
            self.put_file(key, tmp)
        finally:
            os.unlink(tmp)

    def delete_prefix(self, prefix: str) -> int:
        count = 0
        for info in list(self.list(prefix)):
            self.delete(info.key)
            count += 1
        return count

    def sha256(self, key: str) -> tuple[str, int]:
        with self.open(key) as stream:
            return sha256_stream(stream)

    # folders --------------------------------------------------------------------------
    def commit_folder(self, prefix: str, files: list[FileEntry] | None = None, **meta: Any) -> dict[str, Any]:
        """Mark `prefix` complete by writing its manifest last.

        `files` lists what the folder holds (hashes computed while writing); when omitted,
        every object under the prefix is listed and hashed now.
        """
        if files is None:
            files = []
            for info in self.list(prefix):
                rel = info.key[len(prefix) :].lstrip("/") if prefix else info.key
                if rel == MANIFEST_NAME:
                    continue
                digest, size = self.sha256(info.key)
                files.append(FileEntry(rel, size, digest))
        manifest = {**meta, "files": [vars(f) for f in files]}
        self.put_json(join(prefix, MANIFEST_NAME), manifest)
        return manifest

    def read_manifest(self, prefix: str = "") -> dict[str, Any]:
        key = join(prefix, MANIFEST_NAME)
        try:
            return self.get_json(key)
        except ObjectNotFound:
            raise IncompleteFolder(
                f"{self.url(prefix) or '.'}: no {MANIFEST_NAME}; the folder is incomplete or not a dataset"
            ) from None

    def is_complete(self, prefix: str = "") -> bool:
        return self.exists(join(prefix, MANIFEST_NAME))

    def verify_folder(self, prefix: str = "") -> list[str]:
        """Re-hash every file listed in the manifest; returns a list of problems (empty = intact)."""
        problems = []
        for entry in self.read_manifest(prefix).get("files", []):
            key = join(prefix, entry["path"])
            try:
                digest, size = self.sha256(key)
            except ObjectNotFound:
                problems.append(f"{entry['path']}: missing")
                continue
            if (digest, size) != (entry["sha256"], entry["bytes"]):
                problems.append(f"{entry['path']}: sha256/size mismatch")
        return problems


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Content id of a folder: sha256 of its canonical manifest (which lists every file's sha256)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, fixed separators): equal content gives equal bytes."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


# local folders ----------------------------------------------------------------------------


class LocalStore(Store):
    def __init__(self, root: Path):
        self.root = root
        self.uri = str(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key) if key else self.root

    def put_file(self, key: str, local_path: str | Path) -> None:
        try:
            with self.writer(key) as out, open(local_path, "rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)
        except OSError as exc:
            raise StoreError(f"{self._path(key)}: cannot write ({exc.strerror})") from None

    @contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        dest = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{dest.parent}: cannot create folder ({exc.strerror})") from None
        tmp = dest.with_name(f".{dest.name}{_PARTIAL_MARK}{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as out:
                yield out
            os.replace(tmp, dest)  # atomic on one filesystem
        finally:
            tmp.unlink(missing_ok=True)

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"{path}: no such file") from None
        except IsADirectoryError:
            raise ObjectNotFound(f"{path}: is a folder, not a file") from None
        except PermissionError:
            raise StoreError(f"{path}: permission denied") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"{self._path(key)}: no such file") from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self._path(prefix)
        if base.is_file():
            yield ObjectInfo(check_key(prefix), base.stat().st_size)
            return
        if not base.is_dir():
            return  # like an S3 prefix with no objects
        if not os.access(base, os.R_OK | os.X_OK):
            raise StoreError(f"{base}: permission denied")
        yield from self._walk(base)

    def _walk(self, folder: Path) -> Iterator[ObjectInfo]:
        """Depth-first in S3 key order ("a/b" sorts after "a.txt"), streaming."""
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise StoreError(f"{folder}: cannot list ({exc.strerror})") from None
        entries.sort(key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path))
            elif entry.name.startswith(".") and _PARTIAL_MARK in entry.name:
                continue  # an unfinished write
            elif entry.is_file():
                yield ObjectInfo(Path(entry.path).relative_to(self.root).as_posix(), entry.stat().st_size)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

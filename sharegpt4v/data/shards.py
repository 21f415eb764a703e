"""WebDataset shards: a writer that publishes whole shards, a streaming reader, the manifest.

Layout of a dataset folder (any store):

    manifest.json        written last; lists shards (uri, split, samples, bytes, sha256),
                         counts by status and the files with their sha256
    train-000000.tar     `{key}.png|jpg` + `{key}.json` (id, source, sha256, width, height, ...)
    rejected.jsonl       error and duplicate records, one JSON object per line

Shard `uri`s in the manifest are relative to the manifest's folder (a copied dataset still
resolves) unless they are absolute URIs. Shard bytes are reproducible: fixed mtime and owner.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from sharegpt4v import storage
from sharegpt4v.storage import FileEntry, Store, json_bytes

MANIFEST_KIND = "sharegpt4v.image-shards"
MANIFEST_VERSION = 1
REJECTED_NAME = "rejected.jsonl"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ShardInfo:
    uri: str
    split: str
    samples: int
    bytes: int
    sha256: str


class ShardWriter:
    """Appends samples to a local tar and publishes it to the store each time it fills up.

    A shard is uploaded only when complete, so a killed writer leaves whole shards and no
    manifest (the dataset reads as incomplete until `finish` writes one).
    """

    def __init__(self, store: Store, split: str = "data", samples_per_shard: int = 1000, start_index: int = 0):
        self.store = store
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.index = start_index
        self.shards: list[ShardInfo] = []
        self._tar: Any = None
        self._tmp: str | None = None
        self._count = 0

    def write(self, key: str, files: dict[str, bytes | dict[str, Any]]) -> None:
        """`files` maps an extension to bytes (image) or a dict (written as canonical JSON)."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"shard key {key!r}: must be non-empty without '.' or '/'")
        if self._tar is None:
            self._open()
        sample: dict[str, Any] = {"__key__": key}
        for ext, value in files.items():
            sample[ext] = json_bytes(value) if isinstance(value, dict) else value
        self._tar.write(sample)
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._publish()

    def finish(self) -> list[ShardInfo]:
        if self._tar is not None and self._count:
            self._publish()
        elif self._tar is not None:
            self._discard()
        return self.shards

    def _open(self) -> None:
        import webdataset as wds

        fd, self._tmp = tempfile.mkstemp(prefix="sharegpt4v-shard-", suffix=".tar")
        stream = os.fdopen(fd, "wb")
        self._tar = wds.TarWriter(stream, user="sharegpt4v", group="sharegpt4v", mtime=0.0)
        self._stream = stream
        self._count = 0

    def _discard(self) -> None:
        self._tar.close()
        self._stream.close()
        if self._tmp:
            os.unlink(self._tmp)
        self._tar = self._tmp = None

    def _publish(self) -> None:
        self._tar.close()
        self._stream.close()
        assert self._tmp is not None
        with open(self._tmp, "rb") as f:
            digest, size = storage.sha256_stream(f)
        name = f"{self.split}-{self.index:06d}.tar"
        try:
            self.store.put_file(name, self._tmp)
        finally:
            os.unlink(self._tmp)
        self.shards.append(ShardInfo(name, self.split, self._count, size, digest))
        self.index += 1
        self._tar = self._tmp = None
        self._count = 0


def prepare_output(store: Store, overwrite: bool) -> None:
    """Refuse to replace a complete dataset unless asked; when asked, retire it first.

    The old manifest goes first (readers see "incomplete", never a mix), then its files.
    """
    if not store.is_complete():
        return
    if not overwrite:
        raise storage.StoreError(f"{store.uri}: a dataset already exists there (pass --overwrite to replace it)")
    old = store.read_manifest()
    store.delete(storage.MANIFEST_NAME)
    for entry in old.get("files", []):
        store.delete(entry["path"])


def write_manifest(
    store: Store,
    shards: list[ShardInfo],
    rejected: Iterable[dict[str, Any]] = (),
    extra_files: Iterable[FileEntry] = (),
    **meta: Any,
) -> dict[str, Any]:
    """Write `rejected.jsonl` then the manifest (last): the dataset becomes complete."""
    rejected = list(rejected)
    files = [FileEntry(s.uri, s.bytes, s.sha256) for s in shards]
    files += [put_jsonl(store, REJECTED_NAME, rejected), *extra_files]
    counts = {"ok": sum(s.samples for s in shards), "error": 0, "duplicate": 0}
    for record in rejected:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    splits: dict[str, int] = {}
    for s in shards:
        splits[s.split] = splits.get(s.split, 0) + s.samples
    return store.commit_folder(
        "",
        files,
        kind=MANIFEST_KIND,
        version=MANIFEST_VERSION,
        counts=counts,
        splits=splits,
        shards=[asdict(s) for s in shards],
        rejected=REJECTED_NAME,
        **meta,
    )


def put_jsonl(store: Store, key: str, records: Iterable[dict[str, Any]]) -> FileEntry:
    body = b"".join(json.dumps(r, sort_keys=True, ensure_ascii=False).encode() + b"\n" for r in records)
    store.put_bytes(key, body)
    return FileEntry(key, len(body), hashlib.sha256(body).hexdigest())


@dataclass
class Dataset:
    """An opened, complete dataset folder."""

    uri: str
    manifest: dict[str, Any]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest.get("shards", [])

    def shard_uris(self, split: str | None = None) -> list[str]:
        return [storage.resolve(self.uri, s["uri"]) for s in self.shards if split is None or s["split"] == split]

    def rejected(self) -> Iterator[dict[str, Any]]:
        name = self.manifest.get("rejected")
        if not name:
            return
        with storage.open_store(self.uri).open(name) as stream:
            for line in stream:
                if line.strip():
                    yield json.loads(line)

    def samples(self, split: str | None = None) -> Iterator[dict[str, Any]]:
        return iter_samples(self.shard_uris(split))


def open_dataset(uri: str) -> Dataset:
    """Read the manifest of a dataset folder; fails clearly if it is incomplete or not a dataset."""
    manifest = storage.open_store(uri).read_manifest()
    if manifest.get("kind") != MANIFEST_KIND:
        raise storage.StoreError(f"{uri}: manifest is not an image-shard manifest (kind={manifest.get('kind')!r})")
    return Dataset(uri.rstrip("/"), manifest)


def iter_shard(uri: str) -> Iterator[dict[str, Any]]:
    """Stream one tar shard: samples as {"__key__", "__url__", ext: bytes}. Constant memory."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    store, name = storage.split(uri)
    with store.open(name) as stream:
        files = ({**f, "__url__": uri} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)


def iter_samples(shard_uris: Iterable[str]) -> Iterator[dict[str, Any]]:
    for uri in shard_uris:
        yield from iter_shard(uri)


def sample_meta(sample: dict[str, Any]) -> dict[str, Any]:
    return json.loads(sample["json"])


def sample_image(sample: dict[str, Any]) -> tuple[str, bytes]:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    raise KeyError(f"sample {sample.get('__key__')} has no image")


def assign_shards(shard_uris: list[str], worker: int, num_workers: int) -> list[str]:
    """Deterministic round-robin subset for worker `worker` of `num_workers` (KFP fan-out)."""
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker index {worker} outside 0..{num_workers - 1}")
    return shard_uris[worker::num_workers]

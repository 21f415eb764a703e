"""Ingestion: turn user data into image shards, never crashing on a bad sample.

Inputs (`kind`):
- `folder`: a folder (local or s3:// prefix) of images, searched recursively;
- `wds`: existing WebDataset shards in img2dataset layout (`{key}.jpg` + `{key}.json`/`.txt`);
- `json`: a ShareGPT4V/LLaVA conversation JSON plus an image root folder.

Every bad input becomes an error record with a reason code and detail; identical images
(same sha256 of the input bytes) are kept once and the repeats recorded as duplicates.
Failures that are not a sample's fault stop the run with one line and publish nothing (the
manifest is written last): an unreadable input location, bad credentials, an unparseable JSON
file, a store that is down or keeps failing after retries, a full disk. A rerun starts again.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from sharegpt4v import storage, tracking
from sharegpt4v.config import IngestConfig
from sharegpt4v.data.images import IMAGE_EXTENSIONS, BadImage, normalize_image
from sharegpt4v.data.shards import (
    ShardWriter,
    iter_shard,
    prepare_output,
    put_jsonl,
    write_manifest,
)
from sharegpt4v.errors import PlatformError

KINDS = ("auto", "folder", "wds", "json")


class IngestError(PlatformError):
    """The input as a whole cannot be read (not one bad sample)."""


@dataclass
class Candidate:
    """One would-be sample before validation."""

    id: str
    source: str
    data: bytes | None = None
    error: tuple[str, str] | None = None  # (reason, detail) found before decoding
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class IngestSummary:
    out: str
    ok: int = 0
    error: int = 0
    duplicate: int = 0
    skipped: int = 0  # files that are not images by name (README.txt, ...)
    text_only: int = 0  # conversation records without an image, kept in text_only.jsonl
    reasons: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "ok": self.ok,
            "error": self.error,
            "duplicate": self.duplicate,
            "skipped": self.skipped,
            "text_only": self.text_only,
            "reasons": dict(sorted(self.reasons.items())),
            "sources": dict(sorted(self.sources.items())),
        }


def detect_kind(path: str) -> str:
    if path.endswith((".json", ".jsonl")):
        return "json"
    store = storage.open_store(path)
    for info in store.list():
        if info.key.endswith(".tar"):
            return "wds"
    return "folder"


def ingest(
    source: str,
    out: str,
    cfg: IngestConfig,
    kind: str = "auto",
    source_name: str | None = None,
    image_root: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> IngestSummary:
    if kind not in KINDS:
        raise IngestError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    out_store = storage.open_store(out)
    prepare_output(out_store, overwrite)
    kind = detect_kind(source) if kind == "auto" else kind
    if kind == "folder":
        candidates = _from_folder(source, source_name)
    elif kind == "wds":
        candidates = _from_wds(source, source_name)
    else:
        candidates = _from_json(source, image_root, source_name)

    params = {"input": source, "kind": kind, "out": out, **{f"ingest.{k}": v for k, v in asdict(cfg).items()}}
    with tracking.stage_run("ingest", params, tags={"stage": "ingest"}):
        summary = _write_dataset(candidates, out_store, cfg, source, kind, progress)
        tracking.log_metrics(
            {
                **{k: v for k, v in summary.to_dict().items() if isinstance(v, int)},
                **{f"error.{reason}": n for reason, n in summary.reasons.items()},
            }
        )
    return summary


def _write_dataset(
    candidates: "_Counted", out_store: storage.Store, cfg: IngestConfig, source: str, kind: str, progress: bool
) -> IngestSummary:
    summary = IngestSummary(out=out_store.uri)
    writer = ShardWriter(out_store, split="data", samples_per_shard=cfg.samples_per_shard)
    rejected: list[dict[str, Any]] = []
    text_only: list[dict[str, Any]] = []
    seen: dict[bytes, str] = {}  # input sha256 -> id of the kept sample
    bar = tqdm(candidates, desc=f"ingest {kind}", unit="img", disable=not progress)
    for cand in bar:
        if cand.extra.get("text_only"):
            text_only.append(cand.extra["record"])
            summary.text_only += 1
            continue
        if cand.error is None and cand.data is not None:
            digest = hashlib.sha256(cand.data).digest()
            if digest in seen:
                rejected.append(
                    {"id": cand.id, "source": cand.source, "status": "duplicate", "duplicate_of": seen[digest],
                     "input_sha256": digest.hex(), **_kept_extra(cand)}
                )
                summary.duplicate += 1
                continue
            try:
                image = normalize_image(cand.data, cfg)
            except BadImage as bad:
                cand.error = (bad.reason, bad.detail)
            else:
                seen[digest] = cand.id
                meta = {
                    "id": cand.id,
                    "source": cand.source,
                    "sha256": image.sha256,
                    "input_sha256": digest.hex(),
                    "width": image.width,
                    "height": image.height,
                    **({"normalized": image.changes} if image.changes else {}),
                    **_kept_extra(cand),
                }
                writer.write(f"{summary.ok:09d}", {image.ext: image.data, "json": meta})
                summary.ok += 1
                summary.sources[cand.source] += 1
                continue
        reason, detail = cand.error or ("unreadable", "no data")
        rejected.append(
            {"id": cand.id, "source": cand.source, "status": "error", "reason": reason, "detail": detail,
             **_kept_extra(cand)}
        )
        summary.error += 1
        summary.reasons[reason] += 1
        bar.set_postfix(ok=summary.ok, error=summary.error, dup=summary.duplicate, refresh=False)
    shards = writer.finish()
    extra_files = [put_jsonl(out_store, "text_only.jsonl", text_only)] if text_only else []
    summary.skipped = getattr(candidates, "skipped", 0)
    write_manifest(
        out_store,
        shards,
        rejected,
        extra_files=extra_files,
        input={"uri": source, "kind": kind},
        skipped=summary.skipped,
        text_only=summary.text_only,
        sources=dict(sorted(summary.sources.items())),
    )
    return summary


def _kept_extra(cand: Candidate) -> dict[str, Any]:
    return {k: v for k, v in cand.extra.items() if k not in ("text_only", "record")}


class _Counted:
    """An iterator of candidates that also counts what it skipped."""

    def __init__(self, gen_fn: Any):
        self.skipped = 0
        self._gen = gen_fn(self)

    def __iter__(self) -> Iterator[Candidate]:
        return self._gen


def _read(store: storage.Store, key: str) -> tuple[bytes | None, tuple[str, str] | None]:
    """The bytes of one input, or this sample's error. Store failures (an outage, credentials, a
    permission) are not the sample's: they propagate and stop the run before anything is published."""
    try:
        return store.get_bytes(key), None
    except storage.BucketNotFound:
        raise
    except storage.ObjectNotFound as exc:  # listed, then gone: this sample is missing
        return None, ("missing_file", str(exc))


def _source_of(rel: str, default: str) -> str:
    head, _, rest = rel.partition("/")
    return head if rest else default


def _from_folder(root: str, source_name: str | None) -> _Counted:
    store = storage.open_store(root)
    local_root = None if storage.is_s3(root) else os.path.realpath(root.removeprefix("file://"))
    if local_root is not None and not os.path.isdir(local_root):
        raise IngestError(f"{root}: not a readable folder")
    default_source = source_name or posixpath.basename(root.rstrip("/")) or "default"

    def gen(counter: _Counted) -> Iterator[Candidate]:
        empty = True
        for info in store.list():
            empty = False
            rel = info.key
            if not rel.lower().endswith(IMAGE_EXTENSIONS):
                counter.skipped += 1
                continue
            src = source_name or _source_of(rel, default_source)
            extra = {"path": rel}
            if local_root is not None:
                real = os.path.realpath(os.path.join(local_root, rel))
                if os.path.commonpath([real, local_root]) != local_root:
                    yield Candidate(rel, src, error=("unsafe_path", f"{rel} links outside the input folder"), extra=extra)
                    continue
            data, error = _read(store, rel)
            yield Candidate(rel, src, data, error, extra)
        if empty:
            raise IngestError(f"{root}: no files found")

    return _Counted(gen)


def _from_wds(root: str, source_name: str | None) -> _Counted:
    store = storage.open_store(root)
    shards = [info.key for info in store.list() if info.key.endswith(".tar")]
    if not shards:
        raise IngestError(f"{root}: no .tar shards found")
    default_source = source_name or posixpath.basename(root.rstrip("/")) or "wds"

    def gen(counter: _Counted) -> Iterator[Candidate]:
        for shard in shards:
            try:
                for sample in iter_shard(store.url(shard)):
                    yield _wds_candidate(sample, shard, default_source, counter)
            except storage.StoreError as exc:
                if type(exc) is not storage.ObjectNotFound:
                    raise  # the store failed, not the shard: stop, publish nothing
                yield Candidate(f"{shard}#", default_source, error=("missing_file", str(exc)))
            except Exception as exc:  # a corrupt tar: record it, keep going with the next shard
                yield Candidate(f"{shard}#", default_source, error=("corrupt_shard", f"{shard}: {exc}"))

    return _Counted(gen)


def _wds_candidate(sample: dict[str, Any], shard: str, source: str, counter: _Counted) -> Candidate:
    key = sample["__key__"]
    extra: dict[str, Any] = {"shard": shard}
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            meta = {}
    for field_name in ("url", "caption"):
        if isinstance(meta.get(field_name), str):
            extra[field_name] = meta[field_name]
    if "txt" in sample and "caption" not in extra:
        extra["caption"] = sample["txt"].decode("utf-8", errors="replace")
    sample_id = str(meta.get("key") or key)
    try:
        storage.check_key(key)
    except ValueError:
        return Candidate(sample_id, source, error=("unsafe_path", f"tar member key {key!r}"), extra=extra)
    image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
    if image_ext is None:
        return Candidate(sample_id, source, error=("missing_image", f"no image file for key {key!r}"), extra=extra)
    return Candidate(sample_id, meta.get("source") or source, sample[image_ext], extra=extra)


def _from_json(path: str, image_root: str | None, source_name: str | None) -> _Counted:
    json_store, name = storage.split(path)
    try:
        raw = json_store.get_bytes(name)
    except storage.ObjectNotFound:
        raise IngestError(f"{path}: no such file") from None
    try:
        records = json.loads(raw) if not path.endswith(".jsonl") else [json.loads(l) for l in raw.splitlines() if l.strip()]
    except (ValueError, UnicodeDecodeError) as exc:
        raise IngestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise IngestError(f"{path}: expected a JSON list of records")
    images = storage.open_store(image_root or json_store.uri)

    def gen(counter: _Counted) -> Iterator[Candidate]:
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                yield Candidate(f"#{i}", source_name or "json", error=("malformed_record", "record is not an object"))
                continue
            rid = str(record.get("id", f"#{i}"))
            conversations = record.get("conversations")
            image = record.get("image")
            extra = {"conversations": conversations} if conversations is not None else {}
            if not isinstance(conversations, list):
                yield Candidate(rid, source_name or "json", error=("malformed_record", "no conversations list"), extra=extra)
                continue
            if image is None:
                yield Candidate(rid, source_name or "text", extra={"text_only": True, "record": record})
                continue
            if not isinstance(image, str) or not image:
                yield Candidate(rid, source_name or "json", error=("malformed_record", "image is not a path"), extra=extra)
                continue
            extra["image"] = image
            src = source_name or _source_of(image, "json")
            try:
                key = storage.check_key(image)
            except ValueError as exc:
                yield Candidate(rid, src, error=("unsafe_path", str(exc)), extra=extra)
                continue
            if not images.exists(key):
                yield Candidate(rid, src, error=("missing_file", f"{images.url(key)} does not exist"), extra=extra)
                continue
            data, error = _read(images, key)
            yield Candidate(rid, src, data, error, extra)

    return _Counted(gen)

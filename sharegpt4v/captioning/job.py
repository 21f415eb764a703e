"""Sharded captioning job: exactly once per image, resumable after any kill.

Work unit = one input shard. For shard `S` the job writes into the caption-set folder:

    parts/S/part-000000.jsonl   progress, published atomically every `part_size` records
    records/S.jsonl             all records of the shard, in shard order (atomic PUT)
    records/S.done.json         completion marker (counts + sha256 of the records file)

A rerun skips shards with a marker, reloads the records file and parts of a partial shard and
captions only the ids not yet recorded, so no id is lost or written twice; a kill loses at most
one unpublished part. `retry_errors` reopens a finished shard with errors: its records file stays
until the new one replaces it, so its `ok` records are never captioned again, whatever is killed
when. Worker `i` of `N` takes a deterministic subset of shards (KFP fan-out);
`finalize_caption_set` writes the caption set's manifest once every shard is complete.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from sharegpt4v import storage, tracking
from sharegpt4v.captioning.records import (
    BudgetExceeded,
    Captioner,
    CaptionRequest,
    CaptionResult,
    make_record,
)
from sharegpt4v.data.shards import (
    assign_shards,
    iter_shard,
    open_dataset,
    sample_image,
    sample_meta,
)
from sharegpt4v.errors import PlatformError
from sharegpt4v.provenance import refuse_if_different
from sharegpt4v.storage import FileEntry, Store

CAPTION_SET_KIND = "sharegpt4v.caption-records"
MADE_FROM_NAME = "made-from.json"  # the captioner (model, prompts, decoding) and input of the set


class IncompleteCaptionSet(storage.StoreError):
    pass


@dataclass
class JobSummary:
    shards_total: int = 0  # shards assigned to this worker
    shards_done_before: int = 0  # already complete when the job started
    shards_completed: int = 0  # completed by this run
    captioned: int = 0  # requests sent to the captioner by this run
    ok: int = 0
    error: int = 0
    reasons: Counter = field(default_factory=Counter)
    completion_tokens: int = 0
    seconds: float = 0.0
    stopped: str | None = None  # "budget" when the spending cap ended the run early
    complete: bool = False  # every shard of the input has its marker (this run or earlier ones)

    def to_dict(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["reasons"] = dict(sorted(self.reasons.items()))
        return out


def shard_stem(shard_uri: str) -> str:
    name = shard_uri.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".tar")] if name.endswith(".tar") else name


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, sort_keys=True, ensure_ascii=False).encode() + b"\n" for r in records)


def _read_jsonl(store: Store, key: str) -> list[dict[str, Any]]:
    with store.open(key) as stream:
        return [json.loads(line) for line in stream if line.strip()]


class _ShardProgress:
    """What is already recorded for one shard, and publication of new parts."""

    def __init__(self, out: Store, stem: str, part_size: int):
        self.out, self.stem, self.part_size = out, stem, part_size
        self.records: dict[str, dict[str, Any]] = {}
        self.pending: list[dict[str, Any]] = []
        self.next_part = 0
        # The shard's records file first (present while its errors are being retried, or when a
        # run died between the records file and its marker), then the parts in the order they
        # were published: a later record of an id (a retried error) replaces an earlier one.
        if out.exists(f"records/{stem}.jsonl"):
            for record in _read_jsonl(out, f"records/{stem}.jsonl"):
                self.records[record["id"]] = record
        parts = sorted(out.list(f"parts/{stem}"), key=lambda info: _part_number(info.key))
        for info in parts:
            for record in _read_jsonl(out, info.key):
                self.records[record["id"]] = record
            self.next_part = max(self.next_part, _part_number(info.key) + 1)

    def add(self, record: dict[str, Any]) -> None:
        self.records[record["id"]] = record
        self.pending.append(record)
        if len(self.pending) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.out.put_bytes(f"parts/{self.stem}/part-{self.next_part:06d}.jsonl", _jsonl(self.pending))
            self.next_part += 1
            self.pending = []


def _part_number(key: str) -> int:
    return int(key.rsplit("-", 1)[-1].split(".")[0])


def _completed(out: Store, stem: str) -> bool:
    return out.exists(f"records/{stem}.done.json")


def run_caption_job(
    dataset_uri: str,
    out_uri: str,
    captioner: Captioner,
    batch_size: int = 16,
    worker: int = 0,
    num_workers: int = 1,
    split: str | None = None,
    part_size: int = 64,
    retry_errors: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> JobSummary:
    """Caption every image of this worker's shards that has no record yet.

    The set records what made it (`made-from.json`); a captioner with another model, prompt or
    decoding, or another input, is refused in one line unless `overwrite` retires the old set first.
    """
    dataset = open_dataset(dataset_uri)
    all_shards = dataset.shard_uris(split)
    mine = assign_shards(all_shards, worker, num_workers)
    counts = {storage.resolve(dataset.uri, s["uri"]): s["samples"] for s in dataset.shards}
    out = storage.open_store(out_uri)
    _claim(out, caption_set_made_from(dataset, captioner, split), overwrite)
    summary = JobSummary(shards_total=len(mine))
    todo = []
    for uri in mine:
        stem = shard_stem(uri)
        if _completed(out, stem) and not (retry_errors and _has_errors(out, stem)):
            summary.shards_done_before += 1
            out.delete_prefix(f"parts/{stem}")  # leftovers of a run killed while cleaning up
        else:
            todo.append(uri)
    if todo and out.is_complete():
        out.delete(storage.MANIFEST_NAME)  # shards reopen (retried errors): the set is complete again only at fan-in

    params = {
        "input": dataset_uri, "output": out_uri, "captioner": captioner.name, "worker": worker,
        "num_workers": num_workers, "batch_size": batch_size, "split": split or "all", "retry_errors": retry_errors,
    }
    with tracking.stage_run(f"caption-{worker}-of-{num_workers}", params, tags={"stage": "captioning"}):
        bar = tqdm(total=sum(counts.get(u, 0) for u in todo), desc="caption", unit="img", disable=not progress)
        started = time.perf_counter()
        try:
            for uri in todo:
                _caption_shard(uri, out, captioner, batch_size, part_size, retry_errors, summary, bar)
                summary.shards_completed += 1
                _log_progress(summary, captioner, started)
        except BudgetExceeded:
            summary.stopped = "budget"
        finally:
            bar.close()
            summary.seconds = time.perf_counter() - started
            _log_progress(summary, captioner, started)
        summary.complete = all(_completed(out, shard_stem(u)) for u in all_shards)
        if summary.complete and num_workers == 1:
            finalize_caption_set(dataset_uri, out_uri, split)
    return summary


def caption_set_made_from(dataset: Any, captioner: Captioner | dict[str, Any], split: str | None) -> dict[str, Any]:
    """What a caption set is made from: the captioner's identity (or name), the input dataset and split."""
    identity = captioner if isinstance(captioner, dict) else getattr(captioner, "identity", None) or {"name": captioner.name}
    return {"captioner": identity, "dataset": storage.manifest_digest(dataset.manifest), "split": split or "all"}


def check_caption_set(dataset_uri: str, out_uri: str, identity: dict[str, Any], split: str | None = None) -> None:
    """Refuse (one line) before any work when `out_uri` holds captions made by another captioner or input."""
    out = storage.open_store(out_uri)
    if out.exists(MADE_FROM_NAME):
        made_from = caption_set_made_from(open_dataset(dataset_uri), identity, split)
        refuse_if_different(out.url(), "captions", out.get_json(MADE_FROM_NAME), made_from, "--overwrite")


def _claim(out: Store, made_from: dict[str, Any], overwrite: bool) -> None:
    """Make `out` this run's caption set: refuse another captioner's, or retire it when asked."""
    if overwrite:
        out.delete(storage.MANIFEST_NAME)  # readers see an incomplete set first, never a mix
        for prefix in ("records", "parts"):
            out.delete_prefix(prefix)
        out.delete(MADE_FROM_NAME)
    old = out.get_json(MADE_FROM_NAME) if out.exists(MADE_FROM_NAME) else None
    refuse_if_different(out.url(), "captions", old, made_from, "--overwrite")
    if old is None:
        out.put_json(MADE_FROM_NAME, made_from)


def _has_errors(out: Store, stem: str) -> bool:
    marker = out.get_json(f"records/{stem}.done.json")
    return marker.get("error", 0) > 0


def _caption_shard(
    uri: str, out: Store, captioner: Captioner, batch_size: int, part_size: int, retry_errors: bool,
    summary: JobSummary, bar: tqdm,
) -> None:
    stem = shard_stem(uri)
    state = _ShardProgress(out, stem, part_size)
    # Retrying errors of a finished shard: its records file stays until the new one replaces it, so
    # a kill from here on finds every ok record again (they are never captioned twice).
    if _completed(out, stem):
        out.delete(f"records/{stem}.done.json")
    if retry_errors:
        state.records = {k: r for k, r in state.records.items() if r["status"] == "ok"}
    order: list[str] = []
    batch: list[CaptionRequest] = []
    try:
        for sample in iter_shard(uri):
            meta = sample_meta(sample)
            order.append(meta["id"])
            if meta["id"] in state.records:
                bar.update(1)
                continue
            _, image = sample_image(sample)
            batch.append(CaptionRequest(meta["id"], image, meta.get("source", "unknown"), meta.get("sha256") or
                                        hashlib.sha256(image).hexdigest()))
            if len(batch) >= batch_size:
                _run_batch(batch, captioner, state, summary, bar)
                batch = []
        if batch:
            _run_batch(batch, captioner, state, summary, bar)
    finally:
        state.flush()  # whatever finished is kept, also when the budget or a signal stops us
    records = [state.records[i] for i in dict.fromkeys(order)]  # shard order, each id once
    body = _jsonl(records)
    out.put_bytes(f"records/{stem}.jsonl", body)
    status = Counter(r["status"] for r in records)
    out.put_json(
        f"records/{stem}.done.json",
        {"shard": uri, "records": len(records), "ok": status["ok"], "error": status["error"],
         "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()},
    )
    out.delete_prefix(f"parts/{stem}")


def _run_batch(batch: list[CaptionRequest], captioner: Captioner, state: _ShardProgress, summary: JobSummary,
               bar: tqdm) -> None:
    try:
        results = captioner.caption_batch(batch)
    except (BudgetExceeded, PlatformError) as stop:  # the budget, or an outage: keep what finished, then stop
        _record(batch, getattr(stop, "results", None) or [], captioner, state, summary, bar)
        raise
    _record(batch, results, captioner, state, summary, bar)


def _record(batch: list[CaptionRequest], results: list[CaptionResult], captioner: Captioner,
            state: _ShardProgress, summary: JobSummary, bar: tqdm) -> None:
    by_id = {r.id: r for r in batch}
    for result in results:
        request = by_id.get(result.id)
        if request is None:
            continue  # a captioner answering for an id it was not asked about: ignore, do not record
        state.add(make_record(request, result, captioner.name))
        summary.captioned += 1
        summary.completion_tokens += result.completion_tokens
        if result.status == "ok":
            summary.ok += 1
        else:
            summary.error += 1
            summary.reasons[result.reason or "unknown"] += 1
        bar.update(1)
    bar.set_postfix(ok=summary.ok, error=summary.error, refresh=False)


def _log_progress(summary: JobSummary, captioner: Captioner, started: float) -> None:
    elapsed = max(time.perf_counter() - started, 1e-9)
    metrics = {
        "images_per_s": summary.captioned / elapsed,
        "generated_tokens_per_s": summary.completion_tokens / elapsed,
        "captioned": summary.captioned,
        "ok": summary.ok,
        "error": summary.error,
        "shards_completed": summary.shards_completed,
        **{f"error.{k}": v for k, v in summary.reasons.items()},
    }
    stats = getattr(captioner, "stats", None)
    if callable(stats):
        metrics.update({f"captioner.{k}": v for k, v in _numeric(stats()).items()})
    tracking.log_metrics(metrics, step=summary.shards_completed)


def _numeric(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_numeric(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def finalize_caption_set(dataset_uri: str, out_uri: str, split: str | None = None) -> dict[str, Any]:
    """Fan-in: once every shard has its marker, write the caption set's manifest (last)."""
    dataset = open_dataset(dataset_uri)
    out = storage.open_store(out_uri)
    files, counts, missing = [], Counter(), []
    for uri in dataset.shard_uris(split):
        stem = shard_stem(uri)
        if not _completed(out, stem):
            missing.append(stem)
            continue
        marker = out.get_json(f"records/{stem}.done.json")
        files.append(FileEntry(f"records/{stem}.jsonl", marker["bytes"], marker["sha256"]))
        counts.update({"records": marker["records"], "ok": marker["ok"], "error": marker["error"]})
    if missing:
        raise IncompleteCaptionSet(f"{out_uri}: {len(missing)} shard(s) not captioned yet, e.g. {missing[0]}")
    made_from = out.get_json(MADE_FROM_NAME) if out.exists(MADE_FROM_NAME) else None
    return out.commit_folder("", files, kind=CAPTION_SET_KIND, version=1, dataset=dataset.uri,
                             split=split, counts=dict(counts), made_from=made_from)


def iter_caption_records(out_uri: str, require_complete: bool = True) -> Iterator[dict[str, Any]]:
    """Records of a caption set, shard by shard (complete sets only, unless told otherwise)."""
    out = storage.open_store(out_uri)
    if require_complete:
        manifest = out.read_manifest()
        if manifest.get("kind") != CAPTION_SET_KIND:
            raise storage.StoreError(f"{out_uri}: not a caption set (kind={manifest.get('kind')!r})")
        keys = [f["path"] for f in manifest["files"]]
    else:
        keys = [i.key for i in out.list("records") if i.key.endswith(".jsonl")]
    for key in keys:
        yield from _read_jsonl(out, key)

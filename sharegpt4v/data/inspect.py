"""`data inspect`: what a dataset folder holds, read from its manifest, rejects and samples."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from tqdm import tqdm

from sharegpt4v import storage
from sharegpt4v.data.shards import iter_shard, open_dataset, sample_meta

# Metadata fields that hold captions, in the order they are reported.
CAPTION_FIELDS = ("caption", "brief_caption", "detailed_caption")


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)

    def pct(p: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(p * len(ordered)))])

    return {
        "count": len(ordered),
        "mean": round(statistics.fmean(ordered), 1),
        "min": float(ordered[0]),
        "p10": pct(0.10),
        "median": pct(0.50),
        "p90": pct(0.90),
        "max": float(ordered[-1]),
    }


def inspect_dataset(uri: str, verify: bool = False, progress: bool = True) -> dict[str, Any]:
    """Counts by status, source and split, error reasons, duplicates, caption lengths.

    Streams every shard (constant memory) so the counts are what the data holds, not only
    what the manifest claims; `verify` also re-hashes every file against the manifest.
    """
    dataset = open_dataset(uri)
    manifest = dataset.manifest
    by_source: Counter = Counter()
    by_split: Counter = Counter()
    chars: dict[str, list[int]] = {f: [] for f in CAPTION_FIELDS}
    words: dict[str, list[int]] = {f: [] for f in CAPTION_FIELDS}
    vqa_items = 0
    ok = 0
    for shard in tqdm(dataset.shards, desc="inspect", unit="shard", disable=not progress):
        for sample in iter_shard(storage.resolve(dataset.uri, shard["uri"])):
            meta = sample_meta(sample)
            ok += 1
            by_source[meta.get("source", "unknown")] += 1
            by_split[shard["split"]] += 1
            for name in CAPTION_FIELDS:
                text = meta.get(name)
                if isinstance(text, str):
                    chars[name].append(len(text))
                    words[name].append(len(text.split()))
            vqa_items += len(meta.get("vqa", []))

    reasons: Counter = Counter()
    error = duplicate = 0
    examples: dict[str, str] = {}
    for record in dataset.rejected():
        if record["status"] == "duplicate":
            duplicate += 1
        else:
            error += 1
            reasons[record.get("reason", "unknown")] += 1
            examples.setdefault(record.get("reason", "unknown"), f"{record.get('id')}: {record.get('detail', '')}")

    report: dict[str, Any] = {
        "uri": dataset.uri,
        "ok": ok,
        "error": error,
        "duplicate": duplicate,
        "skipped": int(manifest.get("skipped", 0)),
        "text_only": int(manifest.get("text_only", 0)),
        "shards": len(dataset.shards),
        "bytes": sum(int(s["bytes"]) for s in dataset.shards),
        "sources": dict(sorted(by_source.items())),
        "splits": dict(sorted(by_split.items())),
        "error_reasons": dict(sorted(reasons.items())),
        "error_examples": examples,
        "captions": {
            name: {"chars": length_stats(chars[name]), "words": length_stats(words[name])}
            for name in CAPTION_FIELDS
            if chars[name]
        },
    }
    if vqa_items:
        report["vqa_items"] = vqa_items
    claimed = manifest.get("counts", {})
    mismatch = {k: (claimed.get(k), report[k]) for k in ("ok", "error", "duplicate") if claimed.get(k, 0) != report[k]}
    report["consistent_with_manifest"] = not mismatch
    if mismatch:
        report["manifest_mismatch"] = mismatch
    if verify:
        report["integrity_problems"] = storage.open_store(uri).verify_folder()
    return report

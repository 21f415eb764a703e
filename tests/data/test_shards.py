"""WebDataset shard writer, streaming reader and manifest, on a folder and on real S3."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc

import pytest

from sharegpt4v import storage
from sharegpt4v.data.shards import (
    ShardWriter,
    assign_shards,
    iter_samples,
    open_dataset,
    sample_image,
    sample_meta,
    write_manifest,
)


def _write_dataset(uri: str, n: int, per_shard: int, image_bytes: int = 1000) -> dict:
    store = storage.open_store(uri)
    writer = ShardWriter(store, split="train", samples_per_shard=per_shard)
    for i in range(n):
        payload = hashlib.sha256(str(i).encode()).digest() * (image_bytes // 32)
        writer.write(f"{i:06d}", {"png": payload, "json": {"id": f"img-{i}", "source": "test", "n": i}})
    shards = writer.finish()
    return write_manifest(store, shards, [{"id": "bad", "status": "error", "reason": "corrupt"}], note="unit")


def test_roundtrip_and_manifest(store_uri: str) -> None:
    manifest = _write_dataset(store_uri, n=25, per_shard=10)
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, 5]
    assert manifest["counts"] == {"ok": 25, "error": 1, "duplicate": 0}
    assert manifest["splits"] == {"train": 25}
    dataset = open_dataset(store_uri)
    ids = [sample_meta(s)["id"] for s in dataset.samples()]
    assert ids == [f"img-{i}" for i in range(25)]
    store = storage.open_store(store_uri)
    for shard in manifest["shards"]:
        assert shard["uri"] == os.path.basename(shard["uri"])  # relative: a copied dataset still resolves
        assert store.sha256(shard["uri"]) == (shard["sha256"], shard["bytes"])
    assert [r["reason"] for r in dataset.rejected()] == ["corrupt"]
    assert store.verify_folder() == []


def test_sample_files_are_webdataset_layout(tmp_path) -> None:
    import tarfile

    _write_dataset(str(tmp_path), n=2, per_shard=10)
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        assert tar.getnames() == ["000000.json", "000000.png", "000001.json", "000001.png"]
    sample = next(open_dataset(str(tmp_path)).samples())
    assert sample_image(sample)[0] == "png"
    assert json.loads(sample["json"])["source"] == "test"


def test_shards_are_reproducible(tmp_path) -> None:
    a = _write_dataset(str(tmp_path / "a"), n=12, per_shard=5)
    b = _write_dataset(str(tmp_path / "b"), n=12, per_shard=5)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()


def test_incomplete_dataset_is_refused(store_uri: str) -> None:
    store = storage.open_store(store_uri)
    writer = ShardWriter(store, samples_per_shard=2)
    for i in range(5):
        writer.write(f"{i:04d}", {"png": b"x", "json": {"id": str(i)}})
    writer.finish()  # shards exist, but no manifest was written
    with pytest.raises(storage.IncompleteFolder):
        open_dataset(store_uri)


def test_killed_writer_leaves_an_incomplete_dataset(s3_uri: str) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from sharegpt4v.storage import open_store
        from sharegpt4v.data.shards import ShardWriter
        writer = ShardWriter(open_store(sys.argv[1]), samples_per_shard=3)
        for i in range(7):
            writer.write(f"{i:04d}", {"png": b"x" * 100, "json": {"id": str(i)}})
        print("two shards published", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, s3_uri], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "two shards published"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = storage.open_store(s3_uri)
    assert [o.key for o in store.list()] == ["data-000000.tar", "data-000001.tar"]  # whole shards only
    assert not store.is_complete()
    with pytest.raises(storage.IncompleteFolder):
        open_dataset(s3_uri)


def test_streaming_memory_does_not_grow_with_corpus(s3_uri: str) -> None:
    """Reading 4x more shards from S3 must not need more memory: samples stream through."""
    _write_dataset(s3_uri, n=160, per_shard=20, image_bytes=100_000)  # 8 shards, ~16 MB
    uris = open_dataset(s3_uri).shard_uris()

    def peak(shards: list[str]) -> tuple[int, int]:
        tracemalloc.start()
        count = sum(1 for _ in iter_samples(shards))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return count, top

    small_count, small_peak = peak(uris[:2])
    big_count, big_peak = peak(uris)
    assert (small_count, big_count) == (40, 160)
    corpus_bytes = sum(s["bytes"] for s in open_dataset(s3_uri).shards)
    assert big_peak < corpus_bytes / 4, (big_peak, corpus_bytes)
    assert big_peak < small_peak * 1.5 + 1_000_000, (small_peak, big_peak)


def test_assign_shards_partitions_exactly() -> None:
    uris = [f"s{i}" for i in range(11)]
    parts = [assign_shards(uris, w, 4) for w in range(4)]
    assert sorted(sum(parts, [])) == sorted(uris)
    assert assign_shards(uris, 1, 4) == assign_shards(uris, 1, 4)
    with pytest.raises(ValueError):
        assign_shards(uris, 4, 4)


@pytest.mark.parametrize("key", ["a.b", "a/b", ""])
def test_writer_refuses_keys_webdataset_cannot_hold(tmp_path, key: str) -> None:
    with pytest.raises(ValueError):
        ShardWriter(storage.open_store(str(tmp_path))).write(key, {"png": b"x"})

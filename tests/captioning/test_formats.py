"""Caption records <-> ShareGPT4V/LLaVA conversation JSON."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sharegpt4v.captioning.formats import (
    FormatError,
    export_conversations,
    import_conversations,
)
from sharegpt4v.captioning.job import iter_caption_records, run_caption_job
from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
from sharegpt4v.config import WorldConfig
from sharegpt4v.world.generate import generate_world
from tests.captioning.doubles import EchoCaptioner


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("formats")
    world, captions = str(root / "world"), str(root / "captions")
    generate_world(world, 30, 2, WorldConfig(samples_per_shard=10), progress=False)
    run_caption_job(world, captions, EchoCaptioner(error_every=6), batch_size=8, progress=False)
    return world, captions


def test_export_writes_llava_json_and_images(captioned: tuple[str, str], tmp_path: Path) -> None:
    world, captions = captioned
    counts = export_conversations(captions, str(tmp_path / "caps.json"), dataset_uri=world,
                                  images_out=str(tmp_path / "images"))
    records = {r["id"]: r for r in iter_caption_records(captions)}
    ok = {k: r for k, r in records.items() if r["status"] == "ok"}
    assert counts == {"exported": len(ok), "skipped_errors": len(records) - len(ok), "images": len(ok)}
    exported = json.loads((tmp_path / "caps.json").read_text())
    for item in exported:
        human, gpt = item["conversations"]
        assert human == {"from": "human", "value": f"<image>\n{CAPTION_INSTRUCTION}"}
        assert gpt["value"] == ok[item["id"]]["caption"]
        image = (tmp_path / "images" / item["image"]).read_bytes()
        assert hashlib.sha256(image).hexdigest() == ok[item["id"]]["image_sha256"]


def test_import_roundtrip(captioned: tuple[str, str], tmp_path: Path) -> None:
    world, captions = captioned
    export_conversations(captions, str(tmp_path / "caps.json"), dataset_uri=world, images_out=str(tmp_path / "img"))
    summary = import_conversations(str(tmp_path / "caps.json"), str(tmp_path / "imported"),
                                   image_root=str(tmp_path / "img"), records_per_file=7)
    original = {r["id"]: r for r in iter_caption_records(captions) if r["status"] == "ok"}
    imported = {r["id"]: r for r in iter_caption_records(str(tmp_path / "imported"))}
    assert summary["counts"] == {"records": len(original), "ok": len(original), "error": 0}
    assert {k: r["caption"] for k, r in imported.items()} == {k: r["caption"] for k, r in original.items()}
    assert {k: r["image_sha256"] for k, r in imported.items()} == {k: r["image_sha256"] for k, r in original.items()}
    assert len(summary["files"]) == -(-len(original) // 7)


def test_import_records_problems_instead_of_failing(tmp_path: Path) -> None:
    (tmp_path / "img" / "coco").mkdir(parents=True)
    (tmp_path / "img" / "coco" / "a.jpg").write_bytes(b"jpeg bytes")
    conv = lambda text: [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": text}]  # noqa: E731
    (tmp_path / "sharegpt4v.json").write_text(json.dumps([
        {"id": "a", "image": "coco/a.jpg", "conversations": conv("A long caption.")},
        {"id": "b", "image": "coco/missing.jpg", "conversations": conv("Another.")},
        {"id": "c", "image": "../escape.jpg", "conversations": conv("Escaping.")},
        {"id": "d", "image": "coco/a.jpg", "conversations": [{"from": "human", "value": "hi"}]},
        "not a record",
    ]))
    summary = import_conversations(str(tmp_path / "sharegpt4v.json"), str(tmp_path / "out"), image_root=str(tmp_path / "img"))
    records = {r["id"]: r for r in iter_caption_records(str(tmp_path / "out"))}
    assert summary["counts"] == {"records": 5, "ok": 1, "error": 4}
    assert records["a"]["source"] == "coco" and records["a"]["caption"] == "A long caption."
    assert (records["b"]["reason"], records["c"]["reason"], records["d"]["reason"], records["#4"]["reason"]) == (
        "missing_file", "missing_file", "no_caption", "malformed_record")


def test_import_rejects_a_broken_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(FormatError, match="not valid JSON"):
        import_conversations(str(tmp_path / "bad.json"), str(tmp_path / "out"))

"""Ingestion never crashes on bad input, and reports exactly the bad samples with reasons."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sharegpt4v import storage
from sharegpt4v.config import IngestConfig
from sharegpt4v.data.ingest import ingest
from sharegpt4v.data.inspect import inspect_dataset
from sharegpt4v.data.shards import open_dataset, sample_image, sample_meta
from sharegpt4v.storage import StoreError, StoreUnavailable
from tests.data.messy import make_img2dataset_shards, make_llava_json, make_messy_folder


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sharegpt4v", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _outcomes(uri: str) -> dict[str, str]:
    """id -> "ok" | "duplicate" | "error:<reason>" as a user would read them back."""
    dataset = open_dataset(uri)
    result = {sample_meta(s)["id"]: "ok" for s in dataset.samples()}
    for record in dataset.rejected():
        result[record["id"]] = record["status"] if record["status"] == "duplicate" else f"error:{record['reason']}"
    return result


def _merge_duplicate_pair(expected: dict[str, str], got: dict[str, str], a: str, b: str) -> None:
    """Of two identical files either may be kept; exactly one is, the other is the duplicate."""
    assert sorted([got[a], got[b]]) == ["duplicate", "ok"]
    expected[a], expected[b] = got[a], got[b]


def test_messy_folder_via_cli_reports_exactly_the_bad_ones(tmp_path: Path) -> None:
    expected = make_messy_folder(tmp_path / "in")
    out = tmp_path / "out"
    result = cli("data", "ingest", "--from", str(tmp_path / "in"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "ok=10 error=9 duplicate=1" in result.stdout
    report = cli("data", "inspect", str(out), "--json")
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    bad = {k for k, v in expected.items() if v.startswith("error")}
    assert (summary["ok"], summary["error"], summary["duplicate"]) == (10, len(bad), 1)
    assert summary["skipped"] == 1  # README.txt
    got = _outcomes(str(out))
    _merge_duplicate_pair(expected, got, "photos/rgb.jpg", "photos/copy_of_rgb.jpg")
    assert got == expected
    for record in open_dataset(str(out)).rejected():
        assert record.get("reason") or record["status"] == "duplicate"
        assert record.get("detail") or record["status"] == "duplicate"


def test_every_kept_image_is_normalised_rgb(tmp_path: Path) -> None:
    from io import BytesIO

    from PIL import Image

    make_messy_folder(tmp_path / "in", with_outside_link=False)
    ingest(str(tmp_path / "in"), str(tmp_path / "out"), IngestConfig(), progress=False)
    seen = {}
    for sample in open_dataset(str(tmp_path / "out")).samples():
        meta = sample_meta(sample)
        ext, data = sample_image(sample)
        image = Image.open(BytesIO(data))
        assert image.mode == "RGB", meta["id"]
        assert (image.width, image.height) == (meta["width"], meta["height"])
        assert {"id", "source", "sha256", "width", "height"} <= set(meta)
        seen[meta["id"]] = (meta, ext)
    assert seen["photos/exif_rotated.jpg"][0]["width"] == 20  # stored 60x20, displayed upright
    assert seen["photos/exif_rotated.jpg"][0]["height"] == 60
    assert seen["photos/cmyk.jpg"][1] == "jpg"
    assert seen["art/picture.webp"][1] == "png"
    assert "i;16->rgb" in seen["photos/gray16.png"][0]["normalized"]
    assert seen["photos/rgb.png"][0].get("normalized") is None  # untouched bytes
    assert {m["source"] for m, _ in seen.values()} == {"photos", "art"}


def test_folder_on_s3_to_s3(tmp_path: Path, s3_uri: str) -> None:
    expected = make_messy_folder(tmp_path / "in", with_outside_link=False)
    src = storage.open_store(f"{s3_uri}/raw")
    for path in sorted((tmp_path / "in").rglob("*")):
        if path.is_file():
            src.put_file(path.relative_to(tmp_path / "in").as_posix(), path)
    summary = ingest(f"{s3_uri}/raw", f"{s3_uri}/shards", IngestConfig(), progress=False)
    assert (summary.ok, summary.error, summary.duplicate) == (10, 8, 1)
    got = _outcomes(f"{s3_uri}/shards")
    _merge_duplicate_pair(expected, got, "photos/rgb.jpg", "photos/copy_of_rgb.jpg")
    assert got == expected


def test_an_s3_outage_fails_the_run_and_publishes_nothing(tmp_path: Path, s3_uri: str, proxy) -> None:
    """A store that keeps failing is not bad input: no error records, no manifest, exit 1, the rerun completes."""
    import os

    make_messy_folder(tmp_path / "in", with_outside_link=False)
    src = storage.open_store(f"{s3_uri}/raw")
    for path in sorted((tmp_path / "in").rglob("*")):
        if path.is_file():
            src.put_file(path.relative_to(tmp_path / "in").as_posix(), path)
    reads = []

    def outage_after_five_images(method: str, path: str) -> bool:
        if method != "GET" or "/raw/" not in path:
            return False
        reads.append(path)
        return len(reads) > 5  # the store goes down mid-run and stays down

    proxy.fail_when = outage_after_five_images
    with pytest.raises(StoreUnavailable, match="S3 error SlowDown .*after retries"):
        ingest(f"{s3_uri}/raw", f"{s3_uri}/shards", IngestConfig(), progress=False)
    assert not storage.open_store(f"{s3_uri}/shards").is_complete()
    result = cli("data", "ingest", "--from", f"{s3_uri}/raw", "--out", f"{s3_uri}/cli-shards", env=dict(os.environ))
    *progress, error = result.stderr.strip().splitlines()  # the progress bar, then one line
    assert result.returncode == 1 and error.startswith("sharegpt4v: error: ") and "SlowDown" in error, result.stderr
    assert all(line.startswith("ingest folder:") for line in progress if line.strip())
    assert not storage.open_store(f"{s3_uri}/cli-shards").is_complete()

    proxy.fail_when = None  # the store is back: the rerun ingests everything, as if nothing had happened
    summary = ingest(f"{s3_uri}/raw", f"{s3_uri}/shards", IngestConfig(), progress=False)
    assert (summary.ok, summary.error, summary.duplicate) == (10, 8, 1) and "unreadable" not in summary.reasons


def test_img2dataset_shards(tmp_path: Path) -> None:
    expected = make_img2dataset_shards(tmp_path / "wds")
    summary = ingest(str(tmp_path / "wds"), str(tmp_path / "out"), IngestConfig(), source_name="laion", progress=False)
    assert summary.to_dict()["reasons"] == {"corrupt": 1, "missing_image": 1, "not_an_image": 1, "unsafe_path": 1}
    got = _outcomes(str(tmp_path / "out"))
    assert got == expected
    metas = {sample_meta(s)["id"]: sample_meta(s) for s in open_dataset(str(tmp_path / "out")).samples()}
    assert metas["000000000"]["caption"] == "alt 000000000"
    assert metas["000000000"]["url"] == "http://example.com/000000000"
    assert metas["000000000"]["source"] == "laion"


def test_llava_conversation_json(tmp_path: Path) -> None:
    expected = make_llava_json(tmp_path)
    summary = ingest(str(tmp_path / "llava.json"), str(tmp_path / "out"), IngestConfig(), image_root=str(tmp_path / "images"), progress=False)
    assert (summary.ok, summary.duplicate, summary.text_only) == (2, 1, 1)
    got = _outcomes(str(tmp_path / "out"))
    assert got == {k: v for k, v in expected.items() if v != "text_only"}
    metas = {sample_meta(s)["id"]: sample_meta(s) for s in open_dataset(str(tmp_path / "out")).samples()}
    assert metas["good-1"]["conversations"][0]["value"].startswith("<image>")
    assert metas["good-1"]["source"] == "photos"
    text_only = (tmp_path / "out" / "text_only.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in text_only] == ["text-only"]


def test_pixel_limit_comes_from_config(tmp_path: Path) -> None:
    make_messy_folder(tmp_path / "in", with_outside_link=False)
    summary = ingest(str(tmp_path / "in"), str(tmp_path / "out"), IngestConfig(max_pixels=1000), progress=False)
    assert summary.ok == 0 and summary.reasons["decompression_bomb"] >= 10


def test_unreadable_input_exits_1_with_one_line(tmp_path: Path) -> None:
    result = cli("data", "ingest", "--from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "nowhere" in result.stderr


def test_bad_credentials_exit_1_with_one_line(tmp_path: Path, s3_uri: str, s3_env: dict) -> None:
    import os

    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "wrong"}
    result = cli("data", "ingest", "--from", f"{s3_uri}/raw", "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "AWS_ACCESS_KEY_ID" in result.stderr


def test_broken_json_file_exits_1(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("[{not json")
    result = cli("data", "ingest", "--from", str(tmp_path / "bad.json"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "not valid JSON" in result.stderr


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    make_messy_folder(tmp_path / "in", with_outside_link=False)
    ingest(str(tmp_path / "in"), str(tmp_path / "out"), IngestConfig(), progress=False)
    with pytest.raises(StoreError, match="--overwrite"):
        ingest(str(tmp_path / "in"), str(tmp_path / "out"), IngestConfig(), progress=False)
    summary = ingest(str(tmp_path / "in"), str(tmp_path / "out"), IngestConfig(), overwrite=True, progress=False)
    assert summary.ok == 10
    assert inspect_dataset(str(tmp_path / "out"), verify=True, progress=False)["integrity_problems"] == []


def test_ingest_logs_counts_to_mlflow(tmp_path: Path, mlflow_sqlite: str) -> None:
    from mlflow.tracking import MlflowClient

    make_messy_folder(tmp_path / "in", with_outside_link=False)
    ingest(str(tmp_path / "in"), str(tmp_path / "out"), IngestConfig(), progress=False)
    client = MlflowClient(mlflow_sqlite)
    (run,) = client.search_runs([client.get_experiment_by_name("sharegpt4v").experiment_id])
    assert run.info.run_name == "ingest" and run.info.status == "FINISHED"
    assert {k: run.data.metrics[k] for k in ("ok", "error", "duplicate")} == {"ok": 10, "error": 8, "duplicate": 1}
    assert run.data.metrics["error.corrupt"] == 2
    assert run.data.params["ingest.max_pixels"] == str(IngestConfig().max_pixels)

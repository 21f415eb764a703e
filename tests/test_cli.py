"""The `sharegpt4v` command as a user runs it: world generation, inspection, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sharegpt4v", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_world_generate_is_deterministic_per_seed(tmp_path: Path, s3_uri: str) -> None:
    a, b, c = f"{s3_uri}/a", str(tmp_path / "b"), f"{s3_uri}/c"
    for out, seed, extra in ((a, "5", []), (b, "5", ["--workers", "2"]), (c, "6", [])):
        result = cli("world", "generate", "--out", out, "--images", "120", "--seed", seed, "world.samples_per_shard=50", *extra)
        assert result.returncode == 0, result.stderr
        assert "120 images" in result.stdout
    from sharegpt4v import storage

    manifest = lambda uri: storage.open_store(uri).get_bytes("manifest.json")  # noqa: E731
    assert manifest(a) == manifest(b)  # S3 vs local, 1 vs 2 workers: byte-identical
    assert manifest(a) != manifest(c)
    assert json.loads(manifest(a))["counts"] == {"ok": 120, "error": 0, "duplicate": 0}


def test_world_inspect_json_reports_counts_and_caption_lengths(tmp_path: Path) -> None:
    out = str(tmp_path / "world")
    assert cli("world", "generate", "--out", out, "--images", "60").returncode == 0
    result = cli("data", "inspect", out, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert isinstance(report["ok"], int) and (report["ok"], report["error"], report["duplicate"]) == (60, 0, 0)
    assert set(report["splits"]) <= {"train", "val", "test"} and sum(report["splits"].values()) == 60
    assert set(report["sources"]) <= {"photo", "text", "art"}
    detailed = report["captions"]["detailed_caption"]["chars"]["mean"]
    brief = report["captions"]["brief_caption"]["chars"]["mean"]
    assert detailed > 5 * brief
    assert report["vqa_items"] > 60


def test_generate_refuses_to_replace_without_overwrite(tmp_path: Path) -> None:
    out = str(tmp_path / "world")
    assert cli("world", "generate", "--out", out, "--images", "10").returncode == 0
    again = cli("world", "generate", "--out", out, "--images", "10")
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert cli("world", "generate", "--out", out, "--images", "12", "--overwrite").returncode == 0
    assert len(list((tmp_path / "world").glob("*.tar"))) == 3  # the old shards were retired


def test_inspect_of_incomplete_or_missing_dataset_fails_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "data-000000.tar").write_bytes(b"")
    for target in (tmp_path / "half", tmp_path / "missing"):
        result = cli("data", "inspect", str(target), "--json")
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "manifest" in result.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert cli().returncode == 2
    assert cli("world", "generate", "--images", "3").returncode == 2  # --out missing
    assert cli("world", "generate", "--out", str(tmp_path), "--images", "many").returncode == 2
    assert cli("world", "generate", "--out", str(tmp_path), "--images", "3", "world.bogus=1").returncode == 2


def test_verify_catches_a_tampered_shard(tmp_path: Path) -> None:
    out = tmp_path / "world"
    assert cli("world", "generate", "--out", str(out), "--images", "20").returncode == 0
    shard = sorted(out.glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = cli("data", "inspect", str(out), "--verify")
    assert result.returncode == 1 and "mismatch" in result.stdout


def test_services_up_writes_a_private_env_file_and_stops_on_sigterm(tmp_path: Path) -> None:
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "sharegpt4v", "services", "up", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 60
    while not any("Ctrl-C" in line for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None
        lines.append(proc.stdout.readline())
    env_file = tmp_path / "env.sh"
    assert f"source {env_file}" in "".join(lines)
    assert not any("AWS_SECRET_ACCESS_KEY" in line for line in lines)  # keys are not printed
    assert env_file.stat().st_mode & 0o077 == 0
    env = dict(line.removeprefix("export ").strip().split("=", 1) for line in env_file.read_text().splitlines())
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    result = cli("world", "generate", "--out", "s3://sharegpt4v/w", "--images", "5", env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_caption_report_cli(tmp_path: Path) -> None:
    world = str(tmp_path / "world")
    assert cli("world", "generate", "--out", world, "--images", "30").returncode == 0
    result = cli("caption", "report", "--input", world, "--world-captions", "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    assert "set=world:detailed" in result.stdout and "fact_recall=1.000" in result.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(report["sets"]) == {"world:brief", "world:detailed"}
    assert (tmp_path / "report" / "report.html").stat().st_size > 10_000
    bad = cli("caption", "report", "--records", "no-equals-sign", "--out", str(tmp_path / "r2"))
    assert bad.returncode == 2 and "NAME=URI" in bad.stderr  # a usage error

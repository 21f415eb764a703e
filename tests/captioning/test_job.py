"""The sharded captioning job: exactly once per image, across kills, workers and reruns."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from sharegpt4v import storage
from sharegpt4v.captioning.job import (
    IncompleteCaptionSet,
    finalize_caption_set,
    iter_caption_records,
    run_caption_job,
)
from sharegpt4v.config import WorldConfig
from sharegpt4v.data.shards import open_dataset, sample_meta
from sharegpt4v.provenance import OutputMismatch
from sharegpt4v.world.generate import generate_world
from tests.captioning.doubles import (
    EchoCaptioner,
    expected_caption,
    kill_at_random_moments,
    published_records,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    """120 images in 24 shards of 5 (all splits)."""
    uri = str(tmp_path_factory.mktemp("world"))
    generate_world(uri, 120, 0, WorldConfig(samples_per_shard=5), progress=False)
    return uri


def _input(world: str) -> dict[str, str]:
    return {sample_meta(s)["id"]: sample_meta(s)["sha256"] for s in open_dataset(world).samples()}


def _check_exactly_once(world: str, out: str) -> list[dict]:
    records = list(iter_caption_records(out))
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    assert set(ids) == set(_input(world))
    for record in records:
        if record["status"] == "error":
            assert record["reason"] and record["detail"]
        else:
            assert record["caption"] == expected_caption(record["image_sha256"])
    return records


def test_single_run_captions_everything_once(world: str, tmp_path: Path) -> None:
    out = str(tmp_path / "captions")
    summary = run_caption_job(world, out, EchoCaptioner(error_every=7), batch_size=4, progress=False)
    assert summary.complete and summary.shards_completed == summary.shards_total == len(open_dataset(world).shards)
    records = _check_exactly_once(world, out)
    assert summary.error == sum(r["status"] == "error" for r in records) > 0
    manifest = storage.open_store(out).read_manifest()
    assert manifest["counts"] == {"records": 120, "ok": summary.ok, "error": summary.error}
    assert storage.open_store(out).verify_folder() == []
    assert not list(storage.open_store(out).list("parts"))  # progress parts are cleaned up
    # records carry the contract fields
    assert {"id", "image_sha256", "source", "caption", "captioner", "prompt_id", "completion_tokens", "seconds",
            "status"} <= set(records[0])


def test_rerun_of_a_complete_job_does_nothing(world: str, tmp_path: Path) -> None:
    out = str(tmp_path / "captions")
    run_caption_job(world, out, EchoCaptioner(), batch_size=8, progress=False)
    again = EchoCaptioner()
    summary = run_caption_job(world, out, again, batch_size=8, progress=False)
    assert again.calls == 0 and summary.shards_done_before == summary.shards_total


def test_retry_errors_recaptions_only_the_errors(world: str, tmp_path: Path) -> None:
    out = str(tmp_path / "captions")
    first = run_caption_job(world, out, EchoCaptioner(error_every=5), batch_size=8, progress=False)
    assert first.error > 0
    second = run_caption_job(world, out, EchoCaptioner(), batch_size=8, retry_errors=True, progress=False)
    assert second.captioned == first.error and second.error == 0
    records = _check_exactly_once(world, out)
    assert all(r["status"] == "ok" for r in records)


def test_workers_split_the_shards_and_fan_in(world: str, tmp_path: Path) -> None:
    out = str(tmp_path / "captions")
    seen = []
    for worker in range(3):
        summary = run_caption_job(world, out, EchoCaptioner(), batch_size=8, worker=worker, num_workers=3,
                                  progress=False)
        seen.append(summary.captioned)
        if worker < 2:
            assert not summary.complete
            with pytest.raises(IncompleteCaptionSet):
                finalize_caption_set(world, out)
    assert sum(seen) == 120 and all(n > 0 for n in seen)
    finalize_caption_set(world, out)
    _check_exactly_once(world, out)


def test_budget_stop_then_rerun_continues(world: str, tmp_path: Path) -> None:
    out = str(tmp_path / "captions")
    first = run_caption_job(world, out, EchoCaptioner(budget=37), batch_size=4, part_size=3, progress=False)
    assert first.stopped == "budget" and not first.complete and first.captioned == 37
    with pytest.raises(storage.IncompleteFolder):
        list(iter_caption_records(out))
    second_captioner = EchoCaptioner()
    second = run_caption_job(world, out, second_captioner, batch_size=4, part_size=3, progress=False)
    assert second.complete and second.captioned == 120 - 37  # nothing captioned twice
    _check_exactly_once(world, out)


_JOB = textwrap.dedent(
    """
    import sys
    from sharegpt4v.captioning.job import run_caption_job
    from tests.captioning.doubles import EchoCaptioner
    world, out, log, error_every, delay, retry = sys.argv[1:]
    captioner = EchoCaptioner(error_every=int(error_every), delay=float(delay), request_log=log)
    summary = run_caption_job(world, out, captioner, batch_size=3, part_size=2, retry_errors=retry == "retry",
                              progress=False)
    print("complete" if summary.complete else "incomplete", flush=True)
    """
)


class _NoRequestTwice:
    """After each run of a killed-and-rerun job: no id it requested had been published before it.

    `retry`: only `ok` records count (a retry asks for published errors again, by design).
    """

    def __init__(self, out: Path, log: Path, retry: bool = False):
        self.out, self.log, self.retry = out, log, retry
        self.offset = len(self._lines())  # requests of earlier runs are not this check's
        self.before = self._published()
        self.requested: Counter = Counter()

    def _published(self) -> set[str]:
        return {i for i, status in published_records(self.out).items() if status == "ok" or not self.retry}

    def _lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def __call__(self) -> None:
        lines = self._lines()
        new = lines[self.offset:]
        self.offset = len(lines)
        self.requested.update(new)
        again = sorted(set(new) & self.before)
        assert not again, f"{len(again)} published id(s) requested again, e.g. {again[0]}"
        self.before = self._published()


def _job(world: str, out: Path, log: Path, error_every: int, delay: float = 0.05,
         retry: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _JOB, world, str(out), str(log), str(error_every), str(delay),
                             "retry" if retry else "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(world: str, tmp_path: Path) -> None:
    out, log = tmp_path / "captions", tmp_path / "requests.log"
    check = _NoRequestTwice(out, log)
    assert kill_at_random_moments(lambda: _job(world, out, log, 9), out, kills=5, seed=1234, after_each=check) == 5
    _check_exactly_once(world, str(out))
    assert list(storage.open_store(str(out)).list("parts")) == []
    assert set(check.requested) == set(_input(world))  # a killed run's unpublished work is asked again, no more


def test_sigkill_during_retry_errors_never_recaptions_an_ok_record(world: str, tmp_path: Path) -> None:
    out, log = tmp_path / "captions", tmp_path / "requests.log"
    first = _job(world, out, log, 2, delay=0.0)
    assert first.communicate(timeout=300)[0].strip() == "complete"
    errors = {i for i, status in published_records(out).items() if status == "error"}
    assert len(errors) > 40
    check = _NoRequestTwice(out, log, retry=True)
    assert kill_at_random_moments(lambda: _job(world, out, log, 0, delay=0.15, retry=True), out, kills=5, seed=7,
                                  after_each=check) == 5
    assert set(check.requested) == errors  # only the errors were asked again
    records = _check_exactly_once(world, str(out))
    assert all(r["status"] == "ok" for r in records)
    assert storage.open_store(str(out)).is_complete()


def test_records_are_in_shard_order(world: str, tmp_path: Path) -> None:
    out = str(tmp_path / "captions")
    run_caption_job(world, out, EchoCaptioner(), batch_size=7, progress=False)
    order = [sample_meta(s)["id"] for s in open_dataset(world).samples()]
    assert [r["id"] for r in iter_caption_records(out)] == order
    marker = json.loads((tmp_path / "captions" / "records" / "train-000000.done.json").read_text())
    assert marker["records"] == 5


class _OtherCaptioner(EchoCaptioner):
    name = "another-captioner:test"


def test_another_captioner_is_refused_unless_the_set_is_overwritten(world: str, tmp_path: Path) -> None:
    out = str(tmp_path / "captions")
    run_caption_job(world, out, EchoCaptioner(), batch_size=8, progress=False)
    assert storage.open_store(out).read_manifest()["made_from"]["captioner"] == {"name": EchoCaptioner.name}
    other = _OtherCaptioner()
    with pytest.raises(OutputMismatch, match=r"captioner\.name: echo-captioner:test -> another-captioner:test") as err:
        run_caption_job(world, out, other, batch_size=8, progress=False)
    assert "--overwrite" in str(err.value) and "\n" not in str(err.value) and other.calls == 0
    with pytest.raises(OutputMismatch, match=r"split: all -> test"):  # another input is another set too
        run_caption_job(world, out, EchoCaptioner(), batch_size=8, split="test", progress=False)

    # identity, when a captioner has one, is what counts (e.g. the checkpoint digest, not its URI)
    same = EchoCaptioner()
    same.identity = {"name": EchoCaptioner.name}
    assert run_caption_job(world, out, same, batch_size=8, progress=False).captioned == 0

    replaced = run_caption_job(world, out, other, batch_size=8, progress=False, overwrite=True)
    assert replaced.complete and replaced.captioned == len(_input(world))
    assert {r["captioner"] for r in iter_caption_records(out)} == {other.name}

"""The caption quality report: what a user checks when comparing caption sets."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sharegpt4v import storage
from sharegpt4v.captioning.job import iter_caption_records, run_caption_job
from sharegpt4v.captioning.report import (
    POS_CLASSES,
    build_report,
    report_metrics,
    run_report,
    world_caption_sets,
    write_report,
)
from sharegpt4v.config import WorldConfig
from sharegpt4v.world.generate import generate_world
from tests.captioning.doubles import EchoCaptioner

XSS = "<script>alert('x')</script> & a red circle"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("world"))
    generate_world(uri, 60, 0, WorldConfig(), progress=False)
    return uri


@pytest.fixture(scope="module")
def echo(world: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A caption set written by the job: nonsense captions and some refusals."""
    out = str(tmp_path_factory.mktemp("echo") / "captions")
    run_caption_job(world, out, EchoCaptioner(error_every=4), batch_size=8, progress=False)
    return out


@pytest.fixture(scope="module")
def caption_sets(world: str, echo: str) -> dict[str, Any]:
    sets: dict[str, Any] = dict(world_caption_sets(world))
    sets["echo"] = echo
    # Hostile text (every id, so it shows in the samples) plus one id the world does not have.
    sets["hostile"] = [{"id": r["id"], "caption": XSS, "status": "ok"} for r in sets["world:brief"]]
    sets["hostile"].append({"id": "not-in-the-world", "caption": "a blue square", "status": "ok"})
    return sets


@pytest.fixture(scope="module")
def report(caption_sets: dict[str, Any], world: str) -> dict[str, Any]:
    return build_report(caption_sets, world, samples=5)


def test_detailed_captions_state_the_facts_and_brief_ones_do_not(report: dict[str, Any]) -> None:
    detailed, brief = report["sets"]["world:detailed"], report["sets"]["world:brief"]
    assert detailed["facts"]["scored"] == brief["facts"]["scored"] == 60
    assert detailed["facts"]["mean_recall"] >= 0.99 and detailed["facts"]["mean_hallucinated"] == 0
    assert set(detailed["facts"]["recall_by_kind"].values()) == {1.0}
    assert brief["facts"]["mean_recall"] < 0.35
    assert brief["facts"]["recall_by_kind"]["position"] < detailed["facts"]["recall_by_kind"]["position"]
    assert detailed["length"]["chars"]["mean"] > 5 * brief["length"]["chars"]["mean"]
    assert detailed["length"]["tokens"]["median"] > 5 * brief["length"]["tokens"]["median"]
    assert report["token_unit"] == "whitespace words"
    chars = detailed["length"]["chars"]
    assert chars["min"] <= chars["p10"] <= chars["median"] <= chars["p90"] <= chars["max"]
    assert sum(chars["histogram"]["counts"]) == 60
    # the histograms of all sets share their bins, so they overlay
    assert chars["histogram"]["edges"] == brief["length"]["chars"]["histogram"]["edges"]


def test_comparison_table_has_one_row_per_set_in_order(report: dict[str, Any]) -> None:
    rows = {r["set"]: r for r in report["comparison"]}
    assert [r["set"] for r in report["comparison"]] == ["world:brief", "world:detailed", "echo", "hostile"]
    assert rows["world:detailed"]["fact_recall"] >= 0.99 and rows["world:brief"]["fact_recall"] < 0.35
    assert rows["world:detailed"]["mean_chars"] > 5 * rows["world:brief"]["mean_chars"]
    assert rows["hostile"]["duplicates"] == 59  # 60 copies of one caption + one other
    metrics = report_metrics(report)
    assert metrics["world:detailed.fact_recall"] == rows["world:detailed"]["fact_recall"]
    assert metrics["echo.error"] == rows["echo"]["error"]


def test_job_errors_are_counted_by_reason(report: dict[str, Any], echo: str) -> None:
    records = list(iter_caption_records(echo))
    errors = sum(r["status"] == "error" for r in records)
    counts = report["sets"]["echo"]["counts"]
    assert 0 < errors < 60
    assert counts == {"records": 60, "ok": 60 - errors, "error": errors, "error_reasons": {"refusal": errors},
                      "duplicate_ids": 0, "not_in_dataset": 0}
    assert report["sets"]["echo"]["facts"]["mean_recall"] < 0.1  # nonsense states almost nothing
    assert report_metrics(report)["echo.error.refusal"] == errors


def test_ids_missing_from_the_dataset_are_counted(report: dict[str, Any]) -> None:
    facts = report["sets"]["hostile"]["facts"]
    assert facts["missing_in_dataset"] == 1 and facts["scored"] == 60
    assert report["sets"]["hostile"]["counts"]["not_in_dataset"] == 1


def test_pos_tagger_on_a_known_sentence() -> None:
    sentence = "A large red circle sits above a small blue square."
    report = build_report({"sentence": [{"id": "a", "caption": sentence, "status": "ok"}]})
    counts = report["sets"]["sentence"]["pos"]["per_caption"]
    assert counts["adjective"] >= 2 and counts["noun"] == 2 and counts["verb"] == 1 and counts["preposition"] == 1
    assert counts["numeral"] == 0 and counts["other"] == 2  # the two articles; the full stop is not a word
    share = report["sets"]["sentence"]["pos"]["share"]
    assert list(share) == list(POS_CLASSES) and sum(share.values()) == pytest.approx(1.0, abs=1e-3)


def test_detailed_captions_use_more_modifiers_than_a_noun_list(report: dict[str, Any]) -> None:
    nouns = build_report({"nouns": [{"id": "a", "caption": "circle, square, star, triangle, diamond",
                                     "status": "ok"}]})["sets"]["nouns"]["pos"]["share"]
    assert nouns["noun"] == 1.0
    detailed = report["sets"]["world:detailed"]["pos"]
    assert sum(detailed["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert detailed["share"]["adjective"] > 0.1 + nouns["adjective"]
    assert detailed["share"]["preposition"] > 0.05 + nouns["preposition"]
    assert detailed["per_caption"]["noun"] > 5 * report["sets"]["world:brief"]["pos"]["per_caption"]["noun"]


def test_diversity_on_a_hand_made_set() -> None:
    records = [
        {"id": "1", "caption": "Red circle red circle red circle", "status": "ok"},
        {"id": "2", "caption": "blue square", "status": "ok"},
        {"id": "3", "caption": "blue square", "status": "ok"},
        {"id": "4", "status": "error", "reason": "timeout", "detail": "slow"},
        {"id": "5", "status": "error", "reason": "timeout", "detail": "slow"},
        {"id": "6", "status": "error", "reason": "empty", "detail": ""},
    ]
    s = build_report({"hand": records})["sets"]["hand"]
    assert s["counts"]["error_reasons"] == {"empty": 1, "timeout": 2} and s["counts"]["ok"] == 3
    d = s["diversity"]
    # words 6+2+2, 4 distinct; bigrams 5+1+1, 3 distinct; trigrams 4+0+0, 2 distinct
    assert (d["distinct_1"], d["distinct_2"], d["distinct_3"]) == (0.4, round(3 / 7, 4), 0.5)
    # caption 1 has three 4-grams of which one repeats: rate 1/3; the others have none
    assert d["repeated_4gram_captions"] == round(1 / 3, 4) and d["repeated_4gram_rate"] == round(1 / 9, 4)
    assert d["duplicates"] == 1 and d["unique_captions"] == 2
    assert d["top_duplicates"] == [{"caption": "blue square", "count": 2}]
    assert s["length"]["chars"]["max"] == 32 and s["length"]["tokens"]["min"] == 2
    assert s["facts"] is None  # no dataset, no fact scores


def test_a_tokenizer_counts_tokens() -> None:
    class CharTokenizer:
        name_or_path = "chars"

        def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    records = [{"id": str(i), "caption": "x" * (i + 1), "status": "ok"} for i in range(10)]
    report = build_report({"set": records}, tokenizer=CharTokenizer())
    assert report["token_unit"] == "tokenizer chars"
    length = report["sets"]["set"]["length"]
    assert length["tokens"]["mean"] == length["chars"]["mean"] == 5.5


def test_samples_are_deterministic_and_complete(report: dict[str, Any], caption_sets: dict[str, Any],
                                                world: str) -> None:
    ids = [s["id"] for s in report["samples"]]
    assert len(ids) == 5 == len(set(ids))
    reordered = build_report(dict(reversed(list(caption_sets.items()))), world, samples=5)
    assert [s["id"] for s in reordered["samples"]] == ids
    for sample in report["samples"]:
        assert set(sample["captions"]) == set(caption_sets)
        assert sample["image"].startswith("data:image/png;base64,")


def _data_urls(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]


def test_html_report_is_self_contained_and_escaped(report: dict[str, Any], tmp_path: Path) -> None:
    uris = write_report(report, str(tmp_path / "report"))
    page = Path(uris["html"]).read_text()
    saved = json.loads(Path(uris["json"]).read_text())
    assert saved["comparison"] == report["comparison"] and saved["sets"] == report["sets"]
    assert [s["id"] for s in saved["samples"]] == [s["id"] for s in report["samples"]]
    assert '<table id=comparison>' in page and "hallucinated_per_caption" in page
    assert "<script" not in page.lower()  # no JS at all, and the hostile caption is escaped
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; a red circle" in page
    links = re.findall(r"(?:src|href)=['\"]?([^'\" >]*)", page)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)  # no external assets
    pngs = _data_urls(page)
    assert len(pngs) == 3 + 5  # lengths, POS, fact recall + the sample images
    for png in pngs:
        Image.open(io.BytesIO(png)).verify()
    assert sorted(p.name for p in (tmp_path / "report" / "plots").iterdir()) == \
        ["fact_recall.png", "lengths.png", "pos.png"]
    # a report read back from JSON gets its sample images from the dataset again
    again = write_report(saved, str(tmp_path / "again"), dataset_uri=report["dataset"]["uri"])
    assert len(_data_urls(Path(again["html"]).read_text())) == 8


def test_write_report_to_s3(report: dict[str, Any], s3_uri: str) -> None:
    uris = write_report(report, s3_uri)
    assert uris["html"] == f"{s3_uri}/report.html"
    store = storage.open_store(s3_uri)
    assert store.get_bytes("report.html").startswith(b"<!DOCTYPE html>")
    assert store.get_json("report.json")["set_order"] == report["set_order"]


def test_run_report_logs_to_mlflow(caption_sets: dict[str, Any], world: str, tmp_path: Path,
                                   mlflow_sqlite: str) -> None:
    from mlflow.tracking import MlflowClient

    run_report(caption_sets, str(tmp_path / "report"), world, samples=3)
    client = MlflowClient(mlflow_sqlite)
    (run,) = client.search_runs([client.get_experiment_by_name("sharegpt4v").experiment_id])
    assert run.info.run_name == "caption-report" and run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["world:detailed.fact_recall"] >= 0.99 and metrics["world:brief.fact_recall"] < 0.35
    assert metrics["world:detailed.mean_chars"] > 5 * metrics["world:brief.mean_chars"]
    assert metrics["echo.error.refusal"] > 0 and "hostile.distinct_2" in metrics
    assert run.data.params["set.echo"].endswith("captions")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "caption-report")}
    assert {"caption-report/report.html", "caption-report/report.json", "caption-report/plots"} <= artifacts

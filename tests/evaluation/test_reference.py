"""The scorers reproduce LLaVA-1.5-13B's published MME and MMBench numbers from its released answers."""

from __future__ import annotations

import base64
from pathlib import Path

import pandas as pd
import pytest

from sharegpt4v.evaluation import get_benchmark, score_answers
from sharegpt4v.evaluation.common import parse_jsonl
from tests.evaluation.builders import image_bytes

REFERENCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference-scores" / "llava-v1.5-13b"


@pytest.fixture(autouse=True)
def _reference_present() -> None:
    # CI runs with ../shared beside the clone; a missing folder is a broken setup, not a reason to skip.
    assert REFERENCE.is_dir(), f"reference answers not found at {REFERENCE} (../shared must sit beside the repo)"

MME = REFERENCE / "MME"
MMBENCH_XLSX = REFERENCE / "MMBench" / "mmbench_answers_upload_mmbench_dev_20230712_llava-v1.5-13b.xlsx"
MMBENCH_JSONL = REFERENCE / "MMBench" / "mmbench_answers_mmbench_dev_20230712_llava-v1.5-13b.jsonl"


def test_mme_reproduces_perception_1531_3_and_cognition_295_36() -> None:
    result = score_answers("mme", str(MME / "MME_answers_llava-v1.5-13b.jsonl"), str(MME / "ground_truth"))
    assert result["perception"] == pytest.approx(1531.3, abs=0.05)
    assert result["cognition"] == pytest.approx(295.36, abs=0.005)
    assert result["questions"] == 2374 and result["missing"] == 0
    assert len(result["categories"]) == 14
    for values in result["categories"].values():
        assert 0 <= values["acc_plus"] <= values["acc"] <= 1
        assert values["score"] == pytest.approx(100 * (values["acc"] + values["acc_plus"]))


def test_mme_question_file_matches_the_ground_truth_prompts() -> None:
    # LLaVA's question file holds the same prompts the ground-truth loader builds.
    questions = get_benchmark("mme", str(MME / "ground_truth")).load(images=False)
    reference = parse_jsonl((MME / "MME_llava_mme.jsonl").read_text())
    assert sorted(q.prompt for q in questions) == sorted(r["text"] for r in reference)


def test_mmbench_upload_reproduces_circular_67_7_and_vanilla_75_43() -> None:
    result = score_answers("mmbench", str(MMBENCH_XLSX))
    assert 100 * result["circular"] == pytest.approx(67.7, abs=0.05)
    assert 100 * result["vanilla"] == pytest.approx(75.43, abs=0.005)
    assert result["groups"] == 1176 and result["questions"] == 4377 and result["missing"] == 0


def test_mmbench_answers_jsonl_against_a_tsv_gives_the_same_and_breakdowns(tmp_path: Path) -> None:
    # No TSV ships with the reference answers: rebuild one from the upload file (which carries
    # the ground truth) with made-up categories, then score LLaVA's answers JSONL against it.
    upload = pd.read_excel(MMBENCH_XLSX)
    image = base64.b64encode(image_bytes((0, 0, 0))).decode()
    group = upload["index"] % 1_000_000
    upload["category"] = ["even" if g % 2 == 0 else "odd" for g in group]
    upload["l2-category"] = ["coarse_perception" if g % 3 else "logic_reasoning" for g in group]
    upload["hint"] = None
    upload["image"] = image
    upload.drop(columns=["prediction"]).to_csv(tmp_path / "mmbench_dev_20230712.tsv", sep="\t", index=False)
    result = score_answers("mmbench", str(MMBENCH_JSONL), str(tmp_path))
    assert 100 * result["circular"] == pytest.approx(67.69, abs=0.005)
    assert 100 * result["vanilla"] == pytest.approx(75.43, abs=0.005)
    assert set(result["category"]) == {"even", "odd"} and set(result["l2-category"]) == {"coarse_perception", "logic_reasoning"}
    counts = (group.drop_duplicates() % 2 == 0).value_counts()
    weighted = (result["category"]["even"] * counts[True] + result["category"]["odd"] * counts[False]) / 1176
    assert weighted == pytest.approx(result["circular"])
    # The xlsx with the TSV beside it gets the same breakdowns.
    with_tsv = score_answers("mmbench", str(MMBENCH_XLSX), str(tmp_path / "mmbench_dev_20230712.tsv"))
    assert with_tsv["category"] == result["category"] and with_tsv["circular"] == result["circular"]

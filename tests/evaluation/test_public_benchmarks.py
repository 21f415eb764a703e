"""Loaders for user-supplied benchmark files in the layouts they ship in, and their scorers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from sharegpt4v.evaluation import BENCHMARKS, BenchmarkError, get_benchmark, score_answers
from sharegpt4v.evaluation.common import MULTIPLE_CHOICE_PROMPT, SHORT_ANSWER_PROMPT, dump_jsonl
from sharegpt4v.evaluation.mmbench import upload_table
from sharegpt4v.evaluation.scienceqa import parse_answer
from sharegpt4v.evaluation.textvqa import normalize_answer, prompt_question, vqa_score
from tests.evaluation.builders import (
    make_gqa,
    make_mmbench,
    make_mme,
    make_scienceqa,
    make_textvqa,
    mmbench_rows,
    oracle,
)


def _score(benchmark, questions, texts):  # type: ignore[no-untyped-def]
    records = [benchmark.record(q, t, "m") for q, t in zip(questions, texts)]
    return benchmark.score(questions, records), records


def test_registry_names() -> None:
    assert set(BENCHMARKS) == {"world-vqa", "mme", "mmbench", "scienceqa", "gqa", "textvqa"}
    with pytest.raises(BenchmarkError, match="unknown benchmark 'vqav2'"):
        get_benchmark("vqav2")
    with pytest.raises(BenchmarkError, match="does not exist"):
        get_benchmark("mme", "/nonexistent/MME").load()


# MME -----------------------------------------------------------------------------------------


def test_mme_loads_nested_and_flat_layouts(tmp_path: Path) -> None:
    mme = get_benchmark("mme", str(make_mme(tmp_path / "MME")))
    questions = mme.load()
    assert len(questions) == 10
    ids = [q.id for q in questions]  # categories in the official tool's order
    assert ids[4:8] == ["artwork/images/10002.jpg"] * 2 + ["artwork/images/10049.jpg"] * 2
    assert ids[:2] == ["existence/0001.jpg"] * 2 and ids[-1] == "code_reasoning/0001.png"
    first = questions[4]
    assert first.prompt == f"Is this artwork a painting?\n{SHORT_ANSWER_PROMPT}" and first.answer == "yes"
    two_spaces = next(q for q in questions if "dog" in q.prompt)
    assert two_spaces.prompt == f"Is there a dog in this image?\n{SHORT_ANSWER_PROMPT}"
    assert Image.open(io.BytesIO(next(q for q in questions if q.id.endswith(".png")).image)).format == "PNG"
    assert mme.questions() == questions and len(get_benchmark("mme", str(tmp_path / "MME"), limit=3).questions()) == 3


def test_mme_scores_by_hand(tmp_path: Path) -> None:
    mme = get_benchmark("mme", str(make_mme(tmp_path / "MME")))
    questions = mme.load()
    texts = ["yes", "no", "Yes, there is.", "Not really",  # existence: all right -> 200
             "Yes", "No", "Yes", "Yes",  # artwork: 3/4 right, 1 of 2 images -> 75 + 50
             "maybe", "no"]  # code_reasoning: "other" is wrong -> 50 + 0
    result, records = _score(mme, questions, texts)
    assert result["categories"]["artwork"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0}
    assert result["categories"]["existence"]["score"] == 200.0
    assert result["categories"]["code_reasoning"] == {"acc": 0.5, "acc_plus": 0.0, "score": 50.0}
    assert (result["perception"], result["cognition"], result["total"]) == (325.0, 50.0, 375.0)
    # Answers files are matched like convert_answer_to_mme.py: category, image, question text.
    path = tmp_path / "answers.jsonl"
    path.write_bytes(dump_jsonl(reversed(records)))
    assert score_answers("mme", str(path), str(tmp_path / "MME"))["perception"] == 325.0
    # A ground-truth folder (the official tool's layout) scores the same file.
    truth = tmp_path / "truth"
    truth.mkdir()
    for category in ("artwork", "existence", "code_reasoning"):
        lines = [f"{q.meta['image']}\t{q.meta['question']}\t{q.answer.title()}\n" for q in questions if q.category == category]
        (truth / f"{category}.txt").write_text("".join(lines))
    assert score_answers("mme", str(path), str(truth))["total"] == 375.0
    with pytest.raises(BenchmarkError, match="ground-truth files only"):
        get_benchmark("mme", str(truth)).questions()
    missing = mme.score(questions, records[:8])
    assert missing["missing"] == 2 and missing["cognition"] == 0.0


# MMBench -------------------------------------------------------------------------------------


def test_mmbench_tsv_loading(tmp_path: Path) -> None:
    bench = get_benchmark("mmbench", str(make_mmbench(tmp_path / "mmbench_dev_20230712.tsv")))
    questions = bench.load()
    assert [q.id for q in questions] == [0, 1_000_000, 2_000_000, 3_000_000, 1, 1_000_001]
    first = questions[0]
    assert first.prompt == ("Look closely.\nIt is round.\nWhich fruit is red?\nA. apple\nB. pear\nC. plum\nD. fig\n"
                            f"{MULTIPLE_CHOICE_PROMPT}")
    assert questions[1].meta["options"] == ["fig", "apple", "pear", "plum"] and questions[1].answer == "B"
    assert questions[4].prompt == f"Is it day?\nA. yes\nB. no\n{MULTIPLE_CHOICE_PROMPT}"  # NaN C/D and hint dropped
    assert all(Image.open(io.BytesIO(q.image)).size == (8, 8) for q in questions)  # "0" refers to row 0's image
    record = bench.record(questions[4], "A", "m")
    assert record["prompt"] == "Is it day?\nA. yes\nB. no" and record["options"] == ["yes", "no"]
    assert record["option_char"] == ["A", "B"] and record["round_id"] == 0
    limited = get_benchmark("mmbench", str(tmp_path), limit=1).questions()
    assert [q.id for q in limited] == [0, 1_000_000, 2_000_000, 3_000_000]  # whole circular groups


def test_mmbench_circular_scoring_and_upload(tmp_path: Path) -> None:
    bench = get_benchmark("mmbench", str(make_mmbench(tmp_path / "dev.tsv")))
    questions = bench.load()
    texts = ["A", "B.", "(C) plum", "The answer is D", "A", "A"]  # question 1's second copy is wrong
    result, records = _score(bench, questions, texts)
    assert result["circular"] == 0.5 and result["vanilla"] == 1.0 and result["groups"] == 2
    assert result["category"] == {"fruit": 1.0, "time": 0.0}
    assert result["l2-category"] == {"coarse_perception": 1.0, "logic_reasoning": 0.0}
    assert _score(bench, questions, [str(q.answer) for q in questions])[0]["circular"] == 1.0
    xlsx = tmp_path / "upload.xlsx"
    xlsx.write_bytes(upload_table(questions, records))
    table = pd.read_excel(xlsx)
    assert list(table.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert table["prediction"].tolist()[:2] == ["A", "B."] and pd.isna(table["C"].iloc[4])
    assert score_answers("mmbench", str(xlsx))["circular"] == 0.5
    jsonl = tmp_path / "answers.jsonl"
    jsonl.write_bytes(dump_jsonl(records))
    assert score_answers("mmbench", str(jsonl), str(tmp_path / "dev.tsv")) == result


def test_mmbench_test_split_without_answers_is_not_scored(tmp_path: Path) -> None:
    rows = [{**r, "answer": None} for r in mmbench_rows()]
    bench = get_benchmark("mmbench", str(make_mmbench(tmp_path / "test.tsv", rows)))
    result, _ = _score(bench, bench.load(), ["A"] * 6)
    assert "circular" not in result and "evaluation server" in result["unscored"]


# ScienceQA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, index", [
    ("B", 1), ("B. fire", 1), ("The answer is B.", 1), ("C", 2), ("D", -1), ("E", -1), ("b", -1),
    ("The answer is A. The answer is B.", -1), ("FAILED", -1), ("B.fire", -1),
])
def test_scienceqa_answer_parsing(text: str, index: int) -> None:
    assert parse_answer(text, ["ice", "fire", "snow"]) == index


def test_scienceqa_img_subset_prompts_and_scoring(tmp_path: Path) -> None:
    bench = get_benchmark("scienceqa", str(make_scienceqa(tmp_path / "scienceqa")))
    questions = bench.questions()
    assert [q.id for q in questions] == ["1", "2"]  # test split, image problems only
    assert questions[0].prompt == (f"Context: Think about it.\nWhich is hot?\nA. ice\nB. fire\nC. snow\n{MULTIPLE_CHOICE_PROMPT}")
    assert questions[1].prompt.startswith("Which is a verb?\nA. run\nB. blue\n")
    assert Image.open(io.BytesIO(questions[0].image)).getpixel((0, 0)) == (0, 0, 1)
    result, records = _score(bench, questions, ["B", "B"])
    assert result["img_accuracy"] == 0.5 and "accuracy" not in result
    assert result["subject"] == {"language science": 0.0, "natural science": 1.0}
    assert records[0]["prompt"].startswith("<image>\nContext: Think about it.")
    # LLaVA's own answers cover the text-only problems too: accuracy over the whole test split.
    path = tmp_path / "answers.jsonl"
    path.write_bytes(dump_jsonl([*records, {"question_id": "3", "prompt": "Pick A.", "text": "A"}]))
    full = score_answers("scienceqa", str(path), str(tmp_path / "scienceqa"))
    assert full["accuracy"] == pytest.approx(2 / 3) and full["img_accuracy"] == 0.5 and full["questions"] == 3


# GQA -----------------------------------------------------------------------------------------


def test_gqa_loading_and_scoring(tmp_path: Path) -> None:
    bench = get_benchmark("gqa", str(make_gqa(tmp_path / "gqa")))
    questions = bench.questions()
    assert [q.id for q in questions] == ["201", "202", "203", "204"]
    assert questions[1].prompt == f"Is it overcast?\n{SHORT_ANSWER_PROMPT}"
    assert questions[0].image is questions[1].image  # read once per image
    # rstrip('.').lower() then exact: "the red" keeps its article and is wrong; 204 is not balanced.
    result, _ = _score(bench, questions, ["Table.", "Yes", "the red", "blue"])
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert (result["binary"], result["open"]) == (1.0, 0.5)
    assert _score(bench, questions, [str(q.answer) for q in questions])[0]["accuracy"] == 1.0
    # ShareGPT4V's layout: the json and images/ directly in the folder.
    flat = tmp_path / "flat"
    (flat / "images").mkdir(parents=True)
    (flat / "testdev_balanced_questions.json").write_text((tmp_path / "gqa/data/testdev_balanced_questions.json").read_text())
    for image in ("n1", "n2"):
        (flat / "images" / f"{image}.jpg").write_bytes(b"jpeg")
    assert len(get_benchmark("gqa", str(flat)).questions()) == 4


# TextVQA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, score", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_textvqa_leave_one_out_score(k: int, score: float) -> None:
    assert vqa_score("stop", ["stop"] * k + ["go"] * (10 - k)) == pytest.approx(score)


@pytest.mark.parametrize("raw, normal", [
    ("The poster shows a 10% discount.", "poster shows 10% discount"),
    ("Two", "2"), ("none", "0"), ("dont", "don't"), ("Coca-Cola", "coca cola"), ("e - mail", "e mail"),
    ("3.5", "3.5"), ("hello, world?", "hello world"), ("it's", "it 's"), ("1,000", "1000"),
    ("Main St.", "main st"), ("(B)", "b"), ("an apple", "apple"), ("  STOP\n", "stop"),
])
def test_evalai_answer_normalisation(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal


@pytest.mark.parametrize("ocr_in_items", [True, False])
def test_textvqa_loading_and_scoring(tmp_path: Path, ocr_in_items: bool) -> None:
    bench = get_benchmark("textvqa", str(make_textvqa(tmp_path / "textvqa", ocr_in_items)))
    questions = bench.questions()
    assert questions[0].prompt == f"What does the sign say?\nReference OCR token: STOP, Main St\n{SHORT_ANSWER_PROMPT}"
    assert questions[2].prompt == f"How many bottles?\nReference OCR token: \n{SHORT_ANSWER_PROMPT}"
    assert questions[0].id == "00a1b2c3d4e5f607" and len(questions[0].answer) == 10
    assert prompt_question(questions[1].prompt) == "what street is this?"
    # "stop" matches 5 answers (stop x4, "stop.") -> 1; "Main St" matches 2 -> .6; "two" -> "2" matches 3 -> .9
    result, records = _score(bench, questions, ["STOP", "Main St", "two"])
    assert result["accuracy"] == pytest.approx((1 + 0.6 + 0.9) / 3)
    path = tmp_path / "answers.jsonl"
    path.write_bytes(dump_jsonl(records))
    assert score_answers("textvqa", str(path), str(tmp_path / "textvqa"))["accuracy"] == pytest.approx(result["accuracy"])


def test_textvqa_without_ocr_tokens_has_two_line_prompts(tmp_path: Path) -> None:
    root = make_textvqa(tmp_path / "textvqa")
    data = json.loads((root / "TextVQA_0.5.1_val.json").read_text())
    for item in data["data"]:
        item.pop("ocr_tokens")
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    bench = get_benchmark("textvqa", str(root))
    questions = bench.questions()
    assert questions[0].prompt == f"What does the sign say?\n{SHORT_ANSWER_PROMPT}"
    assert _score(bench, questions, oracle_first(questions))[0]["accuracy"] == 1.0


def oracle_first(questions):  # type: ignore[no-untyped-def]
    return [max(q.answer, key=q.answer.count) for q in questions]


def test_public_benchmarks_give_the_oracle_full_marks(tmp_path: Path) -> None:
    answerer = oracle()
    mme = get_benchmark("mme", str(make_mme(tmp_path / "MME")))
    questions = mme.questions()
    result, _ = _score(mme, questions, answerer.answer(questions))
    assert result["perception"] == 400.0 and result["cognition"] == 200.0
    for name, source in (("mmbench", make_mmbench(tmp_path / "dev.tsv")), ("scienceqa", make_scienceqa(tmp_path / "sqa")),
                         ("gqa", make_gqa(tmp_path / "gqa"))):
        bench = get_benchmark(name, str(source))
        questions = bench.questions()
        texts = [("ABCDE"[q.answer] if name == "scienceqa" else str(q.answer)) for q in questions]
        result, _ = _score(bench, questions, texts)
        assert result[{"mmbench": "circular", "scienceqa": "img_accuracy", "gqa": "accuracy"}[name]] == 1.0

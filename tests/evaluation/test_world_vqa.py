"""The synthetic world's VQA benchmark, and `evaluate` end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sharegpt4v.config import load_recipe
from sharegpt4v.data.shards import open_dataset, sample_meta
from sharegpt4v.evaluation import BenchmarkError, evaluate, flat_metrics, get_benchmark, parse_jsonl, score_answers
from sharegpt4v.evaluation.common import MULTIPLE_CHOICE_PROMPT, SHORT_ANSWER_PROMPT, Question, rotate
from sharegpt4v.evaluation.world_vqa import item_questions, score_world
from tests.evaluation.builders import Scripted, oracle
from tests.modeling.fixtures import tiny_model


def _recipe(*overrides: str):  # type: ignore[no-untyped-def]
    return load_recipe("tiny", list(overrides))


def _items(world_uri: str, split: str = "test") -> list[dict]:
    return [item for s in open_dataset(world_uri).samples(split) for item in sample_meta(s)["vqa"]]


def test_items_become_questions(world_uri: str) -> None:
    items = _items(world_uri)
    kinds = {i["kind"] for i in items}
    assert kinds == {"yesno", "mc", "short"}
    mc = next(i for i in items if i["kind"] == "mc")
    rotations = item_questions(mc, b"png")
    assert [q.id for q in rotations] == [f"{mc['qid']}-r{k}" for k in range(4)]
    correct = mc["options"]["ABCD".index(mc["answer"])]
    for k, q in enumerate(rotations):
        assert q.meta["options"][("ABCD".index(mc["answer"]) + k) % 4] == correct
        assert q.meta["options"]["ABCD".index(q.answer)] == correct
        lines = q.prompt.split("\n")
        assert lines[0] == mc["question"] and lines[-1] == MULTIPLE_CHOICE_PROMPT
        assert lines[1:5] == [f"{letter}. {option}" for letter, option in zip("ABCD", q.meta["options"])]
    yesno = next(i for i in items if i["kind"] == "yesno")
    (question,) = item_questions(yesno, b"png")
    assert question.prompt == f"{yesno['question']}\n{SHORT_ANSWER_PROMPT}" and question.meta["pair"] == yesno["pair"]
    bench = get_benchmark("world-vqa", world_uri)
    assert len(bench.questions()) == sum(4 if i["kind"] == "mc" else 1 for i in items)
    assert len({q.image for q in bench.questions()}) == len(list(open_dataset(world_uri).samples("test")))


def test_oracle_scores_one_everywhere_and_always_yes_scores_half(world_uri: str) -> None:
    bench = get_benchmark("world-vqa", world_uri)
    questions = bench.questions()

    def score(answerer: Scripted) -> dict:
        texts = answerer.answer(questions)
        return bench.score(questions, [bench.record(q, t, "m") for q, t in zip(questions, texts)])

    perfect = score(oracle())
    flat = flat_metrics(perfect)
    assert all(value == 1.0 for key, value in flat.items()
               if not key.endswith(("questions", "pairs", "missing", "_se", "score", "perception")))
    assert all(value == 0.0 for key, value in flat.items() if key.endswith("_se"))
    assert perfect["perception"] == 100.0 and perfect["overall"] == 1.0 and perfect["missing"] == 0
    assert set(perfect["yesno"]["categories"]) >= {"existence", "count", "position", "colour"}
    yes = score(Scripted(lambda q: "Yes"))
    assert yes["yesno"]["acc"] == 0.5 and yes["yesno"]["acc_plus"] == 0.0
    assert all((c["acc"], c["acc_plus"], c["score"]) == (0.5, 0.0, 25.0) for c in yes["yesno"]["categories"].values())
    assert yes["perception"] == 25.0  # MME's floor for a model that cannot see: half right, no pair right
    assert yes["mc"]["circular"] == 0.0 and yes["short"]["acc"] == 0.0
    assert yes["overall"] == pytest.approx(0.5 / 3)
    # Always "A": right on exactly one rotation of every question -> vanilla at chance, circular 0.
    always_a = score(Scripted(lambda q: "A"))
    assert always_a["mc"]["circular"] == 0.0
    # Short answers are normalised: number words, case and punctuation do not matter.
    words = {"0": "Zero", "1": "one", "2": "Two.", "3": "three!", "4": "FOUR", "5": "five", "6": "six"}
    spelled = score(Scripted(lambda q: words.get(str(q.answer), str(q.answer).upper() + ".")))
    assert spelled["short"]["acc"] == 1.0


def test_headlines_leave_out_constant_answers_and_carry_standard_errors() -> None:
    def q(qid: str, kind: str, category: str, answer: str, **meta: object) -> Question:
        return Question(qid, None, "p", answer, category, {"kind": kind, **meta})

    options = ["photo", "poster", "sketch", "pop art"]
    questions = [
        # style: always "photo" (constant: a blind model gets it right), colour varies
        *[q(f"s{i}-r{k}", "mc", "style", "ABCD"[k], group=f"s{i}", round=k, options=rotate(options, k))
          for i in range(4) for k in range(4)],
        *[q(f"c{i}-r{k}", "mc", "colour", "ABCD"[(i + k) % 4], group=f"c{i}", round=k,
            options=rotate(["red", "blue", "green", "pink"], k)) for i in range(4) for k in range(4)],
        # one yes/no pair per image: the model gets pair 0 fully right, pair 1 half right
        q("p0a", "yesno", "colour", "yes", pair="p0"), q("p0b", "yesno", "colour", "no", pair="p0"),
        q("p1a", "yesno", "colour", "yes", pair="p1"), q("p1b", "yesno", "colour", "no", pair="p1"),
    ]
    texts = []
    for question in questions:
        if question.meta["kind"] == "yesno":
            texts.append("yes" if question.id != "p0b" else "no")
        else:
            texts.append(question.answer if question.category == "style" else "A")  # sees style, not colour
    result = score_world(questions, texts)
    assert result["mc"]["constant_categories"] == ["style"]
    assert result["mc"]["circular"] == 0.5 and result["mc"]["circular_headline"] == 0.0
    colour = result["yesno"]["categories"]["colour"]
    assert (colour["acc"], colour["acc_plus"]) == (0.75, 0.5)
    # per pair (share right + all right) / 2: 1.0 and 0.25 -> 62.5 with the standard error of two values
    assert colour["score"] == result["perception"] == pytest.approx(62.5)
    assert colour["score_se"] == pytest.approx(100 * 0.75 / 2 ** 0.5 / 2 ** 0.5)


@pytest.mark.parametrize("limit", [1, 12, 13, 30])
def test_limit_caps_world_items_and_keeps_pairs_whole(world_uri: str, limit: int) -> None:
    questions = get_benchmark("world-vqa", world_uri, limit=limit).questions()
    items = {q.meta.get("group", q.id) for q in questions}
    assert limit - 1 <= len(items) <= max(limit, 2)  # limit=1: the first pair
    pairs = [q.meta["pair"] for q in questions if q.meta["kind"] == "yesno"]
    assert all(pairs.count(p) == 2 for p in pairs)


def test_unknown_split(world_uri: str) -> None:
    with pytest.raises(BenchmarkError, match="no 'train' split"):
        get_benchmark("world-vqa", world_uri, split="train").questions()


def test_evaluate_tiny_model_end_to_end(world_uri: str, tmp_path: Path) -> None:
    recipe = _recipe("eval.limit=30", "eval.batch_size=16", "eval.max_new_tokens=6")
    out = tmp_path / "eval"
    results = evaluate(tiny_model(), recipe, world_uri, out=str(out), model_id="tiny-random")
    world = results["world-vqa"]
    bench = get_benchmark("world-vqa", world_uri, limit=30)
    expected = len(bench.questions())
    assert world["questions"] == expected and world["missing"] == 0
    metrics = flat_metrics(results)
    rates = {k: v for k, v in metrics.items() if not k.endswith(("questions", "pairs", "missing"))}
    assert rates and all(0.0 <= v <= 1.0 for v in rates.values())
    # A random model is at or below chance: circular MC and yes/no acc+ are hard to hit by luck.
    assert world["overall"] <= 0.5 and world["mc"]["circular"] <= 0.25 and world["yesno"]["acc_plus"] <= 0.5
    records = parse_jsonl((out / "answers" / "world-vqa.jsonl").read_text())
    assert len(records) == expected and [r["question_id"] for r in records] == [q.id for q in bench.questions()]
    assert all(list(r) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"] for r in records)
    assert {r["model_id"] for r in records} == {"tiny-random"}
    assert json.loads((out / "results.json").read_text()) == results
    table = (out / "results.md").read_text()
    assert "| world-vqa | overall |" in table and "## world-vqa yes/no acc" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The answers file scores to the same results on its own.
    assert bench.score_answers(str(out / "answers" / "world-vqa.jsonl")) == world
    # Against the whole split, the questions beyond the limit are missing answers.
    full = score_answers("world-vqa", str(out / "answers" / "world-vqa.jsonl"), world_uri)
    assert full["missing"] == full["questions"] - expected > 0


def test_evaluate_several_benchmarks_with_an_answerer(world_uri: str, tmp_path: Path) -> None:
    from tests.evaluation.builders import make_mmbench, make_mme

    recipe = _recipe()
    recipe.eval = dataclasses.replace(recipe.eval, benchmarks=["world-vqa", "mme", "mmbench"])
    paths = {"mme": str(make_mme(tmp_path / "MME")), "mmbench": str(make_mmbench(tmp_path / "dev.tsv"))}
    answerer = oracle()
    results = evaluate(answerer, recipe, world_uri, paths, out=str(tmp_path / "out"))
    assert results["world-vqa"]["overall"] == 1.0
    assert results["mme"]["perception"] == 400.0 and results["mmbench"]["circular"] == 1.0
    assert all(q.image is not None for q in answerer.asked)
    metrics = flat_metrics(results)
    assert {"world-vqa.overall", "world-vqa.yesno.acc", "mme.perception", "mmbench.circular",
            "mmbench.l2-category.coarse_perception"} <= set(metrics)
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["answers/mmbench.jsonl", "answers/mmbench_upload.xlsx", "answers/mme.jsonl",
                     "answers/world-vqa.jsonl", "results.json", "results.md", "results.png"]
    # Missing sources fail before anything is answered.
    recipe.eval = dataclasses.replace(recipe.eval, benchmarks=["world-vqa", "gqa"])
    asked = len(answerer.asked)
    with pytest.raises(BenchmarkError, match="gqa: needs the GQA folder"):
        evaluate(answerer, recipe, world_uri)
    with pytest.raises(BenchmarkError, match="does not exist"):
        evaluate(answerer, recipe, world_uri, {"gqa": str(tmp_path / "nowhere")})
    with pytest.raises(BenchmarkError, match="world-vqa: needs a world dataset URI"):
        evaluate(answerer, _recipe(), None)
    assert len(answerer.asked) == asked


def test_evaluate_writes_to_s3_and_logs_to_mlflow(world_uri: str, s3_uri: str, mlflow_sqlite: str) -> None:
    from mlflow.tracking import MlflowClient

    from sharegpt4v.storage import open_store

    results = evaluate(Scripted(lambda q: "yes"), _recipe("eval.limit=20"), world_uri, out=s3_uri, model_id="always-yes")
    store = open_store(s3_uri)
    assert json.loads(store.get_bytes("results.json")) == results
    assert len(parse_jsonl(store.get_bytes("answers/world-vqa.jsonl"))) == results["world-vqa"]["questions"]
    client = MlflowClient(mlflow_sqlite)
    (run,) = client.search_runs([client.get_experiment_by_name("sharegpt4v").experiment_id])
    assert run.info.run_name == "evaluate" and run.info.status == "FINISHED"
    assert run.data.metrics["world-vqa.yesno.acc"] == 0.5 and run.data.metrics["world-vqa.yesno.acc_plus"] == 0.0
    assert run.data.metrics["world-vqa.overall"] == pytest.approx(results["world-vqa"]["overall"])
    assert run.data.params["model_id"] == "always-yes"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert artifacts == {"eval/results.md", "eval/results.png", "eval/results.json"}


def test_evaluate_a_saved_checkpoint_by_uri(world_uri: str, tmp_path: Path) -> None:
    from sharegpt4v.modeling.builder import save_model

    model, processor = tiny_model(seed=1)
    save_model(model, processor, str(tmp_path / "ckpt"))
    results = evaluate(str(tmp_path / "ckpt"), _recipe("eval.limit=4"), world_uri, out=str(tmp_path / "out"))
    assert results["world-vqa"]["missing"] == 0 and 0.0 <= results["world-vqa"]["overall"] <= 1.0
    records = parse_jsonl((tmp_path / "out" / "answers" / "world-vqa.jsonl").read_text())
    assert {r["model_id"] for r in records} == {"ckpt"} and all(r["metadata"] == {} for r in records)

"""ScienceQA-IMG: the test-split problems that have an image, as LLaVA-1.5 evaluates them.

Layout: `problems.json` (pid -> question, choices, answer index, hint, image, ...),
`pid_splits.json` ({"test": [pid, ...], ...}) and `images/test/<pid>/image.png`.

The prompt follows LLaVA's `llava_test_CQM-A.json`: `Context: <hint>\\n` when there is a hint,
the question, `\\nA. c0\\nB. c1...`, double spaces collapsed, then the multiple-choice
instruction. Scoring follows `eval_science_qa.py`: the answer is the text when it is a letter
A-E, else its first character when followed by ". ", else the single "The answer is X."
match; a letter beyond the choices is wrong. `img_accuracy` is over problems with an image
(SQA-IMG, what LLaVA-1.5 reports); `accuracy` over the whole test split is added when the
scored answers include the text-only problems (an answers file from LLaVA's own run).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from sharegpt4v.evaluation.benchmark import Benchmark, read_image
from sharegpt4v.evaluation.common import (
    MULTIPLE_CHOICE_PROMPT,
    BenchmarkError,
    Question,
    choice_block,
    mean,
)

OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def cqm_a_text(problem: dict[str, Any]) -> str:
    """The human turn of `llava_test_CQM-A.json`, without `<image>`."""
    context = f"Context: {problem['hint']}\n" if problem.get("hint") else ""
    return choice_block(context + problem["question"], problem["choices"]).replace("  ", " ").strip()


def parse_answer(text: str, choices: Sequence[str]) -> int:
    """The chosen choice's index, or -1 (`eval_science_qa.py`)."""
    if text in OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else "FAILED"
    return OPTIONS.index(letter) if letter in OPTIONS[: len(choices)] else -1


class ScienceQA(Benchmark):
    name = "scienceqa"
    source_help = "the ScienceQA folder (problems.json, pid_splits.json, images/test/<pid>/image.png)"

    def _problems(self, with_text_only: bool) -> list[tuple[str, dict[str, Any]]]:
        root = self.folder()
        try:
            problems = json.loads((root / "problems.json").read_text())
            test = json.loads((root / "pid_splits.json").read_text())["test"]
        except FileNotFoundError as exc:
            raise BenchmarkError(f"scienceqa: {exc.filename} not found ({self.source_help})") from None
        except (KeyError, json.JSONDecodeError) as exc:
            raise BenchmarkError(f"scienceqa: cannot read problems.json / pid_splits.json['test']: {exc}") from None
        missing = [pid for pid in test if pid not in problems]
        if missing:
            raise BenchmarkError(f"scienceqa: test pids not in problems.json: {missing[:3]}")
        return [(pid, problems[pid]) for pid in test if with_text_only or problems[pid].get("image")]

    def load(self, images: bool = True, with_text_only: bool = False) -> list[Question]:
        root = self.folder()
        questions = []
        for pid, problem in self._problems(with_text_only):
            image = problem.get("image")
            data = read_image(root / "images" / "test" / pid / image, images) if image else None
            prompt = f"{cqm_a_text(problem)}\n{MULTIPLE_CHOICE_PROMPT}"
            questions.append(Question(pid, data, prompt, int(problem["answer"]), problem.get("subject"),
                                      {"choices": problem["choices"], "has_image": bool(image)}))
        return questions

    def record(self, question: Question, text: str, model_id: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        record = super().record(question, text, model_id, metadata)
        if question.meta["has_image"]:  # model_vqa_science.py records the image placeholder
            record["prompt"] = "<image>\n" + question.prompt
        return record

    def score_texts(self, questions: Sequence[Question], texts: Sequence[str | None]) -> dict[str, Any]:
        rights = [parse_answer("FAILED" if t is None else t, q.meta["choices"]) == q.answer for q, t in zip(questions, texts)]
        result: dict[str, Any] = {"img_accuracy": mean(r for q, r in zip(questions, rights) if q.meta["has_image"])}
        if not all(q.meta["has_image"] for q in questions):
            result["accuracy"] = mean(rights)
        subjects: dict[str, list[bool]] = {}
        for q, right in zip(questions, rights):
            if q.meta["has_image"]:
                subjects.setdefault(str(q.category), []).append(right)
        result["subject"] = {s: mean(v) for s, v in sorted(subjects.items())}
        return result

    def score_answers(self, uri: str) -> dict[str, Any]:
        records = self.read_answers(uri)
        # Score the whole test split when the file answers text-only problems too (LLaVA's own runs).
        questions = self.load(images=False, with_text_only=True)
        image_ids = {q.id for q in questions if q.meta["has_image"]}
        if all(str(r["question_id"]) in image_ids for r in records):
            questions = [q for q in questions if q.meta["has_image"]]
        return self.score(questions, records)

    def chart(self, result: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {"ScienceQA-IMG accuracy by subject": result["subject"]} if result.get("subject") else {}


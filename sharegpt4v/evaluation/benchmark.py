"""The benchmark interface: a questions loader and a scorer, independent of any model.

A benchmark is built from its source (a folder in the layout the benchmark ships in, or a
world dataset URI) and gives:

- `questions()`: the questions to answer (`limit` applied);
- `record(question, text, model_id)`: the answers-JSONL line for one answer;
- `score(questions, records)`: results from answers-JSONL records, matched to questions the way
  the reference scripts match them (MME by category/image/question text, TextVQA by image id and
  question text, the others by question id); a question without an answer counts as wrong and
  is counted under `missing`;
- `score_answers(uri)`: the same for an answers file written elsewhere;
- `chart(result)`: per-category series for the results chart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from sharegpt4v.evaluation.common import BenchmarkError, Question, answer_record, parse_jsonl, read_bytes


class Benchmark(ABC):
    name: ClassVar[str]
    source_help: ClassVar[str] = "the benchmark's folder"

    def __init__(self, source: str | None, limit: int | None = None, split: str = "test"):
        self.source = source
        self.limit = limit
        self.split = split  # only the synthetic world has splits to choose from

    def folder(self) -> Path:
        if not self.source:
            raise BenchmarkError(f"{self.name}: needs {self.source_help} (benchmark_paths={{'{self.name}': ...}})")
        path = Path(self.source).expanduser()
        if not path.exists():
            raise BenchmarkError(f"{self.name}: {path} does not exist (expected {self.source_help})")
        return path

    @abstractmethod
    def load(self, images: bool = True) -> list[Question]:
        """Every question; `images=False` skips reading image files (scoring only)."""

    def questions(self, images: bool = True) -> list[Question]:
        questions = self.load(images)
        return questions if self.limit is None else questions[: self.limit]

    def key(self, question: Question) -> Hashable:
        return str(question.id)

    def record_key(self, record: dict[str, Any]) -> Hashable:
        return str(record["question_id"])

    def record(self, question: Question, text: str, model_id: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        return answer_record(question.id, question.prompt, text, model_id, metadata)

    @abstractmethod
    def score_texts(self, questions: Sequence[Question], texts: Sequence[str | None]) -> dict[str, Any]:
        """Results for answer texts in question order; None means no answer (wrong)."""

    def score(self, questions: Sequence[Question], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        answers = {self.record_key(r): str(r["text"]) for r in records}  # a repeated key: the last line wins
        texts = [answers.get(self.key(q)) for q in questions]
        result = self.score_texts(questions, texts)
        result["questions"] = len(questions)
        result["missing"] = sum(t is None for t in texts)
        return result

    def read_answers(self, uri: str) -> list[dict[str, Any]]:
        return parse_jsonl(read_bytes(uri), uri)

    def score_answers(self, uri: str) -> dict[str, Any]:
        """Score an answers file (local or s3://) produced elsewhere against this benchmark."""
        return self.score(self.load(images=False), self.read_answers(uri))

    def chart(self, result: dict[str, Any]) -> dict[str, dict[str, float]]:
        """{series title: {category: value in [0, 1]}} for the results chart."""
        return {}


def read_image(path: Path, images: bool) -> bytes | None:
    if not images:
        return None
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BenchmarkError(f"missing image {path}") from None

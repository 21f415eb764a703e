"""MMBench (dev TSV): multiple choice with circular evaluation.

The TSV ships the circular copies pre-expanded: copy k of question g has `index = g + k*1e6`,
its options rotated and its own answer letter. A row is right when its prediction names the
answer letter (`infer_option`: the exact letter, else VLMEvalKit's single-letter and
option-text inference; no LLM judge). `circular` = share of questions (`index % 1e6`) whose
every row is right, the figure MMBench reports; `vanilla` = accuracy over rows with
index < 1e6. Both also per `category` and `l2-category` when the TSV gives them.

Scoring works on LLaVA's answers JSONL (with the TSV for ground truth) and on LLaVA's upload
xlsx (`index question A B C D prediction answer split`), which carries its own answers; a TSV
given with the xlsx adds the category breakdowns.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sharegpt4v.evaluation.benchmark import Benchmark
from sharegpt4v.evaluation.common import (
    LETTERS,
    MULTIPLE_CHOICE_PROMPT,
    BenchmarkError,
    Question,
    answer_record,
    choice_block,
    group_all,
    infer_option,
    mean,
    read_bytes,
)

CIRCULAR_STRIDE = 1_000_000
UPLOAD_COLUMNS = ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]


def is_none(value: Any) -> bool:
    """LLaVA's `is_none`: None, NaN, or the strings "nan"/"none" in any case."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def row_options(row: dict[str, Any]) -> list[str]:
    """Options A, B, ... up to the first missing one (LLaVA's `get_options`)."""
    options = []
    for letter in "ABCD":
        value = row.get(letter)
        if is_none(value):
            break
        options.append(str(value))
    return options


def circular_results(questions: Sequence[Question], rights: Sequence[bool]) -> dict[str, Any]:
    """MMBench's circular and vanilla accuracy, per category and l2-category when known."""
    groups = group_all((q.meta["group"], right) for q, right in zip(questions, rights))
    result: dict[str, Any] = {
        "circular": mean(groups.values()),
        "vanilla": mean(right for q, right in zip(questions, rights) if q.meta["round"] == 0),
        "groups": len(groups),
    }
    for field, label in (("category", "category"), ("l2", "l2-category")):
        owner: dict[Hashable, str] = {}
        for q in questions:
            value = q.category if field == "category" else q.meta.get("l2")
            if value is not None and not is_none(value):
                owner.setdefault(q.meta["group"], str(value))
        if owner:
            by: dict[str, list[bool]] = {}
            for group, hit in groups.items():
                if group in owner:
                    by.setdefault(owner[group], []).append(hit)
            result[label] = {name: mean(hits) for name, hits in sorted(by.items())}
    return result


class MMBench(Benchmark):
    name = "mmbench"
    source_help = "the MMBench TSV (e.g. mmbench_dev_20230712.tsv) or a folder holding one"

    def _tsv(self) -> Path:
        path = self.folder()
        if path.is_file():
            return path
        found = sorted(path.glob("*.tsv"))
        if len(found) != 1:
            raise BenchmarkError(f"mmbench: expected one .tsv in {path}, found {[p.name for p in found]}")
        return found[0]

    def table(self) -> pd.DataFrame:
        path = self._tsv()
        df = pd.read_table(path)  # fields may hold quoted newlines: never read it line by line
        missing = {"index", "question", "A", "B"} - set(df.columns)
        if missing:
            raise BenchmarkError(f"mmbench: {path.name} lacks columns {sorted(missing)}")
        return df

    def load(self, images: bool = True) -> list[Question]:
        df = self.table()
        if images and "image" not in df.columns:
            raise BenchmarkError("mmbench: the TSV has no image column")
        encoded = dict(zip(df["index"], df["image"])) if images else {}
        questions = []
        for row in df.to_dict("records"):
            image = None
            if images:
                value = str(row["image"])
                if len(value) <= 64 and value.isdigit():  # VLMEvalKit: a duplicate image refers to another row
                    value = str(encoded[int(value)])
                image = base64.b64decode(value)
            questions.append(self._question(row, image))
        return questions

    @staticmethod
    def _question(row: dict[str, Any], image: bytes | None) -> Question:
        index = int(row["index"])
        options = row_options(row)
        text = str(row["question"])
        hint = row.get("hint")
        block = choice_block(text if is_none(hint) else f"{hint}\n{text}", options)
        answer = row.get("answer")
        category = row.get("category")
        return Question(
            index, image, f"{block}\n{MULTIPLE_CHOICE_PROMPT}", None if is_none(answer) else str(answer).strip(),
            None if is_none(category) else str(category),
            {"options": options, "block": block, "question": text, "group": index % CIRCULAR_STRIDE,
             "round": index // CIRCULAR_STRIDE, "l2": row.get("l2-category"), "split": row.get("split", "dev")},
        )

    def questions(self, images: bool = True) -> list[Question]:
        questions = self.load(images)
        if self.limit is None:
            return questions
        keep: set[int] = set()
        for q in questions:  # whole questions: every circular copy of the first `limit` groups
            if len(keep) < self.limit:
                keep.add(q.meta["group"])
        return [q for q in questions if q.meta["group"] in keep]

    def key(self, question: Question) -> Hashable:
        return int(question.id)

    def record_key(self, record: dict[str, Any]) -> Hashable:
        return int(record["question_id"])

    def record(self, question: Question, text: str, model_id: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        options = question.meta["options"]
        return answer_record(question.id, question.meta["block"], text, model_id, metadata, round_id=0,
                             options=options, option_char=list(LETTERS[: len(options)]))

    def score_texts(self, questions: Sequence[Question], texts: Sequence[str | None]) -> dict[str, Any]:
        if any(q.answer is None for q in questions):
            return {"unscored": "no answer column (a test split): submit the upload xlsx to the evaluation server"}
        rights = [
            text is not None and infer_option(text, dict(zip(LETTERS, q.meta["options"]))) == q.answer
            for q, text in zip(questions, texts)
        ]
        return circular_results(questions, rights)

    def score_answers(self, uri: str) -> dict[str, Any]:
        if not uri.lower().endswith(".xlsx"):
            return super().score_answers(uri)
        upload = pd.read_excel(io.BytesIO(read_bytes(uri)))
        missing = {"index", "prediction", "answer", "A", "B"} - set(upload.columns)
        if missing:
            raise BenchmarkError(f"mmbench: {uri} lacks columns {sorted(missing)} (not an MMBench upload file)")
        extra = {}
        if self.source:  # the TSV adds category and l2-category
            tsv = self.table()
            extra = {int(r["index"]): r for r in tsv.drop(columns=["image"], errors="ignore").to_dict("records")}
        questions, records = [], []
        for row in upload.to_dict("records"):
            info = extra.get(int(row["index"]), {})
            questions.append(self._question({**row, "hint": None, **{k: info.get(k) for k in ("category", "l2-category")}}, None))
            records.append({"question_id": int(row["index"]), "text": "" if is_none(row["prediction"]) else str(row["prediction"])})
        return self.score(questions, records)

    def chart(self, result: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {"MMBench circular, " + label: result[label] for label in ("l2-category",) if label in result}


def upload_table(questions: Sequence[Question], records: Sequence[dict[str, Any]]) -> bytes:
    """LLaVA's submission xlsx (`convert_mmbench_for_submission.py`): what the server scores."""
    texts = {int(r["question_id"]): r["text"] for r in records}
    rows = []
    for q in questions:
        options = q.meta["options"] + [None] * (4 - len(q.meta["options"]))
        rows.append([q.id, q.meta["question"], *options[:4], texts.get(int(q.id), ""), q.answer, q.meta.get("split") or "dev"])
    out = io.BytesIO()
    pd.DataFrame(rows, columns=UPLOAD_COLUMNS).to_excel(out, index=False, engine="openpyxl")
    return out.getvalue()

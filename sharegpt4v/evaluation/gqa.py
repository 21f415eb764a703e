"""GQA testdev-balanced, scored like the eval.py of Haotian Liu's gist (linked from LLaVA's docs).

Layout: `testdev_balanced_questions.json` (qid -> question, imageId, answer, isBalanced,
types.structural, ...) in the given folder or its `data/`, images `<imageId>.jpg` in an
`images/` folder beside the json or in the given folder (LLaVA: `gqa/data/images`,
ShareGPT4V: `gqa/images`).

A prediction is `text.rstrip('.').lower()` (`convert_gqa_for_eval.py`), compared exactly with
the answer. `accuracy` is over balanced questions, `open` over those whose structural type is
"query", `binary` over the rest. The gist refuses to score when a balanced question has no
prediction; here such a question counts as wrong and is reported under `missing`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sharegpt4v.evaluation.benchmark import Benchmark, read_image
from sharegpt4v.evaluation.common import BenchmarkError, Question, mean, short_prompt

QUESTIONS_FILE = "testdev_balanced_questions.json"


def gqa_prediction(text: str) -> str:
    return text.rstrip(".").lower()


class GQA(Benchmark):
    name = "gqa"
    source_help = f"the GQA folder ({QUESTIONS_FILE} and images/<imageId>.jpg)"

    def _files(self) -> tuple[Path, Path]:
        root = self.folder()
        candidates = [root] if root.is_file() else [root / QUESTIONS_FILE, root / "data" / QUESTIONS_FILE]
        questions = next((p for p in candidates if p.is_file()), None)
        if questions is None:
            raise BenchmarkError(f"gqa: no {QUESTIONS_FILE} in {root} or {root / 'data'}")
        images = next((p for p in (questions.parent / "images", root / "images") if p.is_dir()), questions.parent / "images")
        return questions, images

    def load(self, images: bool = True) -> list[Question]:
        path, image_dir = self._files()
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"gqa: {path.name} is not JSON ({exc.msg})") from None
        cache: dict[str, bytes | None] = {}  # ~30 questions per image
        questions = []
        for qid, item in data.items():
            image_id = item["imageId"]
            if image_id not in cache:
                cache[image_id] = read_image(image_dir / f"{image_id}.jpg", images)
            structural = str((item.get("types") or {}).get("structural") or "unknown")
            questions.append(Question(str(qid), cache[image_id], short_prompt(item["question"]), item["answer"],
                                      structural, {"balanced": bool(item.get("isBalanced", True)), "image": image_id}))
        return questions

    def score_texts(self, questions: Sequence[Question], texts: Sequence[str | None]) -> dict[str, Any]:
        rows = [(q.category, t is not None and gqa_prediction(t) == q.answer) for q, t in zip(questions, texts) if q.meta["balanced"]]
        return {
            "accuracy": mean(r for _, r in rows),
            "binary": mean(r for s, r in rows if s != "query"),
            "open": mean(r for s, r in rows if s == "query"),
            "structural": {s: mean(r for t, r in rows if t == s) for s in sorted({s for s, _ in rows})},
        }

    def chart(self, result: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {"GQA accuracy by structural type": result["structural"]}

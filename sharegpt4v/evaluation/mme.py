"""MME: 14 categories of yes/no question pairs, scored like the official `calculation.py`.

Per category: `acc` = right questions / questions, `acc+` = images with both questions right /
images, score = 100 * (acc + acc+) in 0..200. Perception sums the scores of 10 categories
(max 2000), cognition of 4 (max 800). A category missing from the folder is left out of the
sums (the official tool refuses to run); `categories` shows which were scored.

Sources, either:
- the benchmark folder `MME_Benchmark_release_version/` (or `MME_Benchmark_release/`, or the
  folder holding one of them): `<cat>/images/<name>.jpg` + `<cat>/questions_answers_YN/<name>.txt`
  (artwork, celebrity, landmark, posters, scene) or `<cat>/<name>.{jpg,png}` + `<cat>/<name>.txt`;
  each txt holds lines `question<TAB>Yes|No`;
- a ground-truth folder of `<cat>.txt` files, lines `image<TAB>question<TAB>Yes|No` (the
  official tool's `Your_Results` layout): scoring only, it has no images.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from sharegpt4v.evaluation.benchmark import Benchmark, read_image
from sharegpt4v.evaluation.common import (
    SHORT_ANSWER_PROMPT,
    BenchmarkError,
    Question,
    group_all,
    mean,
    parse_yes_no,
    short_prompt,
)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
CATEGORIES = PERCEPTION + COGNITION
RELEASE_FOLDERS = ("MME_Benchmark_release_version", "MME_Benchmark_release")
_PLEASE = "Please answer yes or no."
_IMAGE_EXTS = (".jpg", ".png", ".jpeg")


def question_text(text: str) -> str:
    """The question without MME's instruction (some have two spaces before it)."""
    return text.replace(_PLEASE, "").strip()


def _stem(name: str) -> str:
    return name.split("/")[-1].split(".")[0]  # as LLaVA's convert_answer_to_mme.py cuts it


def _yes_no(value: str, where: str) -> str:
    label = value.strip().lower()
    if label not in ("yes", "no"):
        raise BenchmarkError(f"{where}: ground truth {value!r} is not Yes/No")
    return label


class MME(Benchmark):
    name = "mme"
    source_help = "the MME folder (MME_Benchmark_release_version/<category>/..., or <category>.txt ground-truth files)"

    def _root(self) -> Path:
        path = self.folder()
        for name in RELEASE_FOLDERS:
            if (path / name).is_dir():
                return path / name
        return path

    def load(self, images: bool = True) -> list[Question]:
        root = self._root()
        truth_files = [c for c in CATEGORIES if (root / f"{c}.txt").is_file()]
        if truth_files:
            if images:
                raise BenchmarkError(f"mme: {root} holds ground-truth files only, no images: it can score answers, not produce them")
            return [q for c in truth_files for q in self._truth_file(root / f"{c}.txt", c)]
        categories = [c for c in CATEGORIES if (root / c).is_dir()]
        if not categories:
            raise BenchmarkError(f"mme: no category folders ({', '.join(CATEGORIES[:3])}, ...) or <category>.txt files in {root}")
        return [q for c in categories for q in self._category(root, c, images)]

    def _category(self, root: Path, category: str, images: bool) -> list[Question]:
        folder = root / category
        nested = (folder / "images").is_dir()  # LLaVA's get_gt decides the layout the same way
        txt_dir, image_dir = (folder / "questions_answers_YN", folder / "images") if nested else (folder, folder)
        questions = []
        texts = sorted(txt_dir.glob("*.txt"))
        if not texts:
            raise BenchmarkError(f"mme: no question files (<name>.txt) in {txt_dir}")
        for txt in texts:
            image = next((image_dir / f"{txt.stem}{ext}" for ext in _IMAGE_EXTS if (image_dir / f"{txt.stem}{ext}").is_file()), None)
            if image is None:
                raise BenchmarkError(f"mme: {txt} has no image {txt.stem}.jpg/.png in {image_dir}")
            data = read_image(image, images)
            qid = image.relative_to(root).as_posix()
            for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise BenchmarkError(f"mme: {txt} line {number}: expected 'question<TAB>Yes|No'")
                question, truth = parts
                questions.append(Question(qid, data, short_prompt(question_text(question)), _yes_no(truth, f"{txt}:{number}"),
                                          category, {"image": image.name, "question": question}))
        return questions

    def _truth_file(self, path: Path, category: str) -> list[Question]:
        questions = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                raise BenchmarkError(f"mme: {path} line {number}: expected 'image<TAB>question<TAB>Yes|No'")
            image, question, truth = parts[:3]
            questions.append(Question(f"{category}/{image}", None, short_prompt(question_text(question)),
                                      _yes_no(truth, f"{path}:{number}"), category, {"image": image, "question": question}))
        return questions

    def key(self, question: Question) -> Hashable:
        return (question.category, _stem(question.meta["image"]), question_text(question.meta["question"]))

    def record_key(self, record: dict[str, Any]) -> Hashable:
        qid = str(record["question_id"])
        prompt = str(record.get("prompt", "")).replace(SHORT_ANSWER_PROMPT, "")
        return (qid.split("/")[0], _stem(qid), question_text(prompt))

    def score_texts(self, questions: Sequence[Question], texts: Sequence[str | None]) -> dict[str, Any]:
        rows: dict[str, list[tuple[str, bool]]] = {}
        for q, text in zip(questions, texts):
            label = parse_yes_no(text) if text is not None else "other"
            rows.setdefault(str(q.category), []).append((_stem(q.meta["image"]), label == q.answer))
        categories = {}
        for category in CATEGORIES:
            if category not in rows:
                continue
            acc = mean(right for _, right in rows[category])
            acc_plus = mean(group_all(rows[category]).values())
            categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus)}
        perception = sum(categories[c]["score"] for c in PERCEPTION if c in categories)
        cognition = sum(categories[c]["score"] for c in COGNITION if c in categories)
        return {"perception": perception, "cognition": cognition, "total": perception + cognition, "categories": categories}

    def chart(self, result: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {"MME score / 200": {c: v["score"] / 200 for c, v in result["categories"].items()}}

"""Answerers that never see the image: what a score has to beat before it says anything about seeing.

- `MajorityAnswerer`: a text-only baseline fitted on training questions. A question's template is its
  text with the object words (colours, shapes) masked; it answers the most common answer of its
  template in the training items (multiple choice: the presented option that was most often right),
  falling back to the most common answer of its kind and category. Numbers and cells stay in the
  template, so it exploits what a language prior can: "How many crosses are there?" is usually "0";
  a world whose yes/no wording gave answers away would show here (the world's pairs do not: a count
  pair asks one number about two shapes).
- `BlankImageAnswerer`: any answerer, asked with a blank image (CLIP's mean colour) instead of the
  real one: the arm's own model without its eyes.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from sharegpt4v.evaluation.common import LETTERS, Question

_OBJECT_WORDS: re.Pattern[str] | None = None


def _object_words() -> re.Pattern[str]:
    global _OBJECT_WORDS
    if _OBJECT_WORDS is None:
        from sharegpt4v.world.vocab import COLOURS, SHAPES

        shapes = "|".join(f"{s}(?:es|s)?" for s in SHAPES)
        _OBJECT_WORDS = re.compile(rf"\b(?:{'|'.join(COLOURS)}|{shapes})\b", re.IGNORECASE)
    return _OBJECT_WORDS


def question_template(kind: str, category: str | None, question: str) -> tuple[str, str, str]:
    """(kind, category, question text with colour and shape words replaced by `_`)."""
    return kind, str(category), _object_words().sub("_", question.split("\n", 1)[0].strip())


class MajorityAnswerer:
    """Majority answer per question template, learnt from world VQA items (see the module docstring)."""

    model_id = "blind-majority"

    def __init__(self, items: Iterable[dict[str, Any]]):
        self.by_template: dict[tuple[str, str, str], Counter] = {}
        self.by_category: dict[tuple[str, str], Counter] = {}
        self.items = 0
        for item in items:
            kind = "mc" if item["kind"] in ("mc", "choice") else item["kind"]
            answer = str(item["answer"])
            if kind == "mc":
                answer = str(item["options"][LETTERS.index(answer)]) if answer in LETTERS else answer
            template = question_template(kind, item.get("category"), item["question"])
            self.by_template.setdefault(template, Counter())[answer] += 1
            self.by_category.setdefault(template[:2], Counter())[answer] += 1
            self.items += 1
        if not self.items:
            raise ValueError("MajorityAnswerer: no training items to learn answers from")

    def _counts(self, question: Question) -> Counter:
        template = question_template(question.meta["kind"], question.category, question.prompt)
        return self.by_template.get(template) or self.by_category.get(template[:2]) or Counter()

    def answer(self, questions: Sequence[Question]) -> list[str]:
        texts = []
        for question in questions:
            counts = self._counts(question)
            if question.meta["kind"] == "mc":
                options = [str(o) for o in question.meta["options"]]
                best = max(range(len(options)), key=lambda i: (counts.get(options[i], 0), -i))
                texts.append(LETTERS[best])
            else:
                texts.append(counts.most_common(1)[0][0] if counts else "")
        return texts


def blank_image(size: int = 64) -> bytes:
    """A PNG of CLIP's mean colour: after normalisation every pixel is zero."""
    from PIL import Image

    from sharegpt4v.modeling.images import CLIP_MEAN
    from sharegpt4v.world.render import encode_png

    return encode_png(Image.new("RGB", (size, size), tuple(round(m * 255) for m in CLIP_MEAN)))


class BlankImageAnswerer:
    """Asks `inner` every question with a blank image instead of its own."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.model_id = f"{getattr(inner, 'model_id', 'model')}+blank-image"
        self.errors: dict[int, str] = {}

    def answer(self, questions: Sequence[Question]) -> list[str]:
        blank = blank_image()
        texts = self.inner.answer([dataclasses.replace(q, image=blank) for q in questions])
        self.errors = getattr(self.inner, "errors", {}) or {}
        return texts

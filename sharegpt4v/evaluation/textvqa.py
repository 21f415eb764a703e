"""TextVQA val, scored like LLaVA's `eval_textvqa.py` with the EvalAI answer processor.

Layout: `TextVQA_0.5.1_val.json` ({"data": [{image_id, question, answers: [10 strings], ...}]})
and `train_images/<image_id>.jpg` (the val images ship in train_val_images.zip). OCR tokens,
when available, are added to the prompt as LLaVA-1.5 does (`Reference OCR token: a, b`): from
each item's `ocr_tokens`, else from `TextVQA_Rosetta_OCR_v0.2_val.json` beside it; without
either the prompt has no OCR line.

Answers are matched by (image id, lower-cased question), the question read back from the
prompt. A prediction scores the mean over the 10 leave-one-out subsets of the ground-truth
answers of min(1, matches / 3): 0, .3, .6, .9, 1 for 0, 1, 2, 3, 4+ matching answers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from sharegpt4v.evaluation.benchmark import Benchmark, read_image
from sharegpt4v.evaluation.common import BenchmarkError, Question, mean, short_prompt

ANNOTATIONS_FILE = "TextVQA_0.5.1_val.json"
OCR_FILE = "TextVQA_Rosetta_OCR_v0.2_val.json"
OCR_PREFIX = "Reference OCR token: "

# The VQA/EvalAI contraction table, verbatim (entries that can never match after lower-casing included).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
           "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead, so every "." not before a digit goes
_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")


def normalize_answer(text: str) -> str:
    """EvalAI's answer processor (as in LLaVA's `m4c_evaluator.py`)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in PUNCTUATION:  # the test reads the text before any replacement, on purpose
        if p + " " in text or " " + p in text or _DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=32)  # the reference passes re.UNICODE (32) as the count
    words = [NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Mean over leave-one-out subsets of min(1, matches / 3), answers normalised."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if not gts:
        return 0.0
    k = sum(g == pred for g in gts)
    # Leaving out a matching answer leaves k-1 matches; leaving out another leaves k.
    return (k * min(1.0, (k - 1) / 3) + (len(gts) - k) * min(1.0, k / 3)) / len(gts)


def prompt_question(prompt: str) -> str:
    """The lower-cased question inside a TextVQA prompt (`eval_textvqa.py`'s prompt_processor)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise BenchmarkError(f"textvqa: cannot find the question in prompt {prompt[:80]!r}")
        question = match.group(1)
    elif OCR_PREFIX in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith(OCR_PREFIX.rstrip()) else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise BenchmarkError(f"textvqa: cannot find the question in prompt {prompt[:80]!r}")
    return question.lower()


class TextVQA(Benchmark):
    name = "textvqa"
    source_help = f"the TextVQA folder ({ANNOTATIONS_FILE} and train_images/<image_id>.jpg)"

    def _annotations(self) -> tuple[Path, list[dict[str, Any]]]:
        root = self.folder()
        path = root if root.is_file() else root / ANNOTATIONS_FILE
        try:
            return path.parent, json.loads(path.read_text())["data"]
        except FileNotFoundError:
            raise BenchmarkError(f"textvqa: {path} not found") from None
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise BenchmarkError(f"textvqa: {path.name} is not a TextVQA annotation file: {exc}") from None

    def load(self, images: bool = True) -> list[Question]:
        root, items = self._annotations()
        ocr: dict[str, list[str]] = {}
        if (root / OCR_FILE).is_file():
            ocr = {d["image_id"]: d.get("ocr_tokens", []) for d in json.loads((root / OCR_FILE).read_text())["data"]}
        cache: dict[str, bytes | None] = {}
        questions = []
        for item in items:
            image_id = item["image_id"]
            if image_id not in cache:
                cache[image_id] = read_image(root / "train_images" / f"{image_id}.jpg", images)
            question = item["question"]
            text = question[:1].upper() + question[1:]
            tokens = item.get("ocr_tokens", ocr.get(image_id))
            if tokens is not None:
                text += "\n" + OCR_PREFIX + ", ".join(tokens)
            questions.append(Question(image_id, cache[image_id], short_prompt(text), list(item["answers"]), None,
                                      {"question": question, "question_id": item.get("question_id")}))
        return questions

    def key(self, question: Question) -> Hashable:
        return (str(question.id), question.meta["question"].lower())

    def record_key(self, record: dict[str, Any]) -> Hashable:
        return (str(record["question_id"]), prompt_question(str(record.get("prompt", ""))))

    def score_texts(self, questions: Sequence[Question], texts: Sequence[str | None]) -> dict[str, Any]:
        return {"accuracy": mean(0.0 if t is None else vqa_score(t, q.answer) for q, t in zip(questions, texts))}

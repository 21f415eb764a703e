"""Small benchmark folders in the layouts the real benchmarks ship in, and answerer doubles."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from PIL import Image

from sharegpt4v.evaluation import Question


def image_bytes(colour: tuple[int, int, int], fmt: str = "JPEG", size: tuple[int, int] = (8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


class Scripted:
    """Answers with `fn(question)`; records what it was asked."""

    def __init__(self, fn: Callable[[Question], str], model_id: str = "scripted"):
        self.fn = fn
        self.model_id = model_id
        self.asked: list[Question] = []

    def answer(self, questions: Sequence[Question]) -> list[str]:
        self.asked += list(questions)
        return [self.fn(q) for q in questions]


def oracle() -> Scripted:
    """Answers from the ground truth: every scorer must give it full marks."""
    return Scripted(lambda q: str(q.answer), "oracle")


# MME -----------------------------------------------------------------------------------------

# (category, image name, [(question, truth)]) - artwork is a nested category, the others flat.
MME_ITEMS = [
    ("artwork", "10002.jpg", [("Is this artwork a painting? Please answer yes or no.", "Yes"),
                              ("Is this artwork a vase? Please answer yes or no.", "No")]),
    ("artwork", "10049.jpg", [("Is this artwork by Monet? Please answer yes or no.", "Yes"),
                              ("Is this artwork by Dali? Please answer yes or no.", "No")]),
    ("existence", "0001.jpg", [("Is there a dog in this image?  Please answer yes or no.", "Yes"),
                               ("Is there a cat in this image? Please answer yes or no.", "No")]),
    ("existence", "0002.jpg", [("Is there a car in this image? Please answer yes or no.", "Yes"),
                               ("Is there a bus in this image? Please answer yes or no.", "No")]),
    ("code_reasoning", "0001.png", [("Is the output 3? Please answer yes or no.", "Yes"),
                                    ("Is the output 4? Please answer yes or no.", "No")]),
]


def make_mme(root: Path) -> Path:
    """`MME/MME_Benchmark_release_version/<category>/...` with both layouts."""
    release = root / "MME_Benchmark_release_version"
    for category, name, lines in MME_ITEMS:
        stem, ext = name.rsplit(".", 1)
        nested = category == "artwork"
        image_dir = release / category / ("images" if nested else "")
        txt_dir = release / category / ("questions_answers_YN" if nested else "")
        image_dir.mkdir(parents=True, exist_ok=True)
        txt_dir.mkdir(parents=True, exist_ok=True)
        (image_dir / name).write_bytes(image_bytes((10, 20, 30), "PNG" if ext == "png" else "JPEG"))
        (txt_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in lines))
    return root


# MMBench -------------------------------------------------------------------------------------


def mmbench_rows() -> list[dict]:
    """Question 0: 4 options, 4 circular rows, a hint with a newline; question 1: 2 options, 2 rows."""
    image = base64.b64encode(image_bytes((200, 0, 0))).decode()
    options = ["apple", "pear", "plum", "fig"]
    rows = []
    for k in range(4):
        rotated = [options[(j - k) % 4] for j in range(4)]
        rows.append({"index": k * 1_000_000, "question": "Which fruit is red?", "hint": "Look closely.\nIt is round.",
                     **dict(zip("ABCD", rotated)), "answer": "ABCD"[k % 4], "category": "fruit",
                     "image": image if k == 0 else "0", "source": "unit", "l2-category": "coarse_perception",
                     "comment": None, "split": "dev"})
    for k in range(2):
        rows.append({"index": 1 + k * 1_000_000, "question": "Is it day?", "hint": None,
                     "A": ["yes", "no"][k], "B": ["no", "yes"][k], "C": None, "D": None,
                     "answer": "AB"[k], "category": "time", "image": image, "source": "unit",
                     "l2-category": "logic_reasoning", "comment": None, "split": "dev"})
    return rows


def make_mmbench(path: Path, rows: list[dict] | None = None) -> Path:
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split"]
    pd.DataFrame(rows or mmbench_rows(), columns=columns).to_csv(path, sep="\t", index=False)
    return path


# ScienceQA -----------------------------------------------------------------------------------

SQA_PROBLEMS = {
    "1": {"question": "Which  is hot?", "choices": ["ice", "fire", "snow"], "answer": 1, "hint": "Think about it.",
          "image": "image.png", "subject": "natural science"},
    "2": {"question": "Which is a verb?", "choices": ["run", "blue"], "answer": 0, "hint": "",
          "image": "image.png", "subject": "language science"},
    "3": {"question": "Pick A.", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
          "subject": "social science"},
    "4": {"question": "Train only.", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
          "subject": "natural science"},
}


def make_scienceqa(root: Path) -> Path:
    common = {"task": "closed choice", "grade": "grade3", "topic": "t", "category": "c", "skill": "s",
              "lecture": "", "solution": ""}
    problems = {pid: {**common, **p, "split": "train" if pid == "4" else "test"} for pid, p in SQA_PROBLEMS.items()}
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["4"], "val": [], "test": ["1", "2", "3"]}))
    for pid in ("1", "2", "4"):
        folder = root / "images" / ("train" if pid == "4" else "test") / pid
        folder.mkdir(parents=True)
        (folder / "image.png").write_bytes(image_bytes((0, 0, int(pid)), "PNG"))
    return root


# GQA -----------------------------------------------------------------------------------------

GQA_QUESTIONS = {
    "201": {"question": "What is on the floor?", "imageId": "n1", "answer": "table", "isBalanced": True,
            "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
    "202": {"question": "Is it overcast?", "imageId": "n1", "answer": "yes", "isBalanced": True,
            "types": {"structural": "verify", "semantic": "global", "detailed": "weather"}},
    "203": {"question": "What colour is the car?", "imageId": "n2", "answer": "red", "isBalanced": True,
            "types": {"structural": "query", "semantic": "attr", "detailed": "color"}},
    "204": {"question": "Is the car red or blue?", "imageId": "n2", "answer": "red", "isBalanced": False,
            "types": {"structural": "choose", "semantic": "attr", "detailed": "choose"}},
}


def make_gqa(root: Path) -> Path:
    """LLaVA's layout: `gqa/data/testdev_balanced_questions.json` and `gqa/data/images/`."""
    data = root / "data"
    (data / "images").mkdir(parents=True)
    questions = {q: {**v, "fullAnswer": "", "groups": {"global": None, "local": "x"}, "semantic": [],
                     "semanticStr": "", "entailed": [], "equivalent": [], "annotations": {}} for q, v in GQA_QUESTIONS.items()}
    (data / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    for image_id in ("n1", "n2"):
        (data / "images" / f"{image_id}.jpg").write_bytes(image_bytes((1, 2, 3)))
    return root


# TextVQA -------------------------------------------------------------------------------------

TEXTVQA_ITEMS = [
    {"image_id": "00a1b2c3d4e5f607", "question_id": 1, "question": "what does the sign say?",
     "answers": ["stop"] * 4 + ["stop sign"] * 3 + ["halt", "go", "stop."], "ocr_tokens": ["STOP", "Main St"]},
    {"image_id": "00a1b2c3d4e5f607", "question_id": 2, "question": "what street is this?",
     "answers": ["main st"] * 2 + ["main street"] * 8, "ocr_tokens": ["STOP", "Main St"]},
    {"image_id": "1111111111111111", "question_id": 3, "question": "how many bottles?",
     "answers": ["two"] + ["2"] * 2 + ["3"] * 7, "ocr_tokens": []},
]


def make_textvqa(root: Path, ocr_in_items: bool = True) -> Path:
    (root / "train_images").mkdir(parents=True)
    items = []
    for item in TEXTVQA_ITEMS:
        extra = {"question_tokens": item["question"].split(), "image_classes": [], "image_width": 8,
                 "image_height": 8, "flickr_original_url": "", "flickr_300k_url": "", "set_name": "val"}
        entry = {**item, **extra}
        if not ocr_in_items:
            entry.pop("ocr_tokens")
        items.append(entry)
        (root / "train_images" / f"{item['image_id']}.jpg").write_bytes(image_bytes((9, 9, 9)))
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps(
        {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": items}))
    if not ocr_in_items:
        ocr = [{"image_id": i["image_id"], "ocr_tokens": i["ocr_tokens"]} for i in TEXTVQA_ITEMS]
        (root / "TextVQA_Rosetta_OCR_v0.2_val.json").write_text(json.dumps({"data": ocr}))
    return root

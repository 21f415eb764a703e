"""Shared pieces: answer parsing, prompts, answers records and the engine-backed answerer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from sharegpt4v.evaluation import (
    MULTIPLE_CHOICE_PROMPT,
    SHORT_ANSWER_PROMPT,
    Answerer,
    BenchmarkError,
    EngineAnswerer,
    Question,
    answer_record,
    infer_option,
    normalize_short,
    parse_jsonl,
    parse_yes_no,
)
from sharegpt4v.evaluation.common import choice_prompt, rotate, short_prompt
from sharegpt4v.modeling.templates import SYSTEM_PROMPT
from tests.evaluation.builders import oracle


def test_paper_prompt_suffixes() -> None:
    assert SHORT_ANSWER_PROMPT == "Answer the question using a single word or phrase."
    assert MULTIPLE_CHOICE_PROMPT == "Answer with the option's letter from the given choices directly."
    assert short_prompt("Is it red?") == "Is it red?\nAnswer the question using a single word or phrase."
    assert choice_prompt("Which?", ["x", "y"]) == f"Which?\nA. x\nB. y\n{MULTIPLE_CHOICE_PROMPT}"


@pytest.mark.parametrize("text, label", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No.", "no"), ("not at all", "no"),
    ("nope", "no"), ("I think yes", "other"), ("maybe", "other"), ("", "other"), ("yesno", "yes"),
    (" no", "no"), ("snow", "no"),  # "no" inside the first 4 characters counts, as in MME's tool
])
def test_mme_yes_no_rule(text: str, label: str) -> None:
    assert parse_yes_no(text) == label


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), (" C ", "C"), ("(D)", "D"), ("B.", "B"), ("A. apple", "A"), ("The answer is B", "B"),
    ("I choose option [C]: plum", "C"), ("B or C", None), ("E", None), ("", None),
    ("A cat sits on the pear", "B"),  # "A" may be an article: fall back to the option text
    ("it is a plum", "C"), ("apple or pear", None),
])
def test_infer_option_vlmevalkit_style(text: str, expected: str | None) -> None:
    assert infer_option(text, {"A": "apple", "B": "pear", "C": "plum", "D": "fig"}) == expected


@pytest.mark.parametrize("text, normal", [
    ("Top Left", "top left"), ("top-left.", "top left"), ("Two", "2"), ("zero", "0"), ("  RED! ", "red"),
    ("OPEN", "open"), ("ten", "10"),
])
def test_normalize_short(text: str, normal: str) -> None:
    assert normalize_short(text) == normal


def test_rotate_moves_the_answer_letter() -> None:
    options = ["w", "x", "y", "z"]
    assert [rotate(options, k) for k in range(4)] == [["w", "x", "y", "z"], ["z", "w", "x", "y"],
                                                      ["y", "z", "w", "x"], ["x", "y", "z", "w"]]
    for k in range(4):
        assert rotate(options, k).index("x") == (1 + k) % 4


def test_answer_record_key_order_matches_llava() -> None:
    plain = answer_record("q1", "Is it?\nAnswer...", "Yes", "m")
    assert list(plain) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    mmbench = answer_record(5, "Q\nA. a", "A", "m", round_id=0, options=["a"], option_char=["A"])
    assert list(mmbench) == ["question_id", "round_id", "prompt", "text", "options", "option_char",
                             "answer_id", "model_id", "metadata"]
    assert len(plain["answer_id"]) == 22 and plain["answer_id"] != answer_record("q1", "", "", "m")["answer_id"]
    assert parse_jsonl(json.dumps(plain) + "\n\n") == [plain]
    with pytest.raises(BenchmarkError, match="line 1 lacks question_id"):
        parse_jsonl('{"text": "x"}\n')
    with pytest.raises(BenchmarkError, match="line 2 is not JSON"):
        parse_jsonl(json.dumps(plain) + "\n{oops\n")


@dataclass
class _Gen:
    text: str
    finish_reason: str = "stop"
    error: str | None = None
    detail: str | None = None


class _FakeEngine:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def generate(self, images: list[bytes], prompts: list[str], max_new_tokens: int | None = None, **kw: Any) -> list[_Gen]:
        self.calls.append({"images": images, "prompts": prompts, "max_new_tokens": max_new_tokens, **kw})
        return [_Gen("", "error", "bad_image", "not a decodable image") if img == b"bad" else _Gen(f"  answer {i} \n")
                for i, img in enumerate(images)]


def test_engine_answerer_prompts_batches_greedy_and_strips() -> None:
    engine = _FakeEngine()
    answerer = EngineAnswerer(engine, batch_size=3, max_new_tokens=7, chunk=4)
    assert isinstance(answerer, Answerer) and isinstance(oracle(), Answerer)
    questions = [Question(i, b"bad" if i == 5 else b"png", short_prompt(f"Q{i}?"), "a") for i in range(6)]
    texts = answerer.answer(questions)
    assert texts == ["answer 0", "answer 1", "answer 2", "answer 3", "answer 0", ""]
    assert answerer.errors == {5: "bad_image: not a decodable image"}
    assert [len(c["prompts"]) for c in engine.calls] == [4, 2]
    call = engine.calls[0]
    assert call["max_new_tokens"] == 7 and call["batch_size"] == 3
    assert call["do_sample"] is False and call["num_beams"] == 1
    prompt = call["prompts"][1]
    assert prompt == f"{SYSTEM_PROMPT} USER: <image>\nQ1?\n{SHORT_ANSWER_PROMPT} ASSISTANT:"
    assert all(p.count("<image>") == 1 for c in engine.calls for p in c["prompts"])
    with pytest.raises(BenchmarkError, match="without an image"):
        answerer.answer([Question("t", None, "text only", "a")])

"""Pieces every benchmark shares: the question, the answerer, answer parsing, answers files.

Answers files use LLaVA's answers-JSONL format (`model_vqa*.py`), one object per line, keys in
LLaVA's order: `question_id, prompt, text, answer_id, model_id, metadata`, so that a file
written here can be scored by the reference scripts and a reference file can be scored here.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sharegpt4v.errors import PlatformError

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class BenchmarkError(PlatformError, ValueError):
    """A benchmark folder or answers file that cannot be used; the message says what is wrong."""


@dataclass
class Question:
    id: Any  # the answers file's `question_id`, as the reference question files have it
    image: bytes | None  # encoded image file bytes; None when only scoring
    prompt: str  # user text without `<image>`, instruction suffix included
    answer: Any  # ground truth in the benchmark's own form (letter, "yes"/"no", list of 10, ...)
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def short_prompt(question: str) -> str:
    return f"{question}\n{SHORT_ANSWER_PROMPT}"


def choice_block(question: str, options: Sequence[str]) -> str:
    """`question\\nA. opt\\nB. opt...` (MMBench's and LLaVA's CQM-A layout, without the suffix)."""
    return question + "".join(f"\n{LETTERS[i]}. {option}" for i, option in enumerate(options))


def choice_prompt(question: str, options: Sequence[str]) -> str:
    return f"{choice_block(question, options)}\n{MULTIPLE_CHOICE_PROMPT}"


def rotate(options: Sequence[str], k: int) -> list[str]:
    """MMBench's circular copy k: `new[j] = orig[(j - k) mod n]` (the answer letter moves by +k)."""
    n = len(options)
    return [options[(j - k) % n] for j in range(n)]


# answer parsing ------------------------------------------------------------------------------


def parse_yes_no(text: str) -> str:
    """MME's rule (official `calculation.py`): "yes"/"no" exactly, else "yes" or "no" within the
    first 4 characters (yes wins), else "other" (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def infer_option(text: str, options: dict[str, str]) -> str | None:
    """The option letter a free-form answer picks, or None (VLMEvalKit's `can_infer`, no LLM judge).

    An exact letter first; then exactly one option letter among the words once `.()[],:;!*#{}`
    are turned into spaces (refused when "A" could be an article: an "A" in more than 3 words);
    then exactly one option text contained in the lower-cased answer.
    """
    text = str(text)
    if text.strip() in options:
        return text.strip()
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
    found = [letter for letter in options if letter in words]
    if len(found) == 1 and not ("A" in words and len(words) > 3):
        return found[0]
    lowered = text.lower()
    by_text = [letter for letter, option in options.items() if str(option).lower() in lowered]
    return by_text[0] if len(by_text) == 1 else None


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}


def normalize_short(text: str) -> str:
    """Lower-case, punctuation to spaces, number words to digits, single spaces."""
    words = re.sub(r"[^\w\s]|_", " ", str(text).lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def group_all(flags: Iterable[tuple[Hashable, bool]]) -> dict[Hashable, bool]:
    """{group: every member right} from (group, right) pairs: MME's acc+ and MMBench's circular hit."""
    out: dict[Hashable, bool] = {}
    for group, right in flags:
        out[group] = out.get(group, True) and right
    return out


# answerers -----------------------------------------------------------------------------------


@runtime_checkable
class Answerer(Protocol):
    """Anything that answers questions: a model behind an engine, a remote endpoint, a test double."""

    def answer(self, questions: Sequence[Question]) -> list[str]: ...


class EngineAnswerer:
    """Greedy answers from an `InferenceEngine`, with the vicuna_v1 generation prompt.

    `errors` collects per-question engine errors (`{question index: "bad_image: ..."}`); such a
    question gets the empty answer, which every scorer counts as wrong.
    """

    def __init__(self, engine: Any, batch_size: int = 32, max_new_tokens: int = 16, template: str = "vicuna_v1",
                 chunk: int = 1024, progress: bool = False):
        self.engine = engine
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.template = template
        self.chunk = chunk  # questions per engine call: enough for length-aware batching, bounded memory
        self.progress = progress
        self.errors: dict[int, str] = {}

    @classmethod
    def from_config(cls, engine: Any, eval_cfg: Any, **kw: Any) -> "EngineAnswerer":
        return cls(engine, eval_cfg.batch_size, eval_cfg.max_new_tokens, **kw)

    def prompt(self, question: Question) -> str:
        from sharegpt4v.modeling.templates import generation_prompt

        return generation_prompt(self.template, question.prompt, with_image=True)

    def answer(self, questions: Sequence[Question]) -> list[str]:
        from tqdm import tqdm

        texts: list[str] = []
        self.errors = {}
        for start in tqdm(range(0, len(questions), self.chunk), desc="answer", unit="chunk", disable=not self.progress):
            part = questions[start : start + self.chunk]
            missing = [q.id for q in part if q.image is None]
            if missing:
                raise BenchmarkError(f"questions without an image cannot be answered by a LLaVA engine: {missing[:3]}")
            generations = self.engine.generate(
                [q.image for q in part], [self.prompt(q) for q in part], self.max_new_tokens,
                batch_size=self.batch_size, num_beams=1, do_sample=False, repetition_penalty=1.0,
            )
            for i, generation in enumerate(generations, start):
                if generation.finish_reason == "error":
                    self.errors[i] = f"{generation.error}: {generation.detail}"
                texts.append(generation.text.strip())
        return texts


# answers files -------------------------------------------------------------------------------


def answer_id() -> str:
    return uuid.uuid4().hex[:22]  # LLaVA writes a 22-character shortuuid; only uniqueness matters


def answer_record(question_id: Any, prompt: str, text: str, model_id: str,
                  metadata: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """One answers-JSONL line; `extra` keys (MMBench's round_id, options...) go after `prompt`."""
    record: dict[str, Any] = {"question_id": question_id}
    if "round_id" in extra:  # MMBench's answers put it second
        record["round_id"] = extra.pop("round_id")
    record.update(prompt=prompt, text=text, **extra)
    record.update(answer_id=answer_id(), model_id=model_id, metadata=metadata or {})
    return record


def dump_jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


def parse_jsonl(data: bytes | str, where: str = "answers") -> list[dict[str, Any]]:
    text = data.decode() if isinstance(data, bytes) else data
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{where}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "question_id" not in record or "text" not in record:
            raise BenchmarkError(f"{where}: line {number} lacks question_id/text (not an answers-JSONL line)")
        records.append(record)
    return records


def read_bytes(uri: str) -> bytes:
    """A local file or an `s3://` object."""
    from sharegpt4v.storage import split

    store, name = split(uri)
    return store.get_bytes(name)

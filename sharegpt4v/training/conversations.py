"""The conversations a stage trains on, as LLaVA writes them (`[{"from": "human", ...}, {"from": "gpt", ...}]`):

- ``captions``: the fixed captioner instruction + a caption; the `plain` template keeps only the
  image and the caption;
- ``vqa``: one world VQA item as a single-turn conversation with the paper's prompt suffixes (short
  answers and yes/no: one word or phrase; multiple choice: the option's letter);
- ``conversations``: the conversation records that came with an ingested LLaVA JSON.
"""

from __future__ import annotations

from typing import Any

from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
from sharegpt4v.modeling.templates import IMAGE_PLACEHOLDER

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

KINDS = ("captions", "vqa", "conversations")
CAPTIONS, VQA, CONVERSATIONS = 0, 1, 2


def caption_conversation(caption: str, instruction: str = CAPTION_INSTRUCTION) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{instruction}"}, {"from": "gpt", "value": caption}]


def vqa_prompt(item: dict[str, Any]) -> str:
    """The paper's evaluation prompts: short/yes-no get the short suffix; choices list `A. ...`."""
    kind = item.get("kind")
    if kind in ("mc", "choice"):
        options = item.get("options") or []
        block = "".join(f"\n{LETTERS[i]}. {option}" for i, option in enumerate(options))
        return f"{item['question']}{block}\n{CHOICE_SUFFIX}"
    return f"{item['question']}\n{SHORT_ANSWER_SUFFIX}"


def vqa_answer(item: dict[str, Any], reasons: str = "none") -> str:
    """The trained answer: MC as its letter; with `reasons` (`StageConfig.yes_no_reasons`), a yes/no
    item that carries its `reason` (world items do) is answered with it: "after" gives "no, it is
    blue." (the answer word first, where MME's parser reads it), "before" gives "it is blue, so no."."""
    answer = str(item["answer"])
    if reasons != "none" and item.get("kind") == "yesno" and item.get("reason"):
        return f"{answer}, {item['reason']}." if reasons == "after" else f"{item['reason']}, so {answer}."
    if item.get("kind") in ("mc", "choice"):
        options = [str(o) for o in item.get("options") or []]
        if answer not in LETTERS[: len(options)] and answer in options:
            answer = LETTERS[options.index(answer)]  # an answer given as the option's text
    return answer


def vqa_conversation(item: dict[str, Any], reasons: str = "none") -> list[dict[str, str]]:
    return [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{vqa_prompt(item)}"},
            {"from": "gpt", "value": vqa_answer(item, reasons)}]


def valid_vqa(item: Any) -> bool:
    return isinstance(item, dict) and bool(str(item.get("question", "")).strip()) and item.get("answer") not in (None, "")


def normalise_conversation(turns: Any) -> list[dict[str, str]] | None:
    """An ingested conversation with exactly one `<image>` (in the first human turn), or None if malformed."""
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        return None
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") != ("human" if i % 2 == 0 else "gpt"):
            return None
        value = turn.get("value")
        if not isinstance(value, str):
            return None
        out.append({"from": turn["from"], "value": value.replace(IMAGE_PLACEHOLDER, "").strip()})
    if not any(t["value"] for t in out[1::2]):
        return None
    out[0]["value"] = f"{IMAGE_PLACEHOLDER}\n{out[0]['value']}"
    return out


def example_conversation(kind: int, item: int, meta: dict[str, Any], caption: str | None,
                         reasons: str = "none") -> list[dict[str, str]]:
    if kind == CAPTIONS:
        assert caption is not None
        return caption_conversation(caption)
    if kind == VQA:
        return vqa_conversation(meta["vqa"][item], reasons)
    conversation = normalise_conversation(meta.get("conversations"))
    assert conversation is not None  # checked by the index pass
    return conversation


def example_id(kind: int, item: int, sample_id: str, meta: dict[str, Any]) -> str:
    if kind == CAPTIONS:
        return sample_id
    if kind == VQA:
        return str(meta["vqa"][item].get("qid") or f"{sample_id}/q{item}")
    return f"{sample_id}/conversation"

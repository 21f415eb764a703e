"""Conversation templates (LLaVA-1.5 `plain` and `vicuna_v1`) and exact label masking.

Every segment is tokenized on its own and its ids are concatenated, so the boundary between
masked and supervised tokens is known exactly; it is never inferred by re-tokenizing strings
and counting (the reference code's way, which silently zeroes whole samples when the counts
disagree with the tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
Template = Literal["plain", "vicuna_v1"]
TEMPLATES = ("plain", "vicuna_v1")


@dataclass
class Encoded:
    input_ids: list[int]  # `<image>` already expanded to `image_tokens` ids
    labels: list[int]  # IGNORE_INDEX where not supervised
    truncated: bool  # cut at max_length (answer tokens may be missing)
    fully_masked: bool  # no supervised token left: the sample would train nothing

    @property
    def supervised_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def image_token_id(tokenizer: Any) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_PLACEHOLDER} token; add it as a special token")
    return int(token_id)


def expand_image_tokens(ids: list[int], image_id: int, image_tokens: int) -> list[int]:
    """Repeat each `<image>` id `image_tokens` times: HF LLaVA (5.x) expects one id per visual token."""
    out: list[int] = []
    for token in ids:
        out.extend([token] * image_tokens if token == image_id else [token])
    return out


def _normalise_human(value: str) -> str:
    # LLaVA moves the placeholder to the start of the turn, followed by a newline.
    if IMAGE_PLACEHOLDER in value:
        rest = value.replace(IMAGE_PLACEHOLDER, "").strip()
        return f"{IMAGE_PLACEHOLDER}\n{rest}"
    return value


def _rounds(conversations: list[dict[str, str]]) -> list[tuple[str, str]]:
    if not conversations or len(conversations) % 2:
        raise ValueError(f"conversation: need human/gpt pairs, got {len(conversations)} turns")
    rounds = []
    for i in range(0, len(conversations), 2):
        human, gpt = conversations[i], conversations[i + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise ValueError(
                f"conversation turn {i}: expected 'human' then 'gpt', got {human.get('from')!r}, {gpt.get('from')!r}"
            )
        rounds.append((str(human["value"]), str(gpt["value"])))
    return rounds


def _adds_word_start_itself(tokenizer: Any) -> bool:
    """SentencePiece-style tokenizers (Llama/Vicuna) mark a word start themselves ("a" -> "▁a").

    For them an answer segment is tokenized without its separating space, so that it gets the
    same tokens as inside the whole conversation ("ASSISTANT: a" -> ..., "▁a"), not "▁▁a".
    """
    pieces = tokenizer.tokenize("a")
    return bool(pieces) and pieces[0].startswith("\u2581")


def _segments(conversations: list[dict[str, str]], template: str, implicit_space: bool = False) -> list[tuple[str, bool]]:
    """(text, supervised) pieces in order. A supervised piece is followed by `</s>` in vicuna_v1."""
    rounds = _rounds(conversations)
    if template == "plain":
        if len(rounds) != 1:
            raise ValueError(f"template plain: takes one human and one gpt turn, got {len(rounds)} rounds")
        # LLaVA's plain template keeps only the image from the human turn.
        image = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in rounds[0][0] else ""
        return [(image, False), (rounds[0][1] + "\n", True)]
    if template == "vicuna_v1":
        segments: list[tuple[str, bool]] = []
        for i, (human, gpt) in enumerate(rounds):
            # The first user turn is one segment with the system prompt, so that it tokenizes
            # exactly like `generation_prompt(...)` does at inference.
            prefix = f"{SYSTEM_PROMPT} " if i == 0 else ""
            segments.append((f"{prefix}USER: {_normalise_human(human)} ASSISTANT:", False))
            segments.append((gpt if implicit_space else f" {gpt}", True))
        return segments
    raise ValueError(f"template: unknown {template!r} (known: {', '.join(TEMPLATES)})")


def encode_conversation(
    conversations: list[dict[str, str]], tokenizer: Any, template: str, max_length: int, image_tokens: int
) -> Encoded:
    """Token ids and labels for one LLaVA/ShareGPT4V conversation.

    Only answers are supervised (vicuna_v1: each answer and its `</s>`; plain: the caption and
    its newline). Samples cut at `max_length` are flagged `truncated`; samples with nothing
    supervised are flagged `fully_masked`; neither is dropped here.
    """
    image_id = image_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, supervised in _segments(conversations, template, _adds_word_start_itself(tokenizer)):
        piece = expand_image_tokens(tokenizer(text, add_special_tokens=False)["input_ids"], image_id, image_tokens)
        if supervised and template == "vicuna_v1":
            piece = piece + [eos]
        ids.extend(piece)
        if supervised:
            labels.extend(IGNORE_INDEX if t == image_id else t for t in piece)
        else:
            labels.extend([IGNORE_INDEX] * len(piece))
    truncated = len(ids) > max_length
    if truncated:
        if image_id in ids[max_length:]:  # the model needs every image position of every image
            raise ValueError(f"max_length {max_length} cuts through the {image_tokens} image tokens; raise max_length")
        ids, labels = ids[:max_length], labels[:max_length]
    fully_masked = all(label == IGNORE_INDEX for label in labels)
    return Encoded(ids, labels, truncated, fully_masked)


def generation_prompt(template: str, user_text: str, with_image: bool = True) -> str:
    """The prompt string for inference; the model's answer continues it."""
    if template == "vicuna_v1":
        image = f"{IMAGE_PLACEHOLDER}\n" if with_image else ""
        return f"{SYSTEM_PROMPT} USER: {image}{user_text} ASSISTANT:"
    if template == "plain":
        return (IMAGE_PLACEHOLDER if with_image else "") + user_text
    raise ValueError(f"template: unknown {template!r} (known: {', '.join(TEMPLATES)})")


def chat_generation_prompt(template: str, turns: list[tuple[str, str]], with_image: bool = True) -> str:
    """The inference prompt for a multi-turn chat: `(role, text)` turns, `user`/`assistant`
    alternating, starting and ending with `user`; the model's answer continues it.

    The layout is the one `encode_conversation` trains on: for vicuna_v1,
    `SYSTEM USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:` (LLaVA-1.5's sep " ", sep2 "</s>").
    The image placeholder goes into the first user turn.
    """
    if not turns or len(turns) % 2 == 0:
        raise ValueError(f"chat: need user/assistant turns ending with a user turn, got {len(turns)} turns")
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"chat turn {i}: expected role {expected!r}, got {role!r}")
    if template == "plain":
        if len(turns) != 1:
            raise ValueError(f"template plain: takes one user turn, got {len(turns)} turns")
        return generation_prompt(template, turns[0][1], with_image)
    if template != "vicuna_v1":
        raise ValueError(f"template: unknown {template!r} (known: {', '.join(TEMPLATES)})")
    parts = []
    for i in range(0, len(turns) - 1, 2):
        human = f"{IMAGE_PLACEHOLDER}\n{turns[i][1]}" if (i == 0 and with_image) else turns[i][1]
        prefix = f"{SYSTEM_PROMPT} " if i == 0 else ""
        parts.append(f"{prefix}USER: {human} ASSISTANT: {turns[i + 1][1]}</s>")
    last = turns[-1][1]
    if len(turns) == 1:
        return generation_prompt(template, last, with_image)
    return "".join(parts) + f"USER: {last} ASSISTANT:"

"""Shared tiny-scale helpers for the modeling and captioning-engine tests (imported, not conftest)."""

from __future__ import annotations

import functools
import io
from typing import Any

from PIL import Image

from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
from sharegpt4v.config import RecipeConfig, WorldConfig, load_recipe
from sharegpt4v.modeling.templates import SYSTEM_PROMPT
from sharegpt4v.world import WorldSample, make_sample


@functools.lru_cache(maxsize=1)
def recipe() -> RecipeConfig:
    return load_recipe("tiny")


# The tiny profile's image side and image-token count (48 px / patch 16 = 9 tokens at the time of writing).
IMAGE_SIZE = load_recipe("tiny").model.vision.image_size
IMAGE_TOKENS = load_recipe("tiny").model.image_tokens


@functools.lru_cache(maxsize=4)
def world(n: int = 300) -> tuple[WorldSample, ...]:
    return tuple(make_sample(0, i, WorldConfig()) for i in range(n))


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    texts = []
    for s in world(300):
        m = s.metadata
        texts += [m["detailed_caption"], m["brief_caption"]]
        texts += [f"{q['question']} {q['answer']}" for q in m["vqa"]]
    texts += [f"{SYSTEM_PROMPT} USER: {CAPTION_INSTRUCTION} ASSISTANT:"] * 20
    return tuple(texts)


def tokenizer() -> Any:
    """A fresh BPE trained on the world's captions and QA (fast: ~50 ms)."""
    from sharegpt4v.modeling.tokenizer import train_tokenizer

    return train_tokenizer(corpus(), recipe().model.language.vocab_size)


def tiny_model(seed: int = 0) -> tuple[Any, Any]:
    from sharegpt4v.modeling.builder import build_tiny

    return build_tiny(recipe().model, tokenizer(), seed)


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()

"""Versioned teacher prompts: base prompt + source-specific prompt + base prompt (RECIPE.md).

The paper builds each teacher request from a base prompt that asks for a comprehensive
description, wrapped around a short addition for the image's source family. The base prompt
is repeated after the addition so the general instructions are the last thing the teacher
reads. Every caption records the `prompt_id` (`teacher-v1/photo`, ...) that produced it;
change PROMPT_VERSION whenever any text below changes.
"""

from __future__ import annotations

PROMPT_VERSION = "v1"

BASE_PROMPT = (
    "Write a thorough, detailed description of this image. "
    "Mention every object you can see and its attributes: colour, shape, size and material. "
    "Give the number of objects of each kind. "
    "Say where each object is in the picture and how the objects are arranged relative to one "
    "another (left of, right of, above, below, in front of, behind, next to). "
    "Describe any actions or interactions taking place. "
    "If there is any writing in the image, copy it out exactly as written. "
    "Describe the background and setting, and comment on the style, lighting, colours and overall "
    "aesthetic of the image. "
    "Only describe what you can see with confidence; do not guess and do not invent details."
)

SOURCE_PROMPTS: dict[str, str] = {
    "photo": (
        "This image is a photograph. Name the kinds of objects in it, state their colours, "
        "describe what any people or animals are doing, and say where each object is located "
        "in the frame."
    ),
    "text": (
        "This image contains text. Read every piece of text in it and transcribe it word for word, "
        "keeping the original spelling, capitalisation, punctuation and line order, and say where "
        "in the image each piece of text is placed."
    ),
    "art": (
        "This image is a work of art. If you can tell, name the artist; describe the artistic "
        "style, the genre, and the technique or medium (for example brushwork, palette, "
        "composition, use of light)."
    ),
    "landmark": (
        "This image shows a landmark. Name the landmark, say where in the world it is, and give a "
        "brief account of its history and why it is known, together with the visual description."
    ),
    "celebrity": (
        "This image shows a well-known person. If you can recognise them with confidence, say who "
        "they are and what role or profession they are known for, then describe what they are "
        "doing and how they appear."
    ),
}

FAMILIES = tuple(SOURCE_PROMPTS)

# Dataset source names (lower case) -> prompt family; anything unlisted is treated as a photo.
_SOURCE_TO_FAMILY: dict[str, str] = {
    **{name: "photo" for name in ("coco", "lcs", "laion", "cc", "cc3m", "sbu", "sam", "photo")},
    **{name: "text" for name in ("textcaps", "text", "ocr")},
    **{name: "art" for name in ("wikiart", "art")},
    **{name: "landmark" for name in ("landmark", "landmarks")},
    **{name: "celebrity" for name in ("celebrity", "celebrities")},
}


def source_family(source: str) -> str:
    """The prompt family of a dataset source name (case-insensitive; unknown -> "photo")."""
    return _SOURCE_TO_FAMILY.get(source.strip().lower(), "photo")


def teacher_prompt(source: str) -> tuple[str, str]:
    """(prompt_id, prompt text) for an image from `source`."""
    family = source_family(source)
    text = f"{BASE_PROMPT}\n\n{SOURCE_PROMPTS[family]}\n\n{BASE_PROMPT}"
    return f"teacher-{PROMPT_VERSION}/{family}", text

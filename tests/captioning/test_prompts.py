"""Teacher prompts: base + source-specific + base, one per family, versioned ids."""

from __future__ import annotations

import pytest

from sharegpt4v.captioning.prompts import (
    BASE_PROMPT,
    FAMILIES,
    PROMPT_VERSION,
    SOURCE_PROMPTS,
    source_family,
    teacher_prompt,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_is_base_specific_base(family: str) -> None:
    prompt_id, text = teacher_prompt(family)
    assert prompt_id == f"teacher-{PROMPT_VERSION}/{family}"
    assert text == f"{BASE_PROMPT}\n\n{SOURCE_PROMPTS[family]}\n\n{BASE_PROMPT}"
    assert text.startswith(BASE_PROMPT) and text.endswith(BASE_PROMPT)
    assert text.count(BASE_PROMPT) == 2


def test_prompts_differ_by_family() -> None:
    prompts = {family: teacher_prompt(family) for family in FAMILIES}
    assert set(FAMILIES) == {"photo", "text", "art", "landmark", "celebrity"}
    assert len({text for _, text in prompts.values()}) == len(FAMILIES)
    assert len({prompt_id for prompt_id, _ in prompts.values()}) == len(FAMILIES)
    assert PROMPT_VERSION == "v1"


def test_base_prompt_asks_for_a_comprehensive_description() -> None:
    base = BASE_PROMPT.lower()
    for word in ("colour", "shape", "size", "material", "number", "left of", "action", "writing",
                 "exactly", "background", "style", "aesthetic", "confidence"):
        assert word in base, word


@pytest.mark.parametrize(
    "family, words",
    [
        ("photo", ("kinds of objects", "colours", "doing", "located")),
        ("text", ("transcribe", "word for word")),
        ("art", ("artist", "style", "genre", "technique")),
        ("landmark", ("name the landmark", "where", "history")),
        ("celebrity", ("who", "role", "doing")),
    ],
)
def test_source_specific_additions(family: str, words: tuple[str, ...]) -> None:
    for word in words:
        assert word in SOURCE_PROMPTS[family].lower(), (family, word)


@pytest.mark.parametrize(
    "source, family",
    [
        *[(s, "photo") for s in ("coco", "lcs", "laion", "cc", "cc3m", "sbu", "sam", "photo")],
        *[(s, "text") for s in ("textcaps", "text", "ocr")],
        *[(s, "art") for s in ("wikiart", "art")],
        *[(s, "landmark") for s in ("landmark", "landmarks")],
        *[(s, "celebrity") for s in ("celebrity", "celebrities")],
        ("COCO", "photo"), ("TextCaps", "text"), ("WikiArt", "art"), (" Landmarks ", "landmark"),
        ("Celebrities", "celebrity"), ("something-else", "photo"), ("", "photo"),
    ],
)
def test_source_family(source: str, family: str) -> None:
    assert source_family(source) == family
    assert teacher_prompt(source)[0] == f"teacher-v1/{family}"

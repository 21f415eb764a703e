"""Captions and the fact reader: detailed captions are complete, brief ones are not, lies are caught."""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from statistics import mean

import pytest

from sharegpt4v.world import (
    COLOURS,
    FACT_KINDS,
    Scene,
    WorldObject,
    brief_caption,
    detailed_caption,
    extract_facts,
    is_true,
    scene_facts,
    score_caption,
)
from sharegpt4v.world.vocab import NUMBER_WORDS


def _detailed(scene: Scene, k: int = 0) -> str:
    return detailed_caption(scene, random.Random(f"d{k}:{scene.id}"))


def test_detailed_captions_state_every_fact_and_nothing_false(scenes):
    for s in scenes:
        caption = _detailed(s)
        score = score_caption(caption, s)
        assert score.recall == 1.0, (caption, score.missing)
        assert score.hallucinated == 0, (caption, score.false)
        assert set(score.recall_by_kind.values()) == {1.0}


def test_detailed_captions_are_complete_under_other_phrasings(scenes):
    for k in range(1, 4):
        for s in scenes[::3]:
            score = score_caption(_detailed(s, k), s)
            assert (score.recall, score.hallucinated) == (1.0, 0), (s.id, k, score.missing, score.false)


def test_brief_captions_have_low_recall_and_no_lies(scenes):
    recalls = []
    for s in scenes:
        caption = brief_caption(s, random.Random(s.id))
        score = score_caption(caption, s)
        assert score.hallucinated == 0, (caption, score.false)
        assert len(re.findall(r"[.!?]", caption)) == 1 and len(caption) < 90
        assert not re.search(r"\b(left|right|top|bottom|center|middle|above|below)\b", caption)
        assert '"' not in caption
        recalls.append(score.recall)
    assert mean(recalls) < 0.35


def test_detailed_caption_length(scenes):
    lengths = [len(_detailed(s)) for s in scenes if 3 <= len(s.objects) <= 6]
    assert 300 <= mean(lengths) <= 900
    assert min(lengths) >= 250


def test_captions_are_varied(scenes):
    captions = [_detailed(s) for s in scenes[:200]]
    assert len(set(captions)) == len(captions)
    openings = Counter(" ".join(c.split()[:3]) for c in captions)
    assert len(openings) >= 25 and openings.most_common(1)[0][1] < 0.2 * len(captions)
    sentence_starts = {" ".join(x.split()[:2]) for c in captions for x in re.split(r"(?<=\.)\s+", c)}
    assert len(sentence_starts) >= 60
    briefs = {brief_caption(s, random.Random(s.id)) for s in scenes[:200]}
    assert len(briefs) >= 100


def test_swapping_an_object_colour_is_a_hallucination(scenes):
    for s in scenes[:150]:
        caption = _detailed(s)
        o = s.objects[0]
        new = next(c for c in COLOURS if c not in {x.colour for x in s.objects})
        lie = re.sub(rf"\b{o.colour}(?= {o.shape})", new, caption)
        score = score_caption(lie, s)
        assert f"object|{new}|{o.shape}" in score.false and score.hallucinated >= 1


def test_scores_by_kind_separate_seeing_an_attribute_from_binding_it():
    scene = Scene("k", "photo", "photo", "white", "plain", (
        WorldObject("circle", "red", "large", 0, 0), WorldObject("square", "blue", "small", 2, 2)))
    # Both colours and both shapes named, but bound the wrong way round; nothing else said.
    score = score_caption("A red square and a blue circle.", scene)
    assert score.recall_by_kind["colour"] == score.recall_by_kind["shape"] == 1.0
    assert score.recall_by_kind["object"] == 0.0
    assert score.false_by_kind["object"] == 2 and score.false_by_kind["colour"] == score.false_by_kind["shape"] == 0
    # The overall false facts are the fact kinds' sum; colour/shape are not counted twice.
    assert score.hallucinated == sum(score.false_by_kind[k] for k in FACT_KINDS) == 2
    # A colour on no object at all is a false colour.
    wrong = score_caption("A green circle sits in the top left corner.", scene)
    assert wrong.false_by_kind["colour"] == 1 and wrong.recall_by_kind["shape"] == 0.5
    assert wrong.false_by_kind["position"] == 1 and wrong.recall_by_kind["position"] == 0.0


def test_mirroring_left_and_right_is_a_hallucination(scenes):
    checked = 0
    for s in scenes[:150]:
        if all(o.col == 1 for o in s.objects):
            continue  # a mirrored description of the middle column stays true
        swap = {"left": "right", "right": "left"}
        lie = re.sub(r"\b(left|right)\b", lambda m: swap[m[1]], _detailed(s))
        assert score_caption(lie, s).hallucinated >= 1, lie
        checked += 1
    assert checked > 100


def test_moving_an_object_is_a_hallucination(scenes):
    for s in scenes[:150]:
        o = s.objects[0]
        free = next((r, c) for r in range(3) for c in range(3) if s.object_at(r, c) is None)
        moved = Scene(s.id, s.source, s.style, s.background, s.texture,
                      (WorldObject(o.shape, o.colour, o.size, *free, o.text), *s.objects[1:]))
        score = score_caption(_detailed(moved), s)
        assert score.hallucinated >= 1 and f"position|{o.colour}|{o.shape}|{moved.objects[0].position}" in score.false


def test_changing_the_total_count_is_a_hallucination(scenes):
    number = r"\b(" + "|".join(NUMBER_WORDS) + r"|\d)(\s+(?:objects|shapes)\b)"
    for s in scenes[:150]:
        n = len(s.objects)
        if n < 2:
            continue
        caption = _detailed(s)
        lie, replaced = re.subn(number, lambda m: NUMBER_WORDS[n + 1] + m[2], caption, count=1, flags=re.IGNORECASE)
        assert replaced == 1, caption
        assert f"count|all|{n + 1}" in score_caption(lie, s).false


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A big red circle sits in the upper left corner.",
         {"object|red|circle", "size|red|circle|large", "position|red|circle|top left"}),
        ("In the middle, there is a little blue square.",
         {"object|blue|square", "size|blue|square|small", "position|blue|square|center"}),
        ("The green star is at the top center.", {"object|green|star", "position|green|star|top"}),
        ("The purple cross is in the lower right.", {"object|purple|cross", "position|purple|cross|bottom right"}),
        ("A violet diamond is placed in the middle of the left side.",
         {"object|purple|diamond", "position|purple|diamond|left"}),
        ("There are three objects: two circles and a single star.",
         {"count|all|3", "count|circle|2", "count|star|1"}),
        ("One red circle and one blue circle.", {"object|red|circle", "object|blue|circle"}),
        ("Some shapes on a gray background.", {"background|gray"}),
        ("Several colourful shapes, circles and squares.", set()),
        ("A red circle is to the left of a blue square.",
         {"object|red|circle", "object|blue|square", "relation|red circle|left of|blue square"}),
        ("The blue square is to the right of the red circle.",
         {"object|red|circle", "object|blue|square", "relation|red circle|left of|blue square"}),
        ("Below the green star is the orange diamond.",
         {"object|green|star", "object|orange|diamond", "relation|green star|above|orange diamond"}),
        ("The red circle is left of the blue square and above the pink star.",
         {"object|red|circle", "object|blue|square", "object|pink|star",
          "relation|red circle|left of|blue square", "relation|red circle|above|pink star"}),
        ('The word "SALE" is written on the red circle.', {"object|red|circle", "text|red circle|SALE"}),
        ("The image appears to be a watercolor painting.", {"style|watercolor"}),
        ("This is pixel art.", {"style|pixel art"}),
        ("The background is white with thin stripes.", {"background|white", "texture|stripes"}),
        ("Everything is set against a plain grey backdrop.", {"background|gray", "texture|plain"}),
        ("The large red circle is on the left of the square.", {"object|red|circle", "size|red|circle|large"}),
        ("There are no triangles.", {"count|triangle|0"}),
    ],
)
def test_reader_on_examples(caption, expected):
    assert extract_facts(caption) == expected


def test_reader_survives_junk():
    rng = random.Random(0)
    vocab = ["red", "circle", "left", "of", "the", "top", "above", "two", "circles", "background", '"', "SALE",
             ",", ".", "\n", "é", "🙂", "\x00", "İ", "ß", "123", "-", "is", "and", "in", "upper", "a", "single"]
    junk = ["", " ", ".", "🙂" * 50, "\x00\x01", "red " * 1000, "left of " * 500, "İİİ red circle İİİ",
            bytes(range(256)).decode("latin-1"), "9999999999 circles", '"""""', "\ud800"]
    junk += [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    junk += ["".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(1, 200))) for _ in range(100)]
    for text in junk:
        facts = extract_facts(text)
        assert isinstance(facts, set)
        assert all(f.split("|")[0] in FACT_KINDS for f in facts)
    assert extract_facts(None) == set()  # type: ignore[arg-type]


def test_reader_is_fast_on_long_input():
    """Model output can be long and unpunctuated: the reader must stay roughly linear."""
    texts = [
        "A large red circle sits in the top left corner, to the left of the blue square. " * 2000,
        "a red circle left of a blue square and " * 2000,
        '"SALE" OPEN in the top left ' * 2000 + "a red circle",
    ]
    for text in texts:
        start = time.perf_counter()
        extract_facts(text)
        assert time.perf_counter() - start < 1.5


def test_is_true_semantics():
    s = Scene("t", "photo", "photo", "white", "noise", (
        WorldObject("circle", "red", "large", 0, 0), WorldObject("square", "blue", "small", 0, 2),
        WorldObject("circle", "green", "small", 1, 0, "SALE"),
    ))
    assert is_true(s, "relation|red circle|left of|blue square")  # same row, not adjacent: true
    assert "relation|red circle|left of|blue square" not in scene_facts(s)  # but not required
    assert is_true(s, "relation|blue square|right of|red circle")
    assert not is_true(s, "relation|blue square|left of|red circle")
    assert is_true(s, "relation|red circle|above|green circle")
    assert is_true(s, "count|circle|2") and not is_true(s, "count|circle|1") and not is_true(s, "count|circle|3")
    assert is_true(s, "count|star|0") and is_true(s, "count|all|3")
    assert is_true(s, "text|green circle|SALE") and not is_true(s, "text|red circle|SALE")
    assert not is_true(s, "object|red|square") and not is_true(s, "size|red|circle|small")
    assert not is_true(s, "nonsense") and not is_true(s, "count|circle|two")
    assert scene_facts(s) >= {"count|all|3", "count|circle|2", "count|square|1", "position|green|circle|left",
                              "relation|red circle|above|green circle", "text|green circle|SALE", "style|photo"}

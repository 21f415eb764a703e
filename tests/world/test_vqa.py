"""VQA items: every answer re-derived from the scene graph by parsing the question text."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

from sharegpt4v.world import (
    COLOURS,
    POSITIONS,
    SHAPES,
    STYLES,
    Scene,
    WorldObject,
    vqa_items,
)
from sharegpt4v.world.vqa import reason_implies

# How questions name cells, written out independently of the generator.
CELLS = {
    "in the top left corner": (0, 0), "at the top center": (0, 1), "in the top right corner": (0, 2),
    "on the middle left": (1, 0), "in the center": (1, 1), "on the middle right": (1, 2),
    "in the bottom left corner": (2, 0), "at the bottom center": (2, 1), "in the bottom right corner": (2, 2),
}
PLURALS = {("crosses" if s == "cross" else s + "s"): s for s in SHAPES}


def _items(scene: Scene) -> list[dict]:
    return vqa_items(scene, random.Random(scene.id))


def _cell(scene: Scene, question: str) -> WorldObject:
    found = [(r, c) for phrase, (r, c) in CELLS.items() if phrase in question]
    assert len(found) == 1, question
    obj = scene.object_at(*found[0])
    assert obj is not None, f"question about an empty cell: {question}"
    return obj


def _named(scene: Scene, question: str) -> WorldObject:
    found = [o for o in scene.objects if re.search(rf"\b{o.colour} {o.shape}\b", question)]
    assert len(found) == 1, question
    return found[0]


def _truth(scene: Scene, item: dict) -> str:
    """The correct answer text (for MC: the correct option), computed from the scene graph."""
    q, cat, kind = item["question"], item["category"], item["kind"]
    counts = scene.shape_counts()
    if kind == "yesno":
        if cat == "existence":
            m = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q)
            return "yes" if scene.object_named(f"{m[1]} {m[2]}") else "no"
        if cat == "count":
            m = re.fullmatch(r"(?:Are|Is) there exactly (\d+|one) (\w+) in the image\?", q)
            n = 1 if m[1] == "one" else int(m[1])
            noun = m[2]
            actual = len(scene.objects) if noun == "objects" else counts.get(PLURALS.get(noun, noun), 0)
            return "yes" if n == actual else "no"
        if cat == "position":
            o = _named(scene, q)
            return "yes" if CELLS[q.removeprefix(f"Is the {o.name} ").rstrip("?")] == (o.row, o.col) else "no"
        if cat == "colour":
            o = _cell(scene, q)
            m = re.fullmatch(r"Is the (\w+) .* (\w+)\?", q)
            assert m[1] == o.shape, q
            return "yes" if m[2] == o.colour else "no"
        if cat == "ocr":
            word = re.search(r'"(\w+)"', q)[1]
            return "yes" if _named(scene, q).text == word else "no"
    if cat == "colour":
        if any(p in q for p in CELLS):
            o = _cell(scene, q)
        else:  # "What colour is the square?": only asked when the shape is unique
            shape = re.fullmatch(r"What colour is the (\w+)\?", q)[1]
            assert counts[shape] == 1, q
            o = next(x for x in scene.objects if x.shape == shape)
        return o.colour
    if cat == "shape":
        return _cell(scene, q).shape
    if cat == "position":
        return _named(scene, q).position
    if cat == "count":
        if "objects" in q:
            return str(len(scene.objects))
        noun = re.fullmatch(r"How many (\w+) are there\?", q)[1]
        return str(counts.get(PLURALS[noun], 0))
    if cat == "ocr":
        return _named(scene, q).text
    if cat == "style":
        return scene.style
    if cat == "background":
        return scene.background
    raise AssertionError(f"unknown item {item}")


def test_every_answer_matches_the_scene_graph(scenes):
    for s in scenes:
        for item in _items(s):
            truth = _truth(s, item)
            if item["kind"] == "mc":
                assert item["options"]["ABCD".index(item["answer"])] == truth, item
            else:
                assert item["answer"] == truth, item


def test_yes_no_come_in_matched_pairs(scenes):
    for s in scenes:
        yesno = [i for i in _items(s) if i["kind"] == "yesno"]
        pairs: dict[str, list[dict]] = {}
        for item in yesno:
            pairs.setdefault(item["pair"], []).append(item)
        for members in pairs.values():
            assert sorted(i["answer"] for i in members) == ["no", "yes"]
            assert len({i["category"] for i in members}) == 1
            assert members[0]["question"] != members[1]["question"]
        categories = {m[0]["category"] for m in pairs.values()}
        expected = {"existence", "count", "position", "colour"} | ({"ocr"} if any(o.text for o in s.objects) else set())
        assert categories == expected


def test_a_blind_reader_cannot_tell_a_pair_apart_by_its_wording(scenes):
    """Existence, colour and count pairs differ only in an object word (MME's pairs differ in one
    detail): with colours and shapes masked, a pair's two questions read the same, so the words
    left (the number asked, the cell) say nothing about the answer."""
    from sharegpt4v.evaluation.blind import question_template

    asked: Counter = Counter()
    for s in scenes:
        pairs: dict[str, list[dict]] = {}
        for item in _items(s):
            if item["kind"] == "yesno" and item["category"] in ("existence", "colour", "count"):
                pairs.setdefault(item["pair"], []).append(item)
        for first, second in pairs.values():
            def read(item: dict) -> str:  # the article follows the masked word ("an orange")
                return re.sub(r"\ban\b", "a", question_template("yesno", item["category"], item["question"])[2])

            assert read(first) == read(second), (first, second)
            if first["category"] == "count":
                asked[re.search(r"exactly (\w+)", first["question"])[1]] += 1
    assert {"one", "2"} <= set(asked)  # every count a scene can have is asked about, "no" as often as "yes"


def test_a_scene_with_every_shape_once_still_gets_a_count_pair():
    """No shape has another count to ask about: the "no" question asks one more of the same shape."""
    objects = tuple(WorldObject(shape, COLOURS[i], "small", i // 3, i % 3) for i, shape in enumerate(SHAPES))
    scene = Scene("crowded", "photo", STYLES[0], "white", "plain", objects)
    items = [i for i in _items(scene) if i["category"] == "count" and i["kind"] == "yesno"]
    assert sorted(i["answer"] for i in items) == ["no", "yes"]
    for item in items:
        assert item["answer"] == _truth(scene, item) and item["reason"] == _reason_truth(scene, item)
        assert reason_implies(item["reason"], item["question"]) == item["answer"]


def _reason_truth(scene: Scene, item: dict) -> str:
    """The fact that decides a yes/no item, in the reason's phrasing, from the scene graph."""
    q, cat = item["question"], item["category"]
    if cat == "colour":
        return f"it is {_cell(scene, q).colour}"
    if cat == "position":
        o = _named(scene, q)
        return "it is " + next(p for p, cell in CELLS.items() if cell == (o.row, o.col))
    if cat == "ocr":
        return f'it says "{_named(scene, q).text}"'
    if cat == "count":
        m = re.fullmatch(r"(?:Are|Is) there exactly (?:\d+|one) (\w+) in the image\?", q)
        shape = PLURALS.get(m[1], m[1])
        n = scene.shape_counts().get(shape, 0)
        plural = next(p for p, singular in PLURALS.items() if singular == shape)
        return {0: f"there is no {shape}", 1: f"there is one {shape}"}.get(n, f"there are {n} {plural}")
    m = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q)
    if item["answer"] == "yes":
        return f"there is {'an' if m[1][0] in 'aeiou' else 'a'} {m[1]} {m[2]}"
    near = [o for o in scene.objects if o.colour == m[1] or o.shape == m[2]]
    return "there is " + " and ".join(f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.name}" for o in near)


def test_yes_no_reasons_state_the_deciding_fact_and_imply_the_answer(scenes):
    for s in scenes:
        for item in _items(s):
            if item["kind"] != "yesno":
                assert "reason" not in item
                continue
            assert item["reason"] == _reason_truth(s, item), item
            assert reason_implies(item["reason"], item["question"]) == item["answer"], item
    # what a model says is read the same way; an answer that is no reason implies nothing
    assert reason_implies("It is red.", "Is the circle in the center red?") == "yes"
    assert reason_implies("it is blue", "Is the circle in the center red?") == "no"
    assert reason_implies("there are 2 circles", "Are there exactly 3 circles in the image?") == "no"
    assert reason_implies("yes", "Is the circle in the center red?") is None


def test_multiple_choice_is_well_formed(scenes):
    letters = Counter()
    for s in scenes:
        mc = [i for i in _items(s) if i["kind"] == "mc"]
        cats = {i["category"] for i in mc}
        assert cats >= {"colour", "shape", "position", "count", "style"}
        assert ("ocr" in cats) == any(o.text for o in s.objects)
        for item in mc:
            assert len(item["options"]) == 4 and len(set(item["options"])) == 4
            assert item["answer"] in "ABCD" and len(item["answer"]) == 1
            vocab = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS, "style": STYLES}.get(item["category"])
            if vocab:
                assert set(item["options"]) <= set(vocab)
            letters[item["answer"]] += 1
    total = sum(letters.values())
    assert all(letters[x] > 0.18 * total for x in "ABCD"), letters


def test_short_answers_are_normalised(scenes):
    for s in scenes:
        for item in _items(s):
            if item["kind"] != "short":
                continue
            answer = item["answer"]
            if item["category"] == "ocr":
                assert answer.isupper()
            elif item["category"] == "count":
                assert answer.isdigit()
            else:
                assert answer == answer.lower()


def test_items_are_unique_json_and_deterministic(scenes):
    for s in scenes[:50]:
        items = _items(s)
        assert json.loads(json.dumps(items)) == items == _items(s)
        assert len({i["qid"] for i in items}) == len(items)
        assert len({i["question"] for i in items if i["kind"] == "yesno"}) == sum(i["kind"] == "yesno" for i in items)
        for item in items:
            assert set(item) >= {"qid", "kind", "category", "question", "answer"}
            assert ("options" in item) == (item["kind"] == "mc") and ("pair" in item) == (item["kind"] == "yesno")

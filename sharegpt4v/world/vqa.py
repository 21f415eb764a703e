"""Questions with exact answers from the scene graph: MME-style yes/no pairs,
MMBench-style 4-option multiple choice, and short answers.

Each yes/no item also carries its `reason`: the fact of the scene that decides it ("it is red",
"there are 2 squares"), phrased so that the answer is "yes" exactly when the fact after its lead
("it is", "there is", "there are", "it says") appears in the question (`reason_implies`).

A pair's two questions differ in one detail, as MME's do: the colour or object asked about, the
shape whose count is asked, the cell; with the object words masked, a colour, existence or count pair
reads the same, so its wording alone does not give the answer away (`evaluation.blind`).

Every question names objects unambiguously: by "colour shape" (unique in a scene) or by grid
cell (one object per cell), never by shape alone unless that shape occurs once.
"""

from __future__ import annotations

import random
import re
from typing import Any

from sharegpt4v.world.scene import Scene, WorldObject
from sharegpt4v.world.vocab import COLOURS, POSITIONS, SHAPES, STYLES, WORDS

LETTERS = ("A", "B", "C", "D")

# How a question refers to a cell ("Which shape is in the top left corner?").
CELL_PHRASES: dict[str, str] = {
    "top left": "in the top left corner", "top": "at the top center", "top right": "in the top right corner",
    "left": "on the middle left", "center": "in the center", "right": "on the middle right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom center",
    "bottom right": "in the bottom right corner",
}


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def vqa_items(scene: Scene, rng: random.Random) -> list[dict[str, Any]]:
    """All question items for `scene`; answers are exact (see module docstring)."""
    items: list[dict[str, Any]] = []

    def add(kind: str, category: str, question: str, answer: str, **extra: Any) -> None:
        items.append({"qid": f"{scene.id}-q{len(items):02d}", "kind": kind, "category": category,
                      "question": question, "answer": answer, **extra})

    for category, (yes_q, yes_reason), (no_q, no_reason) in _yes_no_pairs(scene, rng):
        pair = f"{scene.id}-p{category}"
        questions = [(yes_q, "yes", yes_reason), (no_q, "no", no_reason)]
        rng.shuffle(questions)  # the "yes" question is not always first
        for q, a, reason in questions:
            add("yesno", category, q, a, pair=pair, reason=reason)

    for category, question, correct, distractors in _multiple_choice(scene, rng):
        options = [correct, *rng.sample(distractors, 3)]
        rng.shuffle(options)
        add("mc", category, question, LETTERS[options.index(correct)], options=options)

    for category, question, answer in _short_answers(scene, rng):
        add("short", category, question, answer)
    return items


def _other_cell(obj: WorldObject, rng: random.Random) -> str:
    return rng.choice([p for p in POSITIONS if p != obj.position])


REASON_LEADS = ("it is ", "there is ", "there are ", "it says ")


def reason_implies(reason: str, question: str) -> str | None:
    """The answer a yes/no `reason` implies for `question` ("yes" when its fact is what the question
    asks about), or None when the text is not a reason in the world's phrasing."""
    text = reason.strip().lower().rstrip(".")
    lead = next((x for x in REASON_LEADS if text.startswith(x)), None)
    if lead is None or not text[len(lead):]:
        return None
    # not inside a word, but may run into one: "1 object" is what "exactly 1 objects" asks about
    return "yes" if re.search(rf"(?<!\w){re.escape(text[len(lead):])}", question.lower()) else "no"


# (category, (yes question, its reason), (no question, its reason))
YesNoPair = tuple[str, tuple[str, str], tuple[str, str]]


def _yes_no_pairs(scene: Scene, rng: random.Random) -> list[YesNoPair]:
    objs = scene.objects
    names = {o.name for o in objs}
    pairs: list[YesNoPair] = []

    # existence: a present object vs an absent one differing in colour or shape only. The "no" reason
    # names the objects that share the absent one's colour or shape.
    o = rng.choice(objs)
    absent = [f"{c} {o.shape}" for c in COLOURS if f"{c} {o.shape}" not in names]
    absent += [f"{o.colour} {s}" for s in SHAPES if f"{o.colour} {s}" not in names]
    missing = rng.choice(absent)
    colour, shape = missing.split(" ")
    near = [x for x in objs if x.colour == colour or x.shape == shape]
    pairs.append(("existence", (f"Is there {with_article(o.name)} in the image?", f"there is {with_article(o.name)}"),
                  (f"Is there {with_article(missing)} in the image?",
                   "there is " + " and ".join(with_article(x.name) for x in near))))

    # count: one number asked about two shapes, one that occurs that many times and one that does not
    # (absent, or another count). The pair differs only in the shape, as colour and existence pairs
    # differ only in the colour or object, so the number asked does not give the answer away (asking one
    # shape about n and n +- 1 did: "Is there exactly one X?" was always "yes", "exactly 4" always "no").
    counts = scene.shape_counts()
    shape = rng.choice(sorted(counts))
    n = counts[shape]
    others = [s for s in SHAPES if counts.get(s, 0) != n]
    if others:
        other = rng.choice(others)
        no = (_count_question(n, other), _count_reason(counts.get(other, 0), other))
    else:  # every shape occurs n times (a crowded scene): one more than there is
        no = (_count_question(n + 1, shape), _count_reason(n, shape))
    pairs.append(("count", (_count_question(n, shape), _count_reason(n, shape)), no))

    # position: the object's cell vs another cell.
    o = rng.choice(objs)
    reason = f"it is {CELL_PHRASES[o.position]}"
    pairs.append(("position", (f"Is the {o.name} {CELL_PHRASES[o.position]}?", reason),
                  (f"Is the {o.name} {CELL_PHRASES[_other_cell(o, rng)]}?", reason)))

    # colour: the object in a cell is asked about with its colour vs another colour.
    o = rng.choice(objs)
    other = rng.choice([c for c in COLOURS if c != o.colour])
    where = CELL_PHRASES[o.position]
    reason = f"it is {o.colour}"
    pairs.append(("colour", (f"Is the {o.shape} {where} {o.colour}?", reason), (f"Is the {o.shape} {where} {other}?", reason)))

    # OCR: the word an object carries vs a word that appears nowhere in the image.
    carriers = [o for o in objs if o.text]
    if carriers:
        o = rng.choice(carriers)
        used = {x.text for x in carriers}
        wrong_word = rng.choice([w for w in WORDS if w not in used])
        reason = f'it says "{o.text}"'
        pairs.append(("ocr", (f'Is the word "{o.text}" written on the {o.name}?', reason),
                      (f'Is the word "{wrong_word}" written on the {o.name}?', reason)))
    return pairs


def _count_question(n: int, shape: str) -> str:
    return f"Is there exactly one {shape} in the image?" if n == 1 else f"Are there exactly {n} {_plural(shape)} in the image?"


def _count_reason(n: int, shape: str) -> str:
    return {0: f"there is no {shape}", 1: f"there is one {shape}"}.get(n, f"there are {n} {_plural(shape)}")


def _multiple_choice(scene: Scene, rng: random.Random) -> list[tuple[str, str, str, list[str]]]:
    objs = scene.objects
    out = []
    o = rng.choice(objs)
    out.append(("colour", f"What colour is the {o.shape} {CELL_PHRASES[o.position]}?", o.colour,
                [c for c in COLOURS if c != o.colour]))
    o = rng.choice(objs)
    out.append(("shape", f"Which shape is {CELL_PHRASES[o.position]}?", o.shape,
                [s for s in SHAPES if s != o.shape]))
    o = rng.choice(objs)
    out.append(("position", f"Where is the {o.name}?", o.position, [p for p in POSITIONS if p != o.position]))
    n = len(objs)
    out.append(("count", "How many objects are in the image?", str(n),
                [str(m) for m in range(1, 10) if m != n]))
    carriers = [o for o in objs if o.text]
    if carriers:
        o = rng.choice(carriers)
        out.append(("ocr", f"Which word is written on the {o.name}?", o.text, [w for w in WORDS if w != o.text]))
    out.append(("style", "Which style best describes the image?", scene.style,
                [s for s in STYLES if s != scene.style]))
    return out


def _short_answers(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    objs = scene.objects
    counts = scene.shape_counts()
    out = []
    o = rng.choice(objs)
    # "the square" only when there is one square; otherwise pin it down by cell.
    ref = f"the {o.shape}" if counts[o.shape] == 1 else f"the {o.shape} {CELL_PHRASES[o.position]}"
    out.append(("colour", f"What colour is {ref}?", o.colour))
    out.append(("count", "How many objects are there?", str(len(objs))))
    shape = rng.choice(SHAPES)  # absent shapes too: "0" is an exact answer
    out.append(("count", f"How many {_plural(shape)} are there?", str(counts.get(shape, 0))))
    o = rng.choice(objs)
    out.append(("shape", f"What shape is {CELL_PHRASES[o.position]}?", o.shape))
    o = rng.choice(objs)
    out.append(("position", f"Where is the {o.name}?", o.position))
    carriers = [o for o in objs if o.text]
    if carriers:
        o = rng.choice(carriers)
        out.append(("ocr", f"What word is written on the {o.name}?", o.text))
    out.append(("background", "What is the background colour?", scene.background))
    return out

"""Captions from a scene graph: brief (COCO-like) and detailed (ShareGPT4V-like).

The detailed caption states every fact in `scene_facts(scene)` in varied natural English;
`extract_facts` is written to read exactly this kind of English back.
"""

from __future__ import annotations

import random

from sharegpt4v.world.scene import Scene, WorldObject
from sharegpt4v.world.vocab import NUMBER_WORDS

SIZE_WORDS = {"large": ("large", "big"), "small": ("small", "little")}

# Ways to say each grid cell (all understood by the fact extractor).
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "in the upper left corner", "at the top left",
                 "in the top-left corner", "in the upper-left area"),
    "top": ("at the top", "at the top center", "in the top middle", "in the middle of the top row",
            "along the top edge"),
    "top right": ("in the top right corner", "in the upper right corner", "at the top right",
                  "in the top-right corner", "in the upper-right area"),
    "left": ("on the left", "on the left side", "at the middle left", "in the middle of the left side",
             "along the left edge"),
    "center": ("in the center", "in the middle", "at the very center", "in the centre",
               "in the middle of the image"),
    "right": ("on the right", "on the right side", "at the middle right", "in the middle of the right side",
              "along the right edge"),
    "bottom left": ("in the bottom left corner", "in the lower left corner", "at the bottom left",
                    "in the bottom-left corner", "in the lower-left area"),
    "bottom": ("at the bottom", "at the bottom center", "in the bottom middle",
               "in the middle of the bottom row", "along the bottom edge"),
    "bottom right": ("in the bottom right corner", "in the lower right corner", "at the bottom right",
                     "in the bottom-right corner", "in the lower-right area"),
}

STYLE_NOUNS: dict[str, tuple[str, ...]] = {
    "photo": ("a photograph", "a photo", "a photographic snapshot"),
    "poster": ("a poster", "a poster-like graphic", "a simple poster design"),
    "watercolor": ("a watercolor painting", "a watercolour picture", "a soft watercolor"),
    "pixel art": ("pixel art", "a pixel art illustration", "a pixelated picture"),
    "sketch": ("a sketch", "a simple sketch", "a sketched drawing"),
    "pop art": ("a pop art print", "a pop-art composition", "a bold pop art picture"),
}
# Why the style is what it is; never uses the word "background" (kept for the background sentence).
STYLE_DETAILS: dict[str, tuple[str, ...]] = {
    "photo": ("with soft shading and slight shadows", "with gentle lighting and faint shadows under the shapes",
              "where each shape casts a soft shadow"),
    "poster": ("with flat colours and bold printed words", "with clean, flat shapes and legible lettering",
               "made of flat shapes and short words"),
    "watercolor": ("with soft blurred edges on textured paper", "with diluted colours that bleed softly",
                   "with washed-out tones and grainy paper"),
    "pixel art": ("built from chunky square pixels", "with a blocky, retro look",
                  "where every edge is a staircase of pixels"),
    "sketch": ("with each shape drawn only as a coloured outline", "where the shapes are outlined but not filled",
               "drawn with thin coloured lines"),
    "pop art": ("with saturated colours and thick black outlines", "with bold colours framed by heavy black outlines",
                "with punchy colours and strong dark contours"),
}

_PLACE_VERBS = ("sits", "is placed", "is located", "appears", "can be seen", "rests", "is positioned", "stands")
_FRONT_VERBS = ("sits", "rests", "lies", "there is", "we find")
_REL_VERBS = ("is", "sits", "lies", "is placed", "is located", "can be found")
_ADVERBS = ("", "", "directly ", "just ", "immediately ")
_REL_PHRASES = {
    "left of": ("to the left of", "left of", "on the left side of"),
    "right of": ("to the right of", "right of", "on the right side of"),
    "above": ("above",),
    "below": ("below", "beneath", "under", "underneath"),
}
_INVERSE = {"left of": "right of", "above": "below"}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _number(n: int, rng: random.Random) -> str:
    return str(n) if rng.random() < 0.1 or n >= len(NUMBER_WORDS) else NUMBER_WORDS[n]


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _join(items: list[str], rng: random.Random) -> str:
    if len(items) == 1:
        return items[0]
    comma = "," if rng.random() < 0.3 and len(items) > 2 else ""
    return ", ".join(items[:-1]) + f"{comma} and {items[-1]}"


def _np(obj: WorldObject, rng: random.Random, article: str, size: bool = True) -> str:
    """'a large red circle' / 'the red circle'."""
    words = [article] if article else []
    if size:
        words.append(rng.choice(SIZE_WORDS[obj.size]))
    words += [obj.colour, obj.shape]
    return " ".join(words)


def _ref(obj: WorldObject, rng: random.Random) -> str:
    """A definite reference to an already introduced object; sometimes repeats its size."""
    return _np(obj, rng, "the", size=rng.random() < 0.25)


# --- brief ----------------------------------------------------------------------------------


def brief_caption(scene: Scene, rng: random.Random) -> str:
    """One short COCO-like sentence: <= 2 objects, rarely with attributes, no positions or text."""
    picked = rng.sample(scene.objects, min(len(scene.objects), rng.choice((1, 1, 2))))

    def np(obj: WorldObject) -> str:
        roll = rng.random()
        words = [obj.shape] if roll < 0.45 else [obj.colour, obj.shape]
        if rng.random() < 0.1:
            words.insert(0, rng.choice(SIZE_WORDS[obj.size]))
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)

    things = " and ".join(np(o) for o in picked)
    bg = f"on a {scene.background} background" if rng.random() < 0.5 else "on a plain surface" if rng.random() < 0.2 else ""
    n = len(scene.objects)
    options = [
        f"{_cap(things)} {bg}".strip(),
        f"Some shapes {bg or 'in a picture'}",
        f"A few shapes, including {things}",
        f"A picture of {things}",
        f"Colourful shapes {bg or 'on display'}",
        f"{_cap(things)} in an image",
    ]
    if len(picked) == 2:
        options.append(f"{_cap(things)} next to each other")
    if n <= 3:
        options.append(f"{_cap(NUMBER_WORDS[n])} {'shape' if n == 1 else 'shapes'} {bg or 'in a picture'}")
    if scene.source == "text":
        options.append(f"A poster with {things}")
    return rng.choice(options).strip() + "."


# --- detailed -------------------------------------------------------------------------------


def adjacent_relations(scene: Scene) -> list[tuple[WorldObject, str, WorldObject]]:
    """(a, 'left of' | 'above', b) for every pair of objects in edge-adjacent cells."""
    out = []
    for a in scene.objects:
        for b in scene.objects:
            if a.row == b.row and b.col == a.col + 1:
                out.append((a, "left of", b))
            elif a.col == b.col and b.row == a.row + 1:
                out.append((a, "above", b))
    return out


def _style_sentence(scene: Scene, rng: random.Random, closing: bool) -> str:
    noun = rng.choice(STYLE_NOUNS[scene.style])
    detail = rng.choice(STYLE_DETAILS[scene.style])
    if closing:
        return rng.choice((
            f"Overall, the image looks like {noun}, {detail}.",
            f"All in all, the style is that of {noun}, {detail}.",
            f"The whole scene has the feel of {noun}, {detail}.",
        ))
    return rng.choice((
        f"The image appears to be {noun}, {detail}.",
        f"This is {noun} {detail}.",
        f"At first glance, this is {noun}, {detail}.",
        f"What we see here is {noun}, {detail}.",
        f"The picture looks like {noun}, {detail}.",
        f"Rendered as {noun}, {detail}, the image shows a small arrangement of geometric shapes.",
    ))


def _count_sentence(scene: Scene, rng: random.Random) -> str:
    counts = scene.shape_counts()
    shapes = list(counts)
    rng.shuffle(shapes)
    items = []
    for s in shapes:
        k = counts[s]
        if k == 1:
            items.append(rng.choice((f"one {s}", f"a single {s}", f"just one {s}")))
        else:
            items.append(f"{_number(k, rng)} {_plural(s)}")
    listing = _join(items, rng)
    n = len(scene.objects)
    if n == 1:
        return rng.choice((
            f"There is only one object in the image, {listing}.",
            f"The image contains a single object: {listing}.",
            f"Just one object can be seen, namely {listing}.",
        ))
    num = _number(n, rng)
    return rng.choice((
        f"There are {num} objects in the image: {listing}.",
        f"The image contains {num} shapes in total: {listing}.",
        f"In total, {num} objects can be seen, namely {listing}.",
        f"Altogether there are {num} shapes, made up of {listing}.",
        f"{_cap(num)} shapes are visible: {listing}.",
        f"The scene holds {num} objects, {listing}.",
    ))


def _background_sentence(scene: Scene, rng: random.Random) -> str:
    c, t = scene.background, scene.texture
    adj = {  # "{adj} background"
        "plain": (f"plain {c}", f"flat {c}", f"uniform {c}"),
        "gradient": (f"{c} gradient",),
        "stripes": (f"striped {c}",),
        "dots": (f"dotted {c}", f"polka-dot {c}"),
        "noise": (f"noisy {c}", f"grainy {c}", f"speckled {c}"),
    }[t]
    with_ = {  # "{c} background {with_}"
        "plain": ("that is completely plain", "that is plain and uniform"),
        "gradient": ("with a soft gradient", "that fades in a gentle gradient"),
        "stripes": ("with thin stripes", "covered in stripes"),
        "dots": ("with a pattern of small dots", "sprinkled with dots"),
        "noise": ("with grainy noise", "speckled with noise"),
    }[t]
    pred = {  # "the {c} background is {pred}"
        "plain": ("completely plain", "flat and uniform"),
        "gradient": ("shaded with a soft gradient",),
        "stripes": ("covered in stripes", "striped"),
        "dots": ("sprinkled with dots", "dotted all over"),
        "noise": ("grainy with noise", "speckled with noise"),
    }[t]
    return rng.choice((
        f"The background is {rng.choice(adj)}.",
        f"Everything is set against a {rng.choice(adj)} background.",
        f"The shapes sit on a {c} background {rng.choice(with_)}.",
        f"Behind the shapes, the {c} background is {rng.choice(pred)}.",
        f"The backdrop is a {rng.choice(adj)} surface.",
    ))


def _text_fragment(obj: WorldObject, rng: random.Random) -> str:
    w = obj.text
    return rng.choice((f' bearing the word "{w}"', f', labelled "{w}",', f' with the word "{w}" written on it',
                       f' marked with the word "{w}"'))


def _text_sentence(obj: WorldObject, rng: random.Random) -> str:
    w, n = obj.text, _ref(obj, rng)
    return rng.choice((
        f'The word "{w}" is written on {n}.',
        f'{_cap(n)} carries the word "{w}".',
        f'A label reading "{w}" appears on {n}.',
        f'On {n}, the word "{w}" can be read.',
        f'{_cap(n)} is labelled with the word "{w}".',
        f'Printed on {n} is the word "{w}".',
    ))


def _relation_clause(subject_rel: str, other: WorldObject, rng: random.Random) -> str:
    return f"{rng.choice(_ADVERBS)}{rng.choice(_REL_PHRASES[subject_rel])} {_ref(other, rng)}"


def detailed_caption(scene: Scene, rng: random.Random) -> str:
    """A paragraph stating every fact of `scene_facts(scene)`, phrased and ordered by `rng`."""
    objects = list(scene.objects)
    if rng.random() < 0.5:
        rng.shuffle(objects)
    # Each adjacent pair is stated once, from either side: (subject, relation, other).
    pending: list[tuple[WorldObject, str, WorldObject]] = []
    for a, rel, b in adjacent_relations(scene):
        pending.append((a, rel, b) if rng.random() < 0.5 else (b, _INVERSE[rel], a))
    rng.shuffle(pending)

    object_sentences: list[str] = []
    text_later: list[WorldObject] = []
    introduced: set[str] = set()
    i = 0
    while i < len(objects):
        obj = objects[i]
        pair = i + 1 < len(objects) and rng.random() < 0.35
        if pair:
            other = objects[i + 1]
            first = _placed(obj, rng, text_later)
            second = _placed(other, rng, text_later)
            joiner = rng.choice((", while ", ", and ", "; "))
            object_sentences.append(_cap(first) + joiner + second + ".")
            introduced |= {obj.name, other.name}
            i += 2
            continue
        sentence = _single_object_sentence(obj, rng, text_later)
        introduced.add(obj.name)
        # Sometimes hang a relation to an object already introduced onto this sentence.
        for rel in pending:
            subject, relation, other = rel
            if subject is obj and other.name in introduced and rng.random() < 0.5:
                sentence = sentence[:-1] + ", " + _relation_clause(relation, other, rng) + "."
                pending.remove(rel)
                break
        object_sentences.append(sentence)
        i += 1

    relation_sentences = _relation_sentences(pending, rng)
    text_sentences = [_text_sentence(o, rng) for o in text_later]
    style_open = rng.random() < 0.6
    style = [_style_sentence(scene, rng, closing=not style_open)]
    count = [_count_sentence(scene, rng)]
    background = [_background_sentence(scene, rng)]
    body = object_sentences + (relation_sentences + text_sentences if rng.random() < 0.5
                               else text_sentences + relation_sentences)
    if style_open:
        parts = rng.choice((style + count + body + background, style + background + count + body,
                            style + count + background + body))
    else:
        parts = rng.choice((count + body + background + style, background + count + body + style,
                            count + background + body + style))
    return " ".join(parts)


def _placed(obj: WorldObject, rng: random.Random, text_later: list[WorldObject]) -> str:
    """'a large red circle sits in the top left corner' (no capital, no full stop)."""
    text = ""
    if obj.text:
        if rng.random() < 0.5:
            text = _text_fragment(obj, rng)
        else:
            text_later.append(obj)
    pos = rng.choice(POSITION_PHRASES[obj.position])
    if text.endswith(","):
        return f"{_np(obj, rng, 'a')}{text} {rng.choice(_PLACE_VERBS)} {pos}"
    return rng.choice((
        f"{_np(obj, rng, 'a')}{text} {rng.choice(_PLACE_VERBS)} {pos}",
        f"there is {_np(obj, rng, 'a')}{text} {pos}",
    ))


def _single_object_sentence(obj: WorldObject, rng: random.Random, text_later: list[WorldObject]) -> str:
    roll = rng.random()
    if roll < 0.45:
        return _cap(_placed(obj, rng, text_later)) + "."
    text = ""
    if obj.text:
        if rng.random() < 0.5:
            text = _text_fragment(obj, rng).rstrip(",")
        else:
            text_later.append(obj)
    pos = rng.choice(POSITION_PHRASES[obj.position])
    occupied = pos.split(" ", 1)[1]  # "the top left corner"
    return rng.choice((
        f"{_cap(pos)}, there is {_np(obj, rng, 'a')}{text}.",
        f"{_cap(pos)} {rng.choice(_FRONT_VERBS)} {_np(obj, rng, 'a')}{text}.",
        f"{_cap(_np(obj, rng, 'the'))}{text} occupies {occupied}.",
        f"{_cap(pos)}, you can see {_np(obj, rng, 'a')}{text}.",
    ))


def _relation_sentences(pending: list[tuple[WorldObject, str, WorldObject]], rng: random.Random) -> list[str]:
    out = []
    pending = list(pending)
    while pending:
        subject, rel, other = pending.pop(0)
        # Two relations of one subject can share a sentence.
        twin = next((r for r in pending if r[0] is subject), None)
        if twin is not None and rng.random() < 0.5:
            pending.remove(twin)
            out.append(f"{_cap(_ref(subject, rng))} {rng.choice(_REL_VERBS)} "
                       f"{_relation_clause(rel, other, rng)} and {_relation_clause(twin[1], twin[2], rng)}.")
        elif rng.random() < 0.3:  # inverted: "Just below the red circle is the blue square."
            out.append(f"{_cap(_relation_clause(rel, other, rng))} {rng.choice(('is', 'sits', 'lies'))} "
                       f"{_ref(subject, rng)}.")
        else:
            out.append(f"{_cap(_ref(subject, rng))} {rng.choice(_REL_VERBS)} {_relation_clause(rel, other, rng)}.")
    return out

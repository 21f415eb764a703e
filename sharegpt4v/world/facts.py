"""Canonical facts about a scene, a rule-based reader that pulls them out of captions, and scores.

Fact strings (the unit of caption recall and hallucination):

    object|red|circle              size|red|circle|large          position|red|circle|top left
    count|circle|2                 count|all|3                    relation|red circle|left of|blue square
    text|red circle|SALE           background|white               texture|stripes          style|watercolor

Relations are stored in canonical direction ("left of", "above"); the reader turns "right of",
"below", "beneath", ... around.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from sharegpt4v.world.language import adjacent_relations
from sharegpt4v.world.scene import Scene
from sharegpt4v.world.vocab import NUMBER_WORDS, POSITIONS, STYLES, WORDS

FACT_KINDS = ("object", "size", "position", "count", "relation", "text", "background", "texture", "style")
# Attribute kinds, read off the object mentions: is each object's colour (shape) named at all, bound to the
# right shape (colour) or not? They show what a captioner sees before it binds attributes to objects. They
# are reported beside the fact kinds, not counted in the overall recall and false facts (those would count
# every wrong object twice).
ATTRIBUTE_KINDS = ("colour", "shape")
SCORED_KINDS = ("object", "colour", "shape", "size", "position", "count", "relation", "text", "background",
                "texture", "style")


def attribute_facts(facts: set[str]) -> set[str]:
    """`colour|red` and `shape|circle` for every object fact in `facts`."""
    out = set()
    for fact in facts:
        if fact.startswith("object|"):
            _, colour, shape = fact.split("|")
            out |= {f"colour|{colour}", f"shape|{shape}"}
    return out


def scene_facts(scene: Scene) -> set[str]:
    """Everything a complete caption states (relations only between edge-adjacent cells)."""
    facts = {f"background|{scene.background}", f"texture|{scene.texture}", f"style|{scene.style}",
             f"count|all|{len(scene.objects)}"}
    facts |= {f"count|{shape}|{n}" for shape, n in scene.shape_counts().items()}
    for o in scene.objects:
        facts |= {f"object|{o.colour}|{o.shape}", f"size|{o.colour}|{o.shape}|{o.size}",
                  f"position|{o.colour}|{o.shape}|{o.position}"}
        if o.text:
            facts.add(f"text|{o.name}|{o.text}")
    facts |= {f"relation|{a.name}|{rel}|{b.name}" for a, rel, b in adjacent_relations(scene)}
    return facts


def is_true(scene: Scene, fact: str) -> bool:
    """Whether `fact` holds in `scene` (any true statement, not only the required ones)."""
    parts = fact.split("|")
    kind, args = parts[0], parts[1:]
    if kind == "object" and len(args) == 2:
        return scene.object_named(f"{args[0]} {args[1]}") is not None
    if kind == "size" and len(args) == 3:
        o = scene.object_named(f"{args[0]} {args[1]}")
        return o is not None and o.size == args[2]
    if kind == "position" and len(args) == 3:
        o = scene.object_named(f"{args[0]} {args[1]}")
        return o is not None and o.position == args[2]
    if kind == "count" and len(args) == 2:
        if not args[1].isdigit():
            return False
        n = len(scene.objects) if args[0] == "all" else scene.shape_counts().get(args[0], 0)
        return n == int(args[1])
    if kind == "relation" and len(args) == 3:
        a, b = scene.object_named(args[0]), scene.object_named(args[2])
        if a is None or b is None or a is b:
            return False
        # Lenient on purpose: "left of" holds for any column order (diagonals too), like everyday English.
        return {"left of": a.col < b.col, "right of": a.col > b.col,
                "above": a.row < b.row, "below": a.row > b.row}.get(args[1], False)
    if kind == "text" and len(args) == 2:
        o = scene.object_named(args[0])
        return o is not None and o.text == args[1]
    if kind == "background" and len(args) == 1:
        return scene.background == args[0]
    if kind == "texture" and len(args) == 1:
        return scene.texture == args[0]
    if kind == "style" and len(args) == 1:
        return scene.style == args[0]
    return False


@dataclass
class CaptionScore:
    recall: float  # |stated ∩ required| / |required|
    hallucinated: int  # stated facts that are false in the scene
    stated: int
    missing: list[str] = field(default_factory=list)
    false: list[str] = field(default_factory=list)
    recall_by_kind: dict[str, float] = field(default_factory=dict)  # every kind of SCORED_KINDS the scene has
    false_by_kind: dict[str, int] = field(default_factory=dict)  # false statements per kind of SCORED_KINDS


def score_caption(caption: str, scene: Scene) -> CaptionScore:
    stated = extract_facts(caption)
    required = scene_facts(scene)
    false = sorted(f for f in stated if not is_true(scene, f))
    stated_all, required_all = stated | attribute_facts(stated), required | attribute_facts(required)
    by_kind: dict[str, float] = {}
    false_by_kind: dict[str, int] = {}
    for kind in SCORED_KINDS:
        need = {f for f in required_all if f.startswith(kind + "|")}
        if need:
            by_kind[kind] = len(need & stated_all) / len(need)
        false_by_kind[kind] = sum(1 for f in stated_all - required_all if f.startswith(kind + "|")
                                  and (kind in ATTRIBUTE_KINDS or not is_true(scene, f)))
    return CaptionScore(
        recall=len(stated & required) / len(required), hallucinated=len(false), stated=len(stated),
        missing=sorted(required - stated), false=false, recall_by_kind=by_kind, false_by_kind=false_by_kind,
    )


# --- the reader -----------------------------------------------------------------------------

_COLOUR_SYN = {"red": "red", "orange": "orange", "yellow": "yellow", "green": "green", "blue": "blue",
               "purple": "purple", "violet": "purple", "pink": "pink", "brown": "brown"}
_SHAPE_SYN = {"circle": "circle", "disc": "circle", "disk": "circle", "square": "square",
              "triangle": "triangle", "diamond": "diamond", "rhombus": "diamond", "star": "star",
              "cross": "cross"}
_SIZE_SYN = {"large": "large", "big": "large", "small": "small", "little": "small", "tiny": "small"}
_BG_SYN = {"white": "white", "gray": "gray", "grey": "gray", "black": "black", "beige": "beige",
           "cream": "beige"}
_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)} | {"eleven": 11, "twelve": 12}

_alt = "|".join
_MENTION = re.compile(
    rf"\b(?:(?P<size>{_alt(_SIZE_SYN)})(?:\s*,\s*|\s+))?(?P<colour>{_alt(_COLOUR_SYN)})(?:\s*-\s*|\s+)"
    rf"(?P<shape>{_alt(_SHAPE_SYN)})(?:es|s)?\b",
    re.IGNORECASE,
)
_SIZE_PREDICATE = re.compile(
    rf"\s+(?:is|looks|appears|seems)\s+(?:quite\s+|rather\s+|fairly\s+|relatively\s+|very\s+)?"
    rf"(?P<size>{_alt(_SIZE_SYN)})\b",
    re.IGNORECASE,
)
# A relation word that must be followed directly by an object mention.
_RELATION = re.compile(
    r"\b(?:(?:to|on)\s+the\s+)?(?P<lr>left|right)(?:[\s-]*hand)?(?:\s+side)?\s+of\s+(?:the\s+|a\s+|an\s+)?"
    r"|\b(?P<v>above|below|beneath|under|underneath)\s+(?:the\s+|a\s+|an\s+)?"
    r"|\bon\s+top\s+of\s+(?:the\s+|a\s+|an\s+)?",
    re.IGNORECASE,
)
_PREP = r"\b(?:in|at|on|to|along|near|toward|towards|into|from|occupies|occupying|occupy|fills|filling|fill)\s+(?:the\s+)?(?:very\s+)?(?:far\s+)?"
_POS_ROW = re.compile(_PREP + r"(?:middle|center|centre)\s+of\s+the\s+(?P<v>top|upper|bottom|lower)\s+(?:row|edge|side|part|half)\b", re.IGNORECASE)
_POS_COL = re.compile(_PREP + r"(?:middle|center|centre)\s+of\s+the\s+(?P<h>left|right)(?:[\s-]*hand)?\s+(?:column|side|edge|part|half)\b", re.IGNORECASE)
_POS_CELL = re.compile(
    _PREP + r"(?:(?P<v>top|upper|bottom|lower|middle|center|centre)(?:\s*-\s*|\s+)?(?P<h1>left|right|middle|center|centre)?"
    r"|(?P<h2>left|right))(?:[\s-]*hand)?\b",
    re.IGNORECASE,
)
_IMAGE_NOUN = re.compile(
    r"\s+of\s+(?:the|this)\s+(?:image|picture|frame|canvas|scene|grid|composition|poster|painting|photo|photograph|drawing|sketch)\b",
    re.IGNORECASE,
)
_QUOTED = re.compile(r"[\"“”«»]\s*([A-Za-z]{2,12})\s*[\"“”«»]")
_BARE_WORD = re.compile(rf"\b({_alt(WORDS)})\b")  # case-sensitive: only uppercase counts
_COUNT = re.compile(
    rf"\b(?P<num>{_alt(_NUMBERS)}|\d{{1,2}}|a\s+single|only\s+one|just\s+one|exactly\s+one|no)\s+"
    r"(?:(?:different|distinct|separate|geometric|individual|visible|total)\s+)?"
    rf"(?P<noun>objects?|shapes?|items?|figures?|elements?|forms?|{_alt(_SHAPE_SYN)})(?P<pl>es|s)?\b",
    re.IGNORECASE,
)
_CLAUSE_BREAK = re.compile(r"[,;:()\u2014\u2013]|\s-\s|\b(?:while|whilst|whereas|but|and)\b", re.IGNORECASE)
_RELATIVE = re.compile(r"\s*(?:which|that|who)\b", re.IGNORECASE)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
_TOKEN = re.compile(r"[A-Za-z]+")
_TEXTURE_WORDS = [
    ("gradient", re.compile(r"\bgradients?\b", re.IGNORECASE)),
    ("stripes", re.compile(r"\bstripe[sd]?\b|\bstripy\b|\bstriped\b", re.IGNORECASE)),
    ("dots", re.compile(r"\bdots\b|\bdotted\b|\bpolka\b|\bspotted\b", re.IGNORECASE)),
    ("noise", re.compile(r"\bnois[ye]\b|\bgrainy\b|\bgrain\b|\bspeckled\b|\bspeckles\b", re.IGNORECASE)),
]
_PLAIN_WORDS = {"plain", "flat", "uniform", "solid", "unpatterned"}
_STYLE_PATTERNS = [
    ("photo", re.compile(r"\bphoto(?:graph)?s?\b|\bphotographic\b|\bphoto-?(?:like|realistic)\b|\bsnapshot\b", re.IGNORECASE)),
    ("poster", re.compile(r"\bposters?\b|\bposter-like\b|\bplacard\b|\bbillboard\b|\bflyer\b", re.IGNORECASE)),
    ("watercolor", re.compile(r"\bwater-?colou?r", re.IGNORECASE)),
    ("pixel art", re.compile(r"\bpixel[\s-]*art\b|\bpixell?ated\b|\b8-bit\b", re.IGNORECASE)),
    ("sketch", re.compile(r"\bsketch(?:ed|es|y)?\b|\bline\s+drawing\b|\bpencil\s+drawing\b", re.IGNORECASE)),
    ("pop art", re.compile(r"\bpop[\s-]*art\b|\bcomic[\s-]*book\b", re.IGNORECASE)),
]
assert {s for s, _ in _STYLE_PATTERNS} == set(STYLES)


@dataclass
class _Mention:
    start: int
    end: int
    name: str  # "red circle"
    rel_object: bool = False  # the object of a relation ("... left of [the blue square]")


def extract_facts(caption: str) -> set[str]:
    """The canonical facts a caption states. Never raises; unknown text yields no facts."""
    if not isinstance(caption, str) or not caption:
        return set()
    facts: set[str] = set()
    for sentence in _SENTENCE_BREAK.split(caption):
        if sentence.strip():
            _read_sentence(sentence, facts)
    for style, pattern in _STYLE_PATTERNS:
        if pattern.search(caption):
            facts.add(f"style|{style}")
    return facts


def _read_sentence(s: str, facts: set[str]) -> None:
    spans = [m.span() for m in _CLAUSE_BREAK.finditer(s)]
    breaks = [a for a, _ in spans]

    def clause(pos: int) -> int:
        return bisect.bisect_right(breaks, pos)

    # Objects: "(size)? colour shape(s)?"; size also from "the red circle is large".
    mentions: list[_Mention] = []
    for m in _MENTION.finditer(s):
        colour, shape = _COLOUR_SYN[m["colour"].lower()], _SHAPE_SYN[m["shape"].lower()]
        mentions.append(_Mention(m.start(), m.end(), f"{colour} {shape}"))
        facts.add(f"object|{colour}|{shape}")
        size = m["size"] or (p["size"] if (p := _SIZE_PREDICATE.match(s, m.end())) else None)
        if size:
            facts.add(f"size|{colour}|{shape}|{_SIZE_SYN[size.lower()]}")
    starts = {m.start: m for m in mentions}

    # Relations: the mention right after the relation word is its object; the subject is found below.
    relations: list[tuple[int, int, str, _Mention]] = []  # (start, end, canonical-or-inverse, object)
    for r in _RELATION.finditer(s):
        other = starts.get(r.end())
        if other is None:
            continue
        if r["lr"]:
            rel = "left of" if r["lr"].lower() == "left" else "right of"
        else:
            rel = "above" if (r["v"] or "above").lower() == "above" else "below"
        other.rel_object = True
        relations.append((r.start(), other.end, rel, other))

    free = [m for m in mentions if not m.rel_object]
    free_starts, free_ends = [m.start for m in free], [m.end for m in free]
    all_ends = [m.end for m in mentions]

    def nearest(pos: int, end: int) -> _Mention | None:
        """The mention a phrase at [pos, end) is about: in its clause the preceding one, else the
        following one; otherwise the same in the sentence. Relation objects are skipped, except
        before a relative clause ("... above a blue star, which is in the center")."""
        c = clause(pos)
        clause_start = spans[c - 1][1] if c > 0 else 0
        if _RELATIVE.match(s, clause_start):
            k = bisect.bisect_right(all_ends, clause_start)
            if k:
                return mentions[k - 1]
        k = bisect.bisect_right(free_ends, pos)
        before = free[k - 1] if k else None
        j = bisect.bisect_left(free_starts, end)
        after = free[j] if j < len(free) else None
        if before is not None and clause(before.start) == c:
            return before
        if after is not None and clause(after.start) == c:
            return after
        return before or after

    chars = list(s)
    for start, end, rel, other in relations:
        subject = nearest(start, end)
        chars[start:end] = " " * (end - start)
        if subject is None or subject.name == other.name:
            continue
        a, b = (subject.name, other.name) if rel in ("left of", "above") else (other.name, subject.name)
        canonical = "left of" if rel in ("left of", "right of") else "above"
        facts.add(f"relation|{a}|{canonical}|{b}")
    masked = "".join(chars)

    # Positions, read from the text with relation phrases blanked out.
    for start, end, cell in _positions(masked):
        target = nearest(start, end)
        if target is not None:
            colour, shape = target.name.split(" ")
            facts.add(f"position|{colour}|{shape}|{cell}")

    # Text: quoted words, or known words in capitals, attach to the nearest object.
    words = [(m.start(), m.end(), m[1].upper()) for m in _QUOTED.finditer(s)]
    quoted = {i for a, b, _ in words for i in range(a, b)}
    words += [(m.start(), m.end(), m[1]) for m in _BARE_WORD.finditer(s) if m.start() not in quoted]
    for start, end, word in words:
        target = nearest(start, end)
        if target is not None:
            facts.add(f"text|{target.name}|{word}")

    for m in _COUNT.finditer(s):
        num = re.sub(r"\s+", " ", m["num"].lower())
        n = 0 if num == "no" else 1 if " " in num else _NUMBERS.get(num, None)
        if n is None:
            n = int(num)
        noun = m["noun"].lower()
        if noun.rstrip("s") in ("object", "shape", "item", "figure", "element", "form"):
            facts.add(f"count|all|{n}")
        else:
            facts.add(f"count|{_SHAPE_SYN[noun]}|{n}")

    _read_background(s, facts)


def _positions(text: str) -> list[tuple[int, int, str]]:
    """(start, end, canonical cell) for every position phrase."""
    out: list[tuple[int, int, str]] = []
    taken: list[tuple[int, int]] = []
    for m in _POS_ROW.finditer(text):
        out.append((m.start(), m.end(), "top" if m["v"].lower() in ("top", "upper") else "bottom"))
        taken.append(m.span())
    for m in _POS_COL.finditer(text):
        out.append((m.start(), m.end(), m["h"].lower()))
        taken.append(m.span())
    for m in _POS_CELL.finditer(text):
        if any(a <= m.start() < b for a, b in taken):
            continue
        # "on the left of the square" is a relation to an object we could not name, not a cell.
        rest = text[m.end():]
        if re.match(r"\s+of\b", rest, re.IGNORECASE) and not _IMAGE_NOUN.match(rest):
            continue
        if m[0][:2].lower() == "to" and not _IMAGE_NOUN.match(rest):
            continue  # "to the left" alone is relational; "to the left of the image" is a cell
        v = (m["v"] or "").lower()
        h = (m["h1"] or m["h2"] or "").lower()
        row = "top" if v in ("top", "upper") else "bottom" if v in ("bottom", "lower") else ""
        col = h if h in ("left", "right") else ""
        cell = f"{row} {col}".strip() or "center"
        if cell in POSITIONS:
            out.append((m.start(), m.end(), cell))
    return out


def _read_background(s: str, facts: set[str]) -> None:
    tokens = [(m.start(), m[0].lower()) for m in _TOKEN.finditer(s)]
    anchors = [i for i, (_, t) in enumerate(tokens) if t in ("background", "backdrop", "backgrounds")]
    if not anchors:
        return
    stop = {"on", "of", "in", "with", "against", "and", "at", "over", "behind", "to", "from", "by"}
    for i in anchors:
        # Colour just before ("a plain white background") or after ("the background is light gray").
        colour = None
        for j in range(i - 1, max(-1, i - 5), -1):
            t = tokens[j][1]
            if t in _BG_SYN:
                colour = _BG_SYN[t]
                break
            if t in stop:
                break
        if colour is None and i + 1 < len(tokens) and tokens[i + 1][1] in (
                "is", "looks", "appears", "seems", "remains", "colour", "color", "was"):
            for j in range(i + 1, min(len(tokens), i + 7)):
                t = tokens[j][1]
                if t in _BG_SYN:
                    colour = _BG_SYN[t]
                    break
                if t in stop - {"in"} or t in _COLOUR_SYN:
                    break
        if colour:
            facts.add(f"background|{colour}")
        near = {tokens[j][1] for j in range(max(0, i - 4), min(len(tokens), i + 5))}
        if near & _PLAIN_WORDS:
            facts.add("texture|plain")
    for texture, pattern in _TEXTURE_WORDS:
        if pattern.search(s):
            facts.add(f"texture|{texture}")




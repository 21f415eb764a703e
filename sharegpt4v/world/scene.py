"""Scene graphs: the ground truth every image, caption, question and score is derived from."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from sharegpt4v.config import WorldConfig
from sharegpt4v.world.vocab import (
    ART_STYLES,
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    SOURCE_STYLE,
    SOURCES,
    STYLES,
    TEXTURES,
    WORDS,
    position_name,
)


@dataclass(frozen=True)
class WorldObject:
    """One shape in one grid cell; `text` is the word printed on/under it, if any."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    text: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.colour not in COLOURS or self.size not in SIZES:
            raise ValueError(f"unknown shape/colour/size: {self.shape!r} {self.colour!r} {self.size!r}")
        if not (0 <= self.row < 3 and 0 <= self.col < 3):
            raise ValueError(f"cell ({self.row}, {self.col}) is outside the 3x3 grid")

    @property
    def name(self) -> str:
        """'red circle': unique within a scene, so it names exactly one object."""
        return f"{self.colour} {self.shape}"

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorldObject":
        return cls(
            shape=data["shape"], colour=data["colour"], size=data["size"],
            row=int(data["row"]), col=int(data["col"]), text=data.get("text"),
        )


@dataclass(frozen=True)
class Scene:
    id: str
    source: str
    style: str
    background: str
    texture: str
    objects: tuple[WorldObject, ...]

    def __post_init__(self) -> None:
        if self.source not in SOURCES or self.style not in STYLES:
            raise ValueError(f"unknown source/style: {self.source!r} {self.style!r}")
        if self.background not in BACKGROUNDS or self.texture not in TEXTURES:
            raise ValueError(f"unknown background/texture: {self.background!r} {self.texture!r}")
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        cells = {(o.row, o.col) for o in self.objects}
        names = {o.name for o in self.objects}
        if len(cells) != len(self.objects) or len(names) != len(self.objects):
            raise ValueError("objects must occupy distinct cells and have distinct (colour, shape) pairs")

    def object_named(self, name: str) -> WorldObject | None:
        return next((o for o in self.objects if o.name == name), None)

    def object_at(self, row: int, col: int) -> WorldObject | None:
        return next((o for o in self.objects if o.row == row and o.col == col), None)

    def shape_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.objects:
            counts[o.shape] = counts.get(o.shape, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "source": self.source, "style": self.style,
            "background": self.background, "texture": self.texture,
            "objects": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scene":
        return cls(
            id=data["id"], source=data["source"], style=data["style"],
            background=data["background"], texture=data["texture"],
            objects=tuple(WorldObject.from_dict(o) for o in data["objects"]),
        )


# Which backgrounds/textures each style may use: sketches need a light page, photos a
# textured backdrop, posters a plain-ish one (so their text stays legible).
_STYLE_BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "sketch": ("white", "beige"),
    "watercolor": ("white", "beige", "gray"),
}
_STYLE_TEXTURES: dict[str, tuple[str, ...]] = {
    "photo": ("gradient", "stripes", "dots", "noise"),
    "poster": ("plain", "gradient"),
}


def sample_scene(seed: int, index: int, cfg: WorldConfig) -> Scene:
    """Draw scene `index` of world `seed`; depends on nothing but its arguments."""
    rng = random.Random(f"scene:{seed}:{index}")
    # Fixed source order (not the dict's) so that equal weights give equal scenes.
    sources = [s for s in SOURCES if cfg.sources.get(s, 0) > 0]
    source = rng.choices(sources, weights=[cfg.sources[s] for s in sources])[0]
    style = SOURCE_STYLE.get(source) or rng.choice(ART_STYLES)
    background = rng.choice(_STYLE_BACKGROUNDS.get(style, BACKGROUNDS))
    texture = rng.choice(_STYLE_TEXTURES.get(style, TEXTURES))

    n = rng.randint(cfg.min_objects, cfg.max_objects)
    cells = rng.sample(range(9), n)
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    if source == "text":  # text-rich: 1-3 objects carry a word
        carriers = set(rng.sample(range(n), min(n, rng.randint(1, 3))))
    else:
        carriers = {i for i in range(n) if rng.random() < cfg.text_probability}
    words = iter(rng.sample(WORDS, len(carriers)))  # distinct words: "the word SALE" names one object
    objects = tuple(
        WorldObject(
            shape=shape, colour=colour, size=rng.choice(SIZES), row=cell // 3, col=cell % 3,
            text=next(words) if i in carriers else None,
        )
        for i, (cell, (colour, shape)) in enumerate(zip(cells, pairs))
    )
    # Reading order, so the scene graph reads naturally in metadata.
    objects = tuple(sorted(objects, key=lambda o: (o.row, o.col)))
    return Scene(id=f"w{seed}-{index:07d}", source=source, style=style,
                 background=background, texture=texture, objects=objects)

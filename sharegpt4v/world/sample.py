"""One finished world sample: image bytes plus scene, captions and questions."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

from sharegpt4v.config import WorldConfig
from sharegpt4v.world.language import brief_caption, detailed_caption
from sharegpt4v.world.render import encode_png, render_scene
from sharegpt4v.world.scene import sample_scene
from sharegpt4v.world.vqa import vqa_items

SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True)
class WorldSample:
    id: str
    source: str
    split: str
    image: bytes  # PNG
    width: int
    height: int
    metadata: dict[str, Any]  # {"scene", "brief_caption", "detailed_caption", "vqa"}; JSON-serialisable


def split_of(seed: int, index: int, splits: dict[str, float]) -> str:
    """A split drawn from a hash of (seed, index): stable whatever else is generated."""
    digest = hashlib.blake2b(f"split:{seed}:{index}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    total = 0.0
    names = [s for s in SPLIT_ORDER if splits.get(s, 0) > 0]
    for name in names:
        total += splits[name]
        if u < total:
            return name
    return names[-1]  # rounding: fractions summing to 0.9999999


def make_sample(seed: int, index: int, cfg: WorldConfig) -> WorldSample:
    """Sample `index` of world `seed`. Each part has its own rng, so adding a question type
    or a caption phrasing changes neither the scenes nor the images."""
    scene = sample_scene(seed, index, cfg)
    image = render_scene(scene, cfg.image_size, seed)
    metadata = {
        "scene": scene.to_dict(),
        "brief_caption": brief_caption(scene, random.Random(f"brief:{seed}:{index}")),
        "detailed_caption": detailed_caption(scene, random.Random(f"detailed:{seed}:{index}")),
        "vqa": vqa_items(scene, random.Random(f"vqa:{seed}:{index}")),
    }
    return WorldSample(
        id=scene.id, source=scene.source, split=split_of(seed, index, cfg.splits),
        image=encode_png(image), width=image.width, height=image.height, metadata=metadata,
    )

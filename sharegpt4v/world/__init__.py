"""The synthetic world: procedurally drawn scenes of shapes on a 3x3 grid, with known ground truth.

From a seed it produces images, brief (COCO-like) and detailed (ShareGPT4V-like) captions and
VQA items, and it scores any caption by the facts it states (recall, hallucinations).
"""

from sharegpt4v.world.facts import (
    FACT_KINDS,
    SCORED_KINDS,
    CaptionScore,
    extract_facts,
    is_true,
    scene_facts,
    score_caption,
)
from sharegpt4v.world.language import (
    adjacent_relations,
    brief_caption,
    detailed_caption,
)
from sharegpt4v.world.render import encode_png, render_scene
from sharegpt4v.world.sample import WorldSample, make_sample, split_of
from sharegpt4v.world.scene import Scene, WorldObject, sample_scene
from sharegpt4v.world.vocab import (
    ART_STYLES,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    SOURCES,
    STYLES,
    TEXTURES,
    WORDS,
)
from sharegpt4v.world.vqa import vqa_items

__all__ = [
    "ART_STYLES", "BACKGROUNDS", "COLOURS", "FACT_KINDS", "POSITIONS", "SCORED_KINDS", "SHAPES", "SIZES", "SOURCES",
    "STYLES", "TEXTURES", "WORDS",
    "CaptionScore", "Scene", "WorldObject", "WorldSample",
    "adjacent_relations", "brief_caption", "detailed_caption", "encode_png", "extract_facts", "is_true",
    "make_sample", "render_scene", "sample_scene", "scene_facts", "score_caption", "split_of", "vqa_items",
]

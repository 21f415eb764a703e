"""Scene sampling: determinism, the world's constraints, reachability of every source and style."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from sharegpt4v.config import WorldConfig
from sharegpt4v.world import (
    ART_STYLES,
    POSITIONS,
    STYLES,
    WORDS,
    Scene,
    WorldObject,
    sample_scene,
)


def test_same_seed_and_index_give_the_same_scene(cfg):
    assert sample_scene(3, 17, cfg) == sample_scene(3, 17, cfg)
    assert sample_scene(3, 17, cfg).id == "w3-0000017"


def test_different_seed_or_index_give_different_scenes(cfg):
    base = [sample_scene(0, i, cfg) for i in range(50)]
    other_seed = [sample_scene(1, i, cfg) for i in range(50)]
    assert sum(a.objects != b.objects for a, b in zip(base, other_seed)) > 45
    assert len({s.objects for s in base}) == 50


def test_constraints_hold(scenes, cfg):
    for s in scenes:
        assert cfg.min_objects <= len(s.objects) <= cfg.max_objects
        assert len({(o.row, o.col) for o in s.objects}) == len(s.objects), "one object per cell"
        assert len({(o.colour, o.shape) for o in s.objects}) == len(s.objects), "colour+shape names one object"
        texts = [o.text for o in s.objects if o.text]
        assert len(set(texts)) == len(texts) and set(texts) <= set(WORDS)
        if s.source == "text":
            assert s.style == "poster" and 1 <= len(texts) <= 3
            assert s.texture in ("plain", "gradient")
        elif s.source == "photo":
            assert s.style == "photo" and s.texture != "plain"
        else:
            assert s.style in ART_STYLES
        if s.style == "sketch":
            assert s.background in ("white", "beige")


def test_every_source_style_size_and_cell_is_reachable(scenes):
    assert {s.source for s in scenes} == {"photo", "text", "art"}
    assert {s.style for s in scenes} == set(STYLES)
    assert {o.position for s in scenes for o in s.objects} == set(POSITIONS)
    assert {o.size for s in scenes for o in s.objects} == {"small", "large"}
    assert {len(s.objects) for s in scenes} == set(range(1, 7))


def test_source_weights_are_followed():
    shares = Counter(sample_scene(0, i, WorldConfig()).source for i in range(1000))
    assert 420 < shares["photo"] < 580 and 180 < shares["text"] < 320 and 180 < shares["art"] < 320
    only_art = WorldConfig(sources={"photo": 0, "text": 0, "art": 1})
    assert {sample_scene(0, i, only_art).source for i in range(50)} == {"art"}


def test_text_probability_controls_words_in_photos_and_art():
    none = WorldConfig(sources={"photo": 1.0}, text_probability=0.0)
    always = WorldConfig(sources={"photo": 1.0}, text_probability=1.0)
    assert not any(o.text for i in range(100) for o in sample_scene(0, i, none).objects)
    assert all(o.text for i in range(100) for o in sample_scene(0, i, always).objects)


def test_object_count_limits_from_config():
    cfg = WorldConfig(min_objects=6, max_objects=6)
    assert {len(sample_scene(5, i, cfg).objects) for i in range(30)} == {6}


def test_scene_round_trips_through_json(scenes):
    for s in scenes[:50]:
        assert Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_invalid_scenes_are_rejected():
    red = WorldObject("circle", "red", "large", 0, 0)
    with pytest.raises(ValueError):
        Scene("x", "photo", "photo", "white", "noise", (red, WorldObject("circle", "red", "small", 1, 1)))
    with pytest.raises(ValueError):
        Scene("x", "photo", "photo", "white", "noise", (red, WorldObject("star", "blue", "small", 0, 0)))
    with pytest.raises(ValueError):
        WorldObject("hexagon", "red", "large", 0, 0)

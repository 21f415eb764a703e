"""make_sample: the unit the dataset generator shards; reproducible bit for bit."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter

from PIL import Image

from sharegpt4v.config import WorldConfig
from sharegpt4v.world import Scene, make_sample, sample_scene, split_of


def _digest(seed: int, index: int) -> str:
    s = make_sample(seed, index, WorldConfig())
    return hashlib.sha256(s.image + json.dumps(s.metadata, sort_keys=True).encode() + s.split.encode()).hexdigest()


def test_same_seed_and_index_give_identical_samples():
    a, b = make_sample(4, 9, WorldConfig()), make_sample(4, 9, WorldConfig())
    assert a == b and a.image == b.image


def test_identical_in_a_fresh_process_with_another_hash_seed():
    code = "from tests.world.test_sample import _digest; print(_digest(4, 9))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True)
    assert out.stdout.strip() == _digest(4, 9)


def test_different_seed_gives_different_samples():
    assert make_sample(0, 5, WorldConfig()).image != make_sample(1, 5, WorldConfig()).image
    assert make_sample(0, 5, WorldConfig()).image != make_sample(0, 6, WorldConfig()).image


def test_sample_contents():
    cfg = WorldConfig(image_size=48)
    for i in range(30):
        s = make_sample(2, i, cfg)
        assert s.id == f"w2-{i:07d}" and s.split in ("train", "val", "test")
        image = Image.open(io.BytesIO(s.image))
        assert image.format == "PNG" and image.size == (48, 48) == (s.width, s.height)
        meta = json.loads(json.dumps(s.metadata))
        assert meta == s.metadata and set(meta) == {"scene", "brief_caption", "detailed_caption", "vqa"}
        scene = Scene.from_dict(meta["scene"])
        assert scene == sample_scene(2, i, cfg) and scene.source == s.source
        assert meta["brief_caption"] and len(meta["detailed_caption"]) > len(meta["brief_caption"])
        assert meta["vqa"]


def test_splits_follow_the_configured_fractions():
    splits = Counter(split_of(0, i, {"train": 0.8, "val": 0.1, "test": 0.1}) for i in range(5000))
    assert 3850 < splits["train"] < 4150 and 400 < splits["val"] < 600 and 400 < splits["test"] < 600
    assert {split_of(0, i, {"train": 1.0}) for i in range(100)} == {"train"}
    assert split_of(3, 7, {"train": 0.5, "test": 0.5}) == split_of(3, 7, {"train": 0.5, "test": 0.5})


def test_captions_do_not_change_the_scene_or_image():
    """Scenes and pixels depend only on (seed, index): the caption/VQA rngs are separate."""
    cfg = WorldConfig()
    s = make_sample(8, 3, cfg)
    assert Scene.from_dict(s.metadata["scene"]) == sample_scene(8, 3, cfg)
    assert make_sample(8, 3, WorldConfig(text_probability=0.15, splits={"train": 0.5, "val": 0.5})).image == s.image

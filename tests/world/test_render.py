"""Rendering: exact reproducibility, and pixels that actually show the scene graph."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sharegpt4v.world import Scene, WorldObject, encode_png, render_scene
from sharegpt4v.world.vocab import COLOUR_RGB


def _nearest_object_colour(rgb: np.ndarray) -> str:
    return min(COLOUR_RGB, key=lambda c: float(np.sum((np.array(COLOUR_RGB[c]) - rgb) ** 2)))


def test_image_mode_and_size(scenes):
    for size in (32, 64, 96):
        image = render_scene(scenes[0], size, 0)
        assert image.mode == "RGB" and image.size == (size, size)


def test_png_bytes_are_identical_for_same_scene_and_seed(scenes):
    for s in scenes[:20]:
        assert encode_png(render_scene(s, 64, 5)) == encode_png(render_scene(s, 64, 5))


def test_png_has_no_metadata_and_decodes_to_the_same_pixels(scenes):
    image = render_scene(scenes[1], 64, 0)
    image.info["comment"] = "should not leak"
    data = encode_png(image)
    assert b"tEXt" not in data and b"tIME" not in data
    decoded = Image.open(io.BytesIO(data))
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image))


def test_seed_changes_the_noise_but_not_the_content(scenes):
    photo = next(s for s in scenes if s.style == "photo")
    a = np.asarray(render_scene(photo, 64, 0), dtype=int)
    b = np.asarray(render_scene(photo, 64, 1), dtype=int)
    assert not np.array_equal(a, b)
    assert np.abs(a - b).mean() < 25


def test_centre_of_a_large_objects_cell_has_its_colour(scenes):
    """For photo and poster images the centre pixel of a large object's cell shows its colour,
    also after downscaling to 32 px (objects stay recognisable for the 32 px vision tower)."""
    checked = 0
    for s in scenes:
        if s.source not in ("photo", "text"):
            continue
        image64 = render_scene(s, 64, 0)
        image32 = image64.resize((32, 32), Image.Resampling.BOX)
        for o in s.objects:
            if o.size != "large":
                continue
            for image in (image64, image32):
                n = image.width
                pixel = np.asarray(image, dtype=float)[int((o.row + 0.5) * n / 3), int((o.col + 0.5) * n / 3)]
                assert _nearest_object_colour(pixel) == o.colour, (s.id, o)
                if n == 64:
                    assert np.abs(pixel - np.array(COLOUR_RGB[o.colour])).max() < 60, (s.id, o, pixel)
            checked += 1
    assert checked > 100


def test_sketch_draws_outlines_only():
    obj = WorldObject("square", "blue", "large", 1, 1)
    sketch = Scene("s", "art", "sketch", "white", "plain", (obj,))
    filled = Scene("s", "art", "pop art", "white", "plain", (obj,))
    centre = (32, 32)
    assert np.asarray(render_scene(sketch, 64, 0))[centre].min() > 200  # paper shows through
    assert _nearest_object_colour(np.asarray(render_scene(filled, 64, 0))[centre].astype(float)) == "blue"


def test_text_is_drawn():
    plain = Scene("t", "text", "poster", "gray", "plain", (WorldObject("circle", "red", "large", 1, 1),))
    worded = Scene("t", "text", "poster", "gray", "plain", (WorldObject("circle", "red", "large", 1, 1, "SALE"),))
    a = np.asarray(render_scene(plain, 96, 0), dtype=int)
    b = np.asarray(render_scene(worded, 96, 0), dtype=int)
    label = b[54:64, 32:64]  # bottom strip of the centre cell
    assert (label.min(axis=2) < 60).sum() > 10 and (label.min(axis=2) > 230).sum() > 10  # dark ink on a light plate
    assert np.abs(a - b)[54:64, 32:64].sum() > 0

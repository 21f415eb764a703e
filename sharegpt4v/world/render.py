"""Rendering a scene to pixels: fast, deterministic, recognisable at 32 px.

Everything is drawn at 2x and box-downsampled (cheap antialiasing); text is drawn last at the
final resolution so that it stays as legible as the pixel budget allows.
"""

from __future__ import annotations

import functools
import io
import math
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from sharegpt4v.world.scene import Scene, WorldObject
from sharegpt4v.world.vocab import BACKGROUND_RGB, COLOUR_RGB

SUPERSAMPLE = 2
PNG_COMPRESS_LEVEL = 3  # measured: faster and smaller than 6 on these images
# Half-extent of a shape as a fraction of its cell: large ones fill most of it, small ~half.
_EXTENT = {"large": 0.44, "small": 0.25}
# Objects carrying a word move up and shrink so the label fits in the bottom of the cell.
_TEXT_SHIFT, _TEXT_SCALE, _LABEL_TOP = -0.10, 0.8, 0.70


def render_scene(scene: Scene, size: int, seed: int) -> Image.Image:
    """An RGB `size` x `size` image of `scene`; the same (scene, size, seed) gives the same pixels."""
    rng = np.random.default_rng([seed, zlib.crc32(scene.id.encode())])
    big = size * SUPERSAMPLE
    canvas = _background(scene, big, rng)
    shapes, mask, shadow = _draw_objects(scene, big)
    colour = np.asarray(shapes, dtype=np.float32)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0

    if scene.style == "photo":
        # Soft drop shadow and a light-from-top-left shading ramp within each cell.
        blurred = shadow.filter(ImageFilter.GaussianBlur(big / 80))
        canvas *= 1.0 - 0.35 * np.asarray(blurred, dtype=np.float32)[..., None] / 255.0
        colour *= _cell_ramp(big)[..., None]
    elif scene.style == "watercolor":
        colour = colour * 0.8 + 255 * 0.2  # diluted pigment
    elif scene.style == "pop art":
        colour = (colour - 128) * 1.15 + 128  # extra contrast/saturation; clipped below

    canvas = canvas * (1.0 - alpha) + colour * alpha
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")

    if scene.style == "watercolor":
        image = image.filter(ImageFilter.GaussianBlur(big / 70))
    image = image.reduce(SUPERSAMPLE)

    if scene.style == "pixel art":
        block = max(2, size // 32)
        small = max(1, round(size / block))
        image = image.resize((small, small), Image.Resampling.BOX).resize((size, size), Image.Resampling.NEAREST)
    if scene.style in ("photo", "watercolor"):
        arr = np.asarray(image, dtype=np.float32)
        if scene.style == "photo":  # sensor noise
            arr = arr + rng.normal(0.0, 4.0, (size, size, 1)).astype(np.float32)
        else:  # paper grain: low-frequency brightness variation
            grain = rng.normal(0.0, 1.0, (max(2, size // 8),) * 2).astype(np.float32)
            grain_img = Image.fromarray(grain).resize((size, size), Image.Resampling.BILINEAR)
            arr = arr * (1.0 + 0.05 * np.asarray(grain_img)[..., None])
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")

    _draw_labels(image, scene, size)
    return image


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes with no metadata and a fixed compression level: equal pixels give equal bytes."""
    buf = io.BytesIO()
    clean = Image.frombytes(image.mode, image.size, image.tobytes())  # drops any .info
    clean.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


# --- background -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    return y, x


@functools.lru_cache(maxsize=8)
def _cell_ramp(n: int) -> np.ndarray:
    """Brightness 1.08 at a cell's top-left corner down to 0.90 at its bottom-right."""
    y, x = _grid(n)
    cell = n / 3
    t = ((x % cell) + (y % cell)) / (2 * cell)
    return (1.08 - 0.18 * t).astype(np.float32)


def _background(scene: Scene, n: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(BACKGROUND_RGB[scene.background], dtype=np.float32)
    # The pattern colour: darker on light backgrounds, lighter on dark ones.
    shade = base * 0.72 if base.mean() > 100 else base + 70
    y, x = _grid(n)
    texture = scene.texture
    if texture == "plain":
        t = np.zeros((n, n), np.float32)
    elif texture == "gradient":
        direction = rng.integers(4)
        t = [y, x, (x + y) / 2, (n - x + y) / 2][direction] / n * 0.8
    elif texture == "stripes":
        period = n / rng.choice([6, 8, 10])
        coord = [y, x, x + y][rng.integers(3)]
        t = ((coord // (period / 2)) % 2) * 0.6
    elif texture == "dots":
        period = n / rng.choice([8, 10])
        dy, dx = (y % period) - period / 2, (x % period) - period / 2
        t = (dy * dy + dx * dx < (0.22 * period) ** 2) * 0.8
    else:  # noise
        t = np.zeros((n, n), np.float32)
    canvas = base + (shade - base) * t[..., None]
    if texture == "noise":
        canvas = canvas + rng.normal(0.0, 28.0, (n, n, 1)).astype(np.float32)
    return np.broadcast_to(canvas, (n, n, 3)).astype(np.float32)


# --- objects --------------------------------------------------------------------------------


def object_geometry(obj: WorldObject, n: int) -> tuple[float, float, float]:
    """(centre x, centre y, half-extent) in pixels of an `n`-pixel image."""
    cell = n / 3
    r = _EXTENT[obj.size] * cell
    cx, cy = (obj.col + 0.5) * cell, (obj.row + 0.5) * cell
    if obj.text:
        cy += _TEXT_SHIFT * cell
        r *= _TEXT_SCALE
    return cx, cy, r


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.82 * r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        pts = [(0, -r), (0.95 * r, 0.78 * r), (-0.95 * r, 0.78 * r)]
    elif shape == "diamond":
        pts = [(0, -r), (0.78 * r, 0), (0, r), (-0.78 * r, 0)]
    elif shape == "star":
        pts = [
            ((r if k % 2 == 0 else 0.45 * r) * math.cos(math.radians(-90 + 36 * k)),
             (r if k % 2 == 0 else 0.45 * r) * math.sin(math.radians(-90 + 36 * k)) + 0.08 * r)
            for k in range(10)
        ]
    elif shape == "cross":
        a = 0.32 * r
        pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r),
               (-a, a), (-r, a), (-r, -a), (-a, -a)]
    else:
        raise ValueError(f"no outline for {shape!r}")
    return [(cx + px, cy + py) for px, py in pts]


def _draw_objects(scene: Scene, n: int) -> tuple[Image.Image, Image.Image, Image.Image]:
    """Object colours, their coverage mask, and (photo only) a shifted shadow mask."""
    shapes = Image.new("RGB", (n, n))
    mask = Image.new("L", (n, n))
    shadow = Image.new("L", (n, n))
    draw_c, draw_m, draw_s = ImageDraw.Draw(shapes), ImageDraw.Draw(mask), ImageDraw.Draw(shadow)
    style = scene.style
    offset = n * 0.025
    for obj in scene.objects:
        rgb = COLOUR_RGB[obj.colour]
        cx, cy, r = object_geometry(obj, n)
        # sketch: outline only; pop art: fill plus thick black outline; others: flat fill.
        fill = None if style == "sketch" else rgb
        outline = rgb if style == "sketch" else (0, 0, 0) if style == "pop art" else None
        # Line width follows the object's size so small pop-art shapes keep their fill.
        width = 0 if not outline else max(2, round(n / 32)) if style == "sketch" else max(2, round(r * 0.2))
        if obj.shape == "circle":
            box = [cx - 0.92 * r, cy - 0.92 * r, cx + 0.92 * r, cy + 0.92 * r]
            draw_c.ellipse(box, fill=fill, outline=outline, width=width)
            draw_m.ellipse(box, fill=None if fill is None else 255, outline=255 if outline else None, width=width)
            if style == "photo":
                draw_s.ellipse([v + offset for v in box], fill=255)
        else:
            pts = _outline(obj.shape, cx, cy, r)
            draw_c.polygon(pts, fill=fill, outline=outline, width=width)
            draw_m.polygon(pts, fill=None if fill is None else 255, outline=255 if outline else None, width=width)
            if style == "photo":
                draw_s.polygon([(x + offset, y + offset) for x, y in pts], fill=255)
    return shapes, mask, shadow


# --- text -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


@functools.lru_cache(maxsize=4096)
def _fit_font(word: str, cell: int) -> tuple[int, tuple[int, int, int, int]]:
    """The largest font size whose rendering of `word` fits the label strip of a cell."""
    max_w, max_h = 0.98 * cell, (1 - _LABEL_TOP) * cell + 1
    px = max(5, int(max_h * 1.3))
    while True:
        bbox = _font(px).getbbox(word)
        if (bbox[2] - bbox[0] <= max_w and bbox[3] - bbox[1] <= max_h) or px <= 5:
            return px, bbox
        px -= 1


def _draw_labels(image: Image.Image, scene: Scene, size: int) -> None:
    """A light plate with dark text in the bottom strip of each word-carrying object's cell."""
    cell = size / 3
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        if not obj.text:
            continue
        px, (x0, y0, x1, y1) = _fit_font(obj.text, int(cell))
        w, h = x1 - x0, y1 - y0
        cx = (obj.col + 0.5) * cell
        cy = (obj.row + _LABEL_TOP) * cell + ((1 - _LABEL_TOP) * cell) / 2
        left, top = round(cx - w / 2), round(cy - h / 2)
        draw.rectangle([left - 1, top - 1, left + w, top + h], fill=(250, 250, 245))
        draw.text((left - x0, top - y0), obj.text, font=_font(px), fill=(15, 15, 15))

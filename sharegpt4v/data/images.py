"""Validate and normalise one input image; every way it can be bad becomes a `BadImage` reason.

Good images are kept byte-for-byte when they already are RGB JPEG/PNG in their upright
orientation; anything else (CMYK, 16-bit, palette, grayscale, alpha, EXIF rotation, other
formats) is decoded, converted to 8-bit RGB and re-encoded (JPEG stays JPEG, the rest PNG).
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sharegpt4v.config import IngestConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_EXIF_ORIENTATION = 0x0112


class BadImage(ValueError):
    """An input that cannot become a sample. `reason` is a short code for counting."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class NormalizedImage:
    data: bytes
    ext: str  # "jpg" or "png": the WebDataset extension of the stored bytes
    width: int
    height: int
    sha256: str  # of the stored bytes
    changes: list[str] = field(default_factory=list)  # what normalisation did, e.g. ["cmyk->rgb"]


def normalize_image(data: bytes, limits: IngestConfig) -> NormalizedImage:
    if not data:
        raise BadImage("empty_file", "zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            claimed = re.search(r"\((\d+) pixels\)", str(exc))
            raise BadImage(
                "decompression_bomb",
                f"header claims {claimed.group(1) if claimed else 'too many'} pixels > ingest.max_pixels {limits.max_pixels}",
            ) from None
        except UnidentifiedImageError:
            raise BadImage("not_an_image", "bytes are not a recognised image format") from None
        except Exception as exc:  # Pillow raises many types for garbage headers
            raise BadImage("not_an_image", f"{type(exc).__name__}: {exc}") from None

        width, height = image.size
        if width * height > limits.max_pixels:
            raise BadImage(
                "decompression_bomb", f"{width}x{height} = {width * height} pixels > ingest.max_pixels {limits.max_pixels}"
            )
        if min(width, height) < limits.min_side:
            raise BadImage("too_small", f"{width}x{height} has a side < ingest.min_side {limits.min_side}")
        ratio = max(width, height) / min(width, height)
        if ratio > limits.max_aspect_ratio:
            raise BadImage(
                "aspect_ratio", f"{width}x{height} aspect ratio {ratio:.1f} > ingest.max_aspect_ratio {limits.max_aspect_ratio}"
            )
        source_format = image.format
        try:
            image.load()  # decodes every pixel: truncated or corrupt data fails here
        except Exception as exc:
            raise BadImage("corrupt", f"{source_format or 'image'} data cannot be decoded ({exc})") from None

    changes: list[str] = []
    if getattr(image, "n_frames", 1) > 1:
        changes.append("first-frame")
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation not in (1, None):
        image = ImageOps.exif_transpose(image)
        changes.append(f"exif-orientation-{orientation}")
    if image.mode != "RGB":
        changes.append(f"{image.mode.lower()}->rgb")
        image = _to_rgb(image)

    if not changes and source_format in ("JPEG", "PNG"):
        stored, ext = data, "jpg" if source_format == "JPEG" else "png"
    else:
        buffer = io.BytesIO()
        if source_format == "JPEG":
            image.save(buffer, "JPEG", quality=limits.jpeg_quality)
            ext = "jpg"
        else:
            image.save(buffer, "PNG")
            ext = "png"
        stored = buffer.getvalue()
        if source_format not in ("JPEG", "PNG"):
            changes.append(f"{(source_format or 'unknown').lower()}->png")
    return NormalizedImage(stored, ext, image.width, image.height, hashlib.sha256(stored).hexdigest(), changes)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Pillow clips wide values to 255 on convert(); rescale to 8 bits instead.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become white rather than whatever colour they hide.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")

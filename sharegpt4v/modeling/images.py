"""CLIP image preprocessing (LLaVA-1.5): pad-to-square or resize+centre-crop, then normalise.

Own PIL/numpy code: transformers' `CLIPImageProcessor` needs torchvision in 5.x.
"""

from __future__ import annotations

import io
import warnings
from typing import Literal

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Aspect = Literal["pad", "crop"]


def load_image(data: bytes | Image.Image) -> Image.Image:
    """Decode to RGB; anything that is not a decodable image raises ValueError."""
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    if not isinstance(data, (bytes, bytearray, memoryview)) or not data:
        raise ValueError(f"not an image: expected non-empty bytes, got {type(data).__name__} of length {len(data) if data else 0}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)))
            image.load()
        return image.convert("RGB")
    except Exception as exc:  # Pillow raises many exception types for bad bytes
        raise ValueError(f"not a decodable image ({type(exc).__name__}: {exc})") from None


def expand2square(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: pad the short side symmetrically with `colour`."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new("RGB", (side, side), colour)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def _resize_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def square_image(image: bytes | Image.Image, size: int, aspect: Aspect = "pad") -> Image.Image:
    """Decode and make `size`x`size` RGB: pad to square with the mean colour, or resize and centre-crop."""
    img = load_image(image)
    if aspect == "pad":
        img = expand2square(img, tuple(int(m * 255) for m in CLIP_MEAN))  # type: ignore[arg-type]
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
    elif aspect == "crop":
        img = _resize_crop(img, size)
    else:
        raise ValueError(f"aspect: unknown {aspect!r} (pad or crop)")
    return img


def to_tensor(image: bytes | Image.Image, size: int, aspect: Aspect = "pad") -> torch.Tensor:
    """One image -> float32 `[3, size, size]`, CLIP-normalised."""
    img = square_image(image, size, aspect)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def preprocess(images: list[bytes | Image.Image], size: int, aspect: Aspect = "pad") -> torch.Tensor:
    """A batch `[N, 3, size, size]`; the first undecodable image raises ValueError naming its index."""
    tensors = []
    for i, image in enumerate(images):
        try:
            tensors.append(to_tensor(image, size, aspect))
        except ValueError as exc:
            raise ValueError(f"image {i}: {exc}") from None
    if not tensors:
        return torch.empty(0, 3, size, size)
    return torch.stack(tensors)

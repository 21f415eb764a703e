"""CLIP preprocessing: pad (expand2square) and crop, normalisation, bad bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from sharegpt4v.modeling.images import CLIP_MEAN, CLIP_STD, preprocess
from tests.modeling.fixtures import png, world


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)])


def test_shape_dtype_and_normalisation() -> None:
    out = preprocess([png((32, 32), (255, 255, 255)), world(1)[0].image], 32, "pad")
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out[0, :, 5, 5], _normalised((255, 255, 255)), atol=1e-5)


def test_pad_fills_with_the_mean_colour() -> None:
    out = preprocess([png((64, 32), (255, 0, 0))], 32, "pad")[0]  # wide: padded above and below
    mean_rgb = tuple(int(m * 255) for m in CLIP_MEAN)
    assert torch.allclose(out[:, 0, 16], _normalised(mean_rgb), atol=1e-5)  # top band: padding
    assert torch.allclose(out[:, 16, 16], _normalised((255, 0, 0)), atol=1e-5)  # centre: the image


def test_crop_keeps_the_centre() -> None:
    image = Image.new("RGB", (128, 32), (0, 255, 0))
    image.paste((0, 0, 255), (32, 0, 96, 32))  # blue centre, green at both ends
    out = preprocess([image], 32, "crop")[0]
    assert torch.allclose(out[:, 16, 0], _normalised((0, 0, 255)), atol=1e-5)
    assert torch.allclose(out[:, 16, 31], _normalised((0, 0, 255)), atol=1e-5)


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_matches_hf_llava_image_processor(aspect: str) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    ours = preprocess([image], 32, aspect)  # type: ignore[arg-type]
    hf = LlavaImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_pad=aspect == "pad"
    )(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.allclose(ours, hf, atol=1e-5)


def test_bad_bytes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="image 1: not a decodable image"):
        preprocess([png((8, 8), (0, 0, 0)), b"\x89PNG garbage"], 32, "pad")
    with pytest.raises(ValueError, match="not an image"):
        preprocess([b""], 32, "crop")
    with pytest.raises(ValueError, match="aspect"):
        preprocess([png((8, 8), (0, 0, 0))], 32, "stretch")  # type: ignore[arg-type]

"""normalize_image: each bad kind has its reason; each odd-but-valid kind becomes 8-bit RGB."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sharegpt4v.config import IngestConfig
from sharegpt4v.data.images import BadImage, normalize_image
from tests.data.messy import bad_files, good_files


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_inputs_have_reasons(name: str) -> None:
    data, reason = bad_files()[name]
    with pytest.raises(BadImage) as err:
        normalize_image(data, IngestConfig())
    assert err.value.reason == reason
    assert err.value.detail


@pytest.mark.parametrize("name", sorted(good_files()))
def test_good_inputs_become_rgb(name: str) -> None:
    result = normalize_image(good_files()[name], IngestConfig())
    image = Image.open(io.BytesIO(result.data))
    assert image.mode == "RGB" and image.size == (result.width, result.height)
    assert result.ext in ("jpg", "png")


def test_sixteen_bit_is_rescaled_not_clipped() -> None:
    wide = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "PNG")
    result = normalize_image(buf.getvalue(), IngestConfig())
    pixels = np.asarray(Image.open(io.BytesIO(result.data)))[:, :, 0]
    assert pixels.min() == 0 and pixels.max() == 255
    assert 100 < pixels.mean() < 155  # a ramp, not a white square


def test_rgb_jpeg_bytes_are_kept_as_is() -> None:
    data = good_files()["photos/rgb.jpg"]
    result = normalize_image(data, IngestConfig())
    assert result.data == data and result.changes == []


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    result = normalize_image(buf.getvalue(), IngestConfig())
    assert Image.open(io.BytesIO(result.data)).getpixel((3, 3)) == (255, 255, 255)

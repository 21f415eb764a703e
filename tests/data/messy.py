"""Builders for input data with every kind of bad image (tests make their own data)."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _image(seed: int, size: tuple[int, int] = (48, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR claims `width` x `height` (a decompression bomb header)."""
    data = bytearray(encode(_image(0, (8, 8)), "PNG"))
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])) & 0xFFFFFFFF
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


def good_files() -> dict[str, bytes]:
    """Valid images, several of which need normalising to RGB."""
    files = {
        "photos/rgb.jpg": encode(_image(1), "JPEG", quality=90),
        "photos/rgb.png": encode(_image(2), "PNG"),
        "photos/cmyk.jpg": encode(_image(3).convert("CMYK"), "JPEG"),
        "photos/gray16.png": encode(
            Image.fromarray((np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)), "PNG"
        ),
        "art/palette.png": encode(_image(4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
        "art/rgba.png": encode(_image(5).convert("RGBA"), "PNG"),
        "art/gray.jpg": encode(_image(6).convert("L"), "JPEG"),
        "art/picture.webp": encode(_image(7), "WEBP"),
    }
    rotated = _image(8, (60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: stored 60x20, upright 20x60
    files["photos/exif_rotated.jpg"] = encode(rotated, "JPEG", exif=exif.tobytes())
    # palette with a transparent index
    pal = _image(9).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    files["art/palette_transparent.png"] = encode(pal, "PNG", transparency=0)
    return files


def bad_files() -> dict[str, tuple[bytes, str]]:
    """Invalid images -> the reason code ingestion must report."""
    jpeg = encode(_image(10), "JPEG")
    png = encode(_image(11), "PNG")
    return {
        "photos/empty.jpg": (b"", "empty_file"),
        "photos/truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt"),
        "photos/truncated.png": (png[: len(png) // 2], "corrupt"),
        "photos/not_an_image.png": (b"hello, I am a text file pretending to be a PNG\n" * 10, "not_an_image"),
        "photos/html.jpg": (b"<html><body>404 Not Found</body></html>", "not_an_image"),
        "photos/bomb.png": (png_with_header_size(30000, 30000), "decompression_bomb"),
        "photos/sliver.png": (encode(_image(12, (2000, 40)), "PNG"), "aspect_ratio"),
        "photos/tiny.png": (encode(_image(13, (4, 4)), "PNG"), "too_small"),
    }


def make_messy_folder(root: Path, with_outside_link: bool = True) -> dict[str, str]:
    """Writes good, bad and duplicate files; returns {relative path: expected status/reason}."""
    expected: dict[str, str] = {}
    for rel, data in good_files().items():
        _write(root / rel, data)
        expected[rel] = "ok"
    for rel, (data, reason) in bad_files().items():
        _write(root / rel, data)
        expected[rel] = f"error:{reason}"
    _write(root / "photos/copy_of_rgb.jpg", good_files()["photos/rgb.jpg"])
    expected["photos/copy_of_rgb.jpg"] = "duplicate"
    _write(root / "README.txt", b"not an image, skipped by name\n")
    if with_outside_link:
        outside = root.parent / f"{root.name}-outside.jpg"
        outside.write_bytes(encode(_image(99), "JPEG"))
        os.symlink(outside, root / "photos/escape.jpg")
        expected["photos/escape.jpg"] = "error:unsafe_path"
    return expected


def make_llava_json(root: Path) -> dict[str, str]:
    """A LLaVA conversation JSON next to an image folder; returns {record id: expected}."""
    images = good_files()
    for rel, data in images.items():
        _write(root / "images" / rel, data)
    conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A picture."}]
    records = [
        {"id": "good-1", "image": "photos/rgb.jpg", "conversations": conv},
        {"id": "good-2", "image": "art/palette.png", "conversations": conv},
        {"id": "dup-1", "image": "photos/rgb.jpg", "conversations": conv},
        {"id": "missing", "image": "photos/does_not_exist.jpg", "conversations": conv},
        {"id": "escape", "image": "../../etc/passwd", "conversations": conv},
        {"id": "absolute", "image": "/etc/hostname", "conversations": conv},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "no-conv", "image": "photos/rgb.png"},
    ]
    (root / "llava.json").write_text(json.dumps(records))
    return {
        "good-1": "ok",
        "good-2": "ok",
        "dup-1": "duplicate",
        "missing": "error:missing_file",
        "escape": "error:unsafe_path",
        "absolute": "error:unsafe_path",
        "text-only": "text_only",
        "no-conv": "error:malformed_record",
    }


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_img2dataset_shards(root: Path) -> dict[str, str]:
    """Two img2dataset-style shards (`{key}.jpg`, `.json`, `.txt`), with bad members; returns {id: expected}."""
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    good = good_files()
    bad = bad_files()
    members = [
        ("000000000", "jpg", good["photos/rgb.jpg"], "ok"),
        ("000000001", "png", good["photos/cmyk.jpg"], "ok"),  # wrong extension, still an image
        ("000000002", "jpg", bad["photos/truncated.jpg"][0], "error:corrupt"),
        ("000000003", "jpg", bad["photos/html.jpg"][0], "error:not_an_image"),
        ("000000004", "jpg", good["photos/rgb.jpg"], "duplicate"),
        ("../000000005", "jpg", good["art/palette.png"], "error:unsafe_path"),
        ("000000006", None, b"", "error:missing_image"),
    ]
    expected = {}
    for shard_index, chunk in enumerate((members[:4], members[4:])):
        with tarfile.open(root / f"{shard_index:05d}.tar", "w") as tar:
            for key, ext, data, status in chunk:
                files = {"json": json.dumps({"key": key.split("/")[-1], "url": f"http://example.com/{key}", "caption": f"alt {key}"}).encode(),
                         "txt": f"alt {key}".encode()}
                if ext:
                    files[ext] = data
                for suffix, payload in files.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                expected[key.split("/")[-1]] = status
    (root / "00000_stats.json").write_text("{}")  # img2dataset writes these too
    return expected

"""Stage: generate a synthetic world into image shards (train/val/test) with a manifest.

Sample `i` depends only on (seed, i, world config), so the output is byte-identical for any
number of worker processes, and the manifest holds no paths or times: one seed, one manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import multiprocessing
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from sharegpt4v import storage, tracking
from sharegpt4v.config import WorldConfig
from sharegpt4v.data.shards import ShardWriter, prepare_output, write_manifest
from sharegpt4v.storage import json_bytes
from sharegpt4v.world.sample import SPLIT_ORDER, WorldSample, make_sample

GENERATOR_VERSION = 1


def sample_record(sample: WorldSample) -> dict[str, Any]:
    """The `{key}.json` of a world sample: the shard contract fields plus the ground truth."""
    return {
        "id": sample.id,
        "source": sample.source,
        "split": sample.split,
        "sha256": hashlib.sha256(sample.image).hexdigest(),
        "width": sample.width,
        "height": sample.height,
        **sample.metadata,
    }


def _make(args: tuple[int, int, WorldConfig]) -> WorldSample:
    return make_sample(*args)


def _make_encoded(args: tuple[int, int, WorldConfig]) -> tuple[WorldSample, bytes]:
    """A sample and its encoded `.json`: the encoding is done by the worker, not the writer."""
    sample = make_sample(*args)
    return sample, json_bytes(sample_record(sample))


def iter_world(images: int, seed: int, cfg: WorldConfig, make: Callable[[Any], Any] = _make) -> Iterator[Any]:
    """`make(seed, i, cfg)` for i in 0..images-1, in order, computed by `cfg.workers` processes."""
    jobs = ((seed, i, cfg) for i in range(images))
    if cfg.workers <= 1:
        yield from map(make, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
        yield from pool.imap(make, jobs, chunksize=32)


def generate_world(out: str, images: int, seed: int, cfg: WorldConfig, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    if images < 1:
        raise ValueError("--images must be >= 1")
    store = storage.open_store(out)
    prepare_output(store, overwrite)
    writers = {split: ShardWriter(store, split, cfg.samples_per_shard) for split in SPLIT_ORDER}
    sources: Counter = Counter()
    caption_chars = {"brief_caption": 0, "detailed_caption": 0}
    preview: list[WorldSample] = []
    params = {"seed": seed, "images": images, **{f"world.{k}": v for k, v in dataclasses.asdict(cfg).items()}}
    with tracking.stage_run("world-generate", params, tags={"stage": "world", "output": out}):
        started = time.perf_counter()
        samples = iter_world(images, seed, cfg, make=_make_encoded)
        for sample, record in tqdm(samples, total=images, desc="world", unit="img", disable=not progress):
            writers[sample.split].write(sample.id, {"png": sample.image, "json": record})
            sources[sample.source] += 1
            for name in caption_chars:
                caption_chars[name] += len(sample.metadata[name])
            if len(preview) < 8 and sample.split == "train":
                preview.append(sample)
        shards = [info for split in SPLIT_ORDER for info in writers[split].finish()]
        elapsed = time.perf_counter() - started
        world = {"seed": seed, "images": images, "generator_version": GENERATOR_VERSION, "config": dataclasses.asdict(cfg)}
        world["config"].pop("workers")  # how it was computed does not change what was computed
        manifest = write_manifest(store, shards, [], world=world, sources=dict(sorted(sources.items())))
        tracking.log_metrics(
            {
                "images": images,
                "images_per_s": images / elapsed,
                "shards": len(shards),
                **{f"split.{k}": v for k, v in manifest["splits"].items()},
                **{f"source.{k}": v for k, v in sources.items()},
                **{f"{k}.mean_chars": v / images for k, v in caption_chars.items()},
            }
        )
        tracking.log_image(contact_sheet(preview), "world/preview.png")
    return manifest


def contact_sheet(samples: list[WorldSample], tile: int = 192, columns: int = 4) -> Image.Image:
    """Images with their brief and detailed captions: what a person checks at a glance."""
    font = ImageFont.load_default(size=11)
    text_h = 230
    rows = max(1, (len(samples) + columns - 1) // columns)
    sheet = Image.new("RGB", (columns * (tile + 8), rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, sample in enumerate(samples):
        x, y = (i % columns) * (tile + 8), (i // columns) * (tile + text_h)
        image = Image.open(io.BytesIO(sample.image)).resize((tile, tile), Image.Resampling.NEAREST)
        sheet.paste(image, (x, y))
        text = f"[{sample.source}] brief: {sample.metadata['brief_caption']}\ndetailed: {sample.metadata['detailed_caption']}"
        lines = [w for para in text.split("\n") for w in textwrap.wrap(para, 34)][:17]
        draw.multiline_text((x + 2, y + tile + 4), "\n".join(lines), fill="black", font=font, spacing=1)
    return sheet

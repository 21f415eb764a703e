"""Synthetic-world generation throughput: render only, 1 process, 2 processes, into S3 shards.

Run: .venv/bin/python bench/bench_world.py [--images N]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, timed  # noqa: E402
from sharegpt4v.config import WorldConfig  # noqa: E402
from sharegpt4v.services import local_services  # noqa: E402
from sharegpt4v.world import render_scene, sample_scene  # noqa: E402
from sharegpt4v.world.generate import generate_world, iter_world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    cfg = WorldConfig(image_size=args.image_size)
    n = args.images
    rows = []

    seconds, _ = timed(lambda: [render_scene(sample_scene(0, i, cfg), cfg.image_size, 0) for i in range(n)])
    rows.append({"name": "scene+render only", "images/s": n / seconds, "seconds": seconds})
    seconds, _ = timed(lambda: sum(1 for _ in iter_world(n, 0, cfg)))
    rows.append({"name": "full sample, 1 process", "images/s": n / seconds, "seconds": seconds})
    two = dataclasses.replace(cfg, workers=2)
    seconds, _ = timed(lambda: sum(1 for _ in iter_world(n, 0, two)))
    rows.append({"name": "full sample, 2 processes", "images/s": n / seconds, "seconds": seconds})
    with tempfile.TemporaryDirectory() as tmp, local_services(Path(tmp), buckets=("bench",)):
        seconds, manifest = timed(lambda: generate_world("s3://bench/world", n, 0, two, overwrite=True, progress=False))
        rows.append({"name": "generate -> S3 shards, 2 processes", "images/s": n / seconds, "seconds": seconds})
    mb = sum(s["bytes"] for s in manifest["shards"]) / 1e6
    print(f"world generation: {n} images at {cfg.image_size}px ({mb:.1f} MB of shards), machine cores: 2 expected")
    print_table("Synthetic world generation throughput", rows, baseline="full sample, 1 process", rate_key="images/s")


if __name__ == "__main__":
    main()

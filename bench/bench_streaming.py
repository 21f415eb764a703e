"""Reading a corpus from S3: streamed WebDataset shards vs one object per image (and local files).

Run: .venv/bin/python bench/bench_streaming.py [--images N]
All cases read the same images from the same SeaweedFS server in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, timed  # noqa: E402
from sharegpt4v import storage  # noqa: E402
from sharegpt4v.config import WorldConfig  # noqa: E402
from sharegpt4v.data.shards import iter_samples, open_dataset, sample_image  # noqa: E402
from sharegpt4v.services import local_services  # noqa: E402
from sharegpt4v.world.generate import generate_world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_services(Path(tmp), buckets=("bench",)):
        world = "s3://bench/world"
        generate_world(world, args.images, 0, WorldConfig(workers=2, samples_per_shard=500), progress=False)
        dataset = open_dataset(world)
        loose = storage.open_store("s3://bench/loose")
        local = storage.open_store(str(Path(tmp) / "loose"))
        keys = []
        for sample in dataset.samples():
            ext, data = sample_image(sample)
            key = f"{sample['__key__']}.{ext}"
            loose.put_bytes(key, data)
            local.put_bytes(key, data)
            keys.append(key)
        total_mb = sum(local.size(k) for k in keys) / 1e6
        n = len(keys)

        def stream_shards() -> int:
            return sum(len(sample_image(s)[1]) for s in iter_samples(dataset.shard_uris()))

        def loose_sequential() -> int:
            return sum(len(loose.get_bytes(k)) for k in keys)

        def loose_threads() -> int:
            with ThreadPoolExecutor(8) as pool:
                return sum(pool.map(lambda k: len(loose.get_bytes(k)), keys))

        def local_files() -> int:
            return sum(len(local.get_bytes(k)) for k in keys)

        rows = []
        for name, fn in [
            ("loose objects from S3, 1 thread", loose_sequential),
            ("loose objects from S3, 8 threads", loose_threads),
            ("shards streamed from S3, 1 stream", stream_shards),
            ("loose files on local disk", local_files),
        ]:
            seconds, nbytes = timed(fn, repeats=2)
            rows.append({"name": name, "images/s": n / seconds, "MB/s": nbytes / 1e6 / seconds, "seconds": seconds})
    print(f"corpus: {n} images, {total_mb:.1f} MB of image bytes, {len(dataset.shards)} shards")
    print_table("Reading a corpus from S3", rows, baseline="loose objects from S3, 1 thread", rate_key="images/s")


if __name__ == "__main__":
    main()

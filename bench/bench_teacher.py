"""Teacher client throughput against the synthetic teacher (200 ms per answer): 1 vs 8 in flight.

The synthetic teacher stands in for a paid VLM whose answers take a while; the client's
concurrency is what hides that latency. Run: .venv/bin/python bench/bench_teacher.py [--images N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, timed  # noqa: E402
from sharegpt4v.captioning.records import CaptionRequest  # noqa: E402
from sharegpt4v.captioning.teacher import TeacherClient  # noqa: E402
from sharegpt4v.captioning.teacher_sim import Faults, TeacherSim  # noqa: E402
from sharegpt4v.config import TeacherConfig, WorldConfig  # noqa: E402
from sharegpt4v.data.shards import open_dataset, sample_image, sample_meta  # noqa: E402
from sharegpt4v.world.generate import generate_world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the synthetic teacher takes per answer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = str(Path(tmp) / "world")
        generate_world(uri, images=args.images, seed=0, cfg=WorldConfig(), progress=False)
        requests = []
        for sample in open_dataset(uri).samples():
            meta = sample_meta(sample)
            requests.append(CaptionRequest(meta["id"], sample_image(sample)[1], meta["source"], meta["sha256"]))
        rows = []
        with TeacherSim(world_uri=uri, faults=Faults(latency_s=args.latency)) as sim:
            for concurrency in (1, 8):
                # The client-side rate limit is set out of the way: this measures concurrency alone.
                cfg = TeacherConfig(model="teacher-sim", concurrency=concurrency, requests_per_minute=100_000)
                with TeacherClient(cfg, base_url=sim.url, api_key="bench-key") as client:
                    seconds, results = timed(lambda: client.caption_batch(requests))
                ok = sum(r.status == "ok" for r in results)
                rows.append({"name": f"concurrency {concurrency}", "images/s": len(requests) / seconds,
                             "seconds": seconds, "ok": f"{ok}/{len(requests)}"})
            peak = sim.stats()["max_concurrent"]
    print(f"teacher client: {len(requests)} images, synthetic teacher latency {args.latency * 1000:.0f} ms, "
          f"peak concurrent requests seen by the server: {peak}")
    print_table("Teacher client throughput (synthetic teacher)", rows, baseline="concurrency 1", rate_key="images/s")


if __name__ == "__main__":
    main()

"""Triton serving throughput: dynamic batching vs `max_batch_size` 1, with 16 concurrent clients.

The same tiny captioner (random weights) is exported twice as a Triton repository (KIND_CPU,
one instance): once with dynamic batching (`--max-batch`, `--delay-us` queue delay), once with
`max_batch_size: 1`. Each is served by the real `tritonserver` from the nvidia-pytriton wheel;
`--clients` threads, each with its own gRPC (or HTTP) connection, send `--requests` caption requests in all,
each asking for `--tokens` new tokens. Printed: requests/s, tokens/s, p50/p99 latency, the ratio.

Run: .venv/bin/python bench/bench_triton.py [--requests 64] [--clients 16] [--tokens 32] [--protocol grpc|http]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, run_load, tiny_captioner  # noqa: E402
from sharegpt4v.config import load_recipe  # noqa: E402
from sharegpt4v.modeling.builder import count_parameters, save_model  # noqa: E402
from sharegpt4v.serving import client  # noqa: E402
from sharegpt4v.serving.export import export_model_repository  # noqa: E402
from sharegpt4v.serving.triton import start_triton  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--delay-us", type=int, default=20_000)
    parser.add_argument("--protocol", default="grpc", choices=("grpc", "http"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    base = load_recipe("tiny")
    model, processor, images = tiny_captioner(base.model, args.requests)
    limit = max(args.tokens, base.serving.max_tokens_limit)

    cases = (
        (f"dynamic batching (max_batch_size {args.max_batch}, queue delay {args.delay_us} us)",
         [f"serving.max_batch_size={args.max_batch}", f"serving.max_queue_delay_us={args.delay_us}"]),
        ("max_batch_size 1", ["serving.max_batch_size=1", "serving.max_queue_delay_us=0"]),
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        save_model(model, processor, f"{tmp}/checkpoint")
        for i, (name, overrides) in enumerate(cases):
            recipe = load_recipe("tiny", [*overrides, "serving.streaming=false", f"serving.max_tokens_limit={limit}"])
            repo = f"{tmp}/repo-{i}"
            export_model_repository({"captioner": f"{tmp}/checkpoint"}, repo, recipe, kind="KIND_CPU")
            with start_triton(repo, f"{tmp}/work-{i}") as triton:
                url = triton.grpc_url if args.protocol == "grpc" else triton.http_url

                def call(connection: object, image: bytes, tokens: int = args.tokens, url: str = url) -> int:
                    result = client.caption(url, image, protocol=args.protocol, max_tokens=tokens, client=connection)
                    assert result["text"], result
                    return int(result["completion_tokens"])

                def connect(url: str = url) -> object:
                    return client.connect(url, args.protocol)

                run_load(lambda c, image: call(c, image, 4), connect, images[: args.clients], args.clients)  # warm-up
                rows.append({"name": name, **run_load(call, connect, images, args.clients)})
    print(f"triton: {args.requests} caption requests from {args.clients} concurrent {args.protocol} clients, up to {args.tokens} new "
          f"tokens each, tiny LLaVA ({count_parameters(model) / 1e6:.2f}M params), one KIND_CPU instance; "
          f"cores {os.cpu_count()}, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after "
          "(other processes skew CPU timings)")
    print_table("Triton throughput: dynamic batching vs max_batch_size 1 (CPU)", rows, baseline="max_batch_size 1",
                rate_key="req/s")


if __name__ == "__main__":
    main()

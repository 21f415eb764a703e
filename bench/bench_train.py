"""Training-step throughput: `train_stage` (data streamed from shards, tokenised, logged) vs a bare torch loop.

Same tiny LLaVA (same tokenizer and initial weights), same micro-batches (the trainer's own examples,
encoded once up front for the bare loop), same AdamW, forward + backward + step. The trainer is timed
between its step `--skip` and its last step (from its per-step trace), so model building, the index
pass and the final save are not counted; everything a training step does (reading shards, decoding
images, tokenising, clipping, the schedule, metrics) is.

Run: .venv/bin/python bench/bench_train.py [--steps 40] [--batch 32] [--field detailed_caption]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import print_table  # noqa: E402
from sharegpt4v.config import WorldConfig, load_recipe  # noqa: E402
from sharegpt4v.training.data import Position, StageInputs, build_index, iter_batches  # noqa: E402
from sharegpt4v.training.flops import flops_per_sample, peak_flops  # noqa: E402
from sharegpt4v.training.freezing import apply_freezing  # noqa: E402
from sharegpt4v.training.optimizer import make_optimizer  # noqa: E402
from sharegpt4v.training.trainer import initial_model, train_stage  # noqa: E402
from sharegpt4v.world.generate import generate_world  # noqa: E402


def trainer_rate(recipe, inputs: StageInputs, work: Path, name: str, skip: int, env: dict[str, str]) -> float:
    trace = work / f"trace-{name}"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        train_stage("pretrain", recipe, inputs, str(work / f"out-{name}"), trace=str(trace))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    records = [json.loads(line) for line in (trace / "pretrain-rank0.jsonl").read_text().splitlines()]
    return (len(records) - skip) / (records[-1]["time"] - records[skip - 1]["time"])


def bare_rate(recipe, inputs: StageInputs, steps: int, skip: int) -> tuple[float, float]:
    """The same model, batches and optimizer in the plainest loop: no data work inside the timing.
    Returns (steps/s, mean tokens per sample)."""
    stage = recipe.pretrain
    index = build_index("pretrain", stage, inputs, recipe.seed)
    model, processor = initial_model(recipe, index, None)
    named = [(n, p) for n, p in model.named_parameters() if n in set(apply_freezing(model, stage))]
    optimizer = make_optimizer(named, stage)
    vision = model.config.vision_config
    batches = iter_batches(index, stage, recipe.seed, 0, 1, Position(), stage.micro_batch_size, processor.tokenizer,
                           recipe.model.language.max_length, (vision.image_size // vision.patch_size) ** 2,
                           vision.image_size)
    encoded = [next(batches) for _ in range(steps)]
    tokens_per_sample = sum(b.tokens for b in encoded) / sum(len(b.ids) for b in encoded)
    inputs_list = [b.model_inputs() for b in encoded]
    model.train()
    start = 0.0
    for i, batch in enumerate(inputs_list):
        if i == skip:
            start = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (steps - skip) / (time.perf_counter() - start), tokens_per_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the timing")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--field", default="detailed_caption", choices=["detailed_caption", "brief_caption"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    recipe = load_recipe("tiny", [f"pretrain.max_steps={args.steps}", f"pretrain.global_batch_size={args.batch}",
                                  f"pretrain.micro_batch_size={args.batch}", f"pretrain.caption_field={args.field}",
                                  "pretrain.epochs=100"])
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        generate_world(str(work / "world"), max(400, args.batch * 4), 0, WorldConfig(samples_per_shard=64), progress=False)
        inputs = StageInputs([str(work / "world")])
        rows = []
        bare, tokens = bare_rate(recipe, inputs, args.steps, args.skip)
        # MFU: model FLOPs (sharegpt4v.training.flops, the trainer's own accounting) over a measured CPU matmul peak
        flops_per_step = args.batch * flops_per_sample(recipe, "pretrain", tokens)
        peak, _ = peak_flops(recipe, "cpu")

        def row(name: str, rate: float) -> dict:
            return {"name": name, "steps_per_s": rate, "samples_per_s": rate * args.batch,
                    "mfu_percent": 100 * rate * flops_per_step / peak}

        rows.append(row("bare torch loop", bare))
        for name, env in (("train_stage (torch engine)", {"SHAREGPT4V_TRAIN_ENGINE": "torch"}),
                          ("train_stage (DeepSpeed ZeRO-0)", {"SHAREGPT4V_TRAIN_ENGINE": "deepspeed"})):
            rows.append(row(name, trainer_rate(recipe, inputs, work, name.split()[-1].strip("()").lower(), args.skip,
                                               env)))
    print_table(f"Training steps/s, tiny LLaVA, batch {args.batch} ({args.field}), {torch.get_num_threads()} threads, "
                f"load {load_before:.1f} -> {os.getloadavg()[0]:.1f}; MFU vs a measured matmul peak of "
                f"{peak / 1e9:.1f} GFLOP/s", rows, "bare torch loop", "steps_per_s")


if __name__ == "__main__":
    main()

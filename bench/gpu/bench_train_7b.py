"""GPU: training tokens/s and MFU of the largest LLaVA-1.5 shape that fits one GPU, the platform's
trainer vs a bare torch loop, same model, same micro-batches, in one run. Nothing is downloaded.

The shape is the first of these whose per-GPU plan (`sharegpt4v/training/memory.py`) fits the
GPU's memory: LLaVA-1.5-7B (CLIP ViT-L/14-336 -> MLP -> Llama-7B, vocabulary 32064) with ZeRO-3 +
CPU offload when host memory holds the offloaded states, else Llama widths of ~3B and ~1.3B behind
the same ViT. Random weights in bf16 (a checkpoint folder written once, then loaded by both),
gradient checkpointing, SDPA attention, pretraining (LLM + projector + ViT layers 12-22 train) on
a synthetic 336 px world. The trainer row is `train_stage` (DeepSpeed under ZeRO-3/offload, data
streamed from shards, checkpoint and MLflow work excluded from the timing by its step trace); the
bare row is the plainest loop over the same micro-batches (fused torch AdamW on bf16 weights, no
ZeRO; it is left out, and said so, when it cannot fit one GPU). MFU = model FLOPs
(`sharegpt4v/training/flops.py`) / the GPU's datasheet peak.

Run: python bench/gpu/bench_train_7b.py [--steps 20] [--skip 5] [--micro-batch 4]
     python bench/gpu/bench_train_7b.py --plan     the chosen shape and its memory plan (no GPU needed)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

VISION = {"image_size": 336, "patch_size": 14, "hidden_size": 1024, "num_layers": 24, "num_heads": 16,
          "intermediate_size": 4096, "feature_layer": -2}
LLAMA_7B = {"hidden_size": 4096, "num_layers": 32, "num_heads": 32, "intermediate_size": 11008}
# (name, language shape, ZeRO stage, CPU offload): largest first, the faster plan first. ZeRO-1 on one GPU
# partitions nothing; it runs DeepSpeed's bf16 mixed precision (fp32 master weights), as the plan assumes.
CANDIDATES = [
    ("LLaVA-1.5-7B, ZeRO-1", LLAMA_7B, 1, False),
    ("LLaVA-1.5-7B, ZeRO-3 + CPU offload", LLAMA_7B, 3, True),
    ("Llama-3B width, ZeRO-1", {"hidden_size": 3200, "num_layers": 26, "num_heads": 32, "intermediate_size": 8640}, 1,
     False),
    ("Llama-1.3B width, ZeRO-1", {"hidden_size": 2048, "num_layers": 24, "num_heads": 16, "intermediate_size": 5504}, 1,
     False),
]
VOCAB = 32064


def recipe_for(language: dict, zero: int, offload: bool, micro_batch: int, steps: int, gpu_gib: float):
    from sharegpt4v.config import load_recipe

    overrides = [f"model.vision.{k}={v}" for k, v in VISION.items()]
    overrides += [f"model.language.{k}={v}" for k, v in {**language, "vocab_size": VOCAB, "max_length": 2048}.items()]
    overrides += ["model.language.initializer_range=0.02", "model.image_tokens=576", "compute.device=cuda",
                  "compute.precision=bf16", "compute.tf32=true", f"compute.gpu_memory_gib={gpu_gib}",
                  f"compute.zero_offload={str(offload).lower()}", f"pretrain.zero_stage={zero}",
                  "pretrain.gradient_checkpointing=true", f"pretrain.micro_batch_size={micro_batch}",
                  f"pretrain.global_batch_size={micro_batch}", f"pretrain.max_steps={steps}", "pretrain.epochs=100",
                  "pretrain.vit_unfreeze_from=12", "pretrain.caption_field=detailed_caption", "pretrain.log_every_steps=5",
                  "pretrain.save_every_steps=0"]
    return load_recipe("tiny", overrides)


def host_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def choose(micro_batch: int, steps: int, gpu_gib: float, host_gib: float) -> tuple[str, object, object]:
    """The first candidate whose plan fits the GPU and whose host-memory needs fit 80 % of the host."""
    from sharegpt4v.training.memory import GIB, estimate_stage_memory, parameter_counts

    for name, language, zero, offload in CANDIDATES:
        recipe = recipe_for(language, zero, offload, micro_batch, steps, gpu_gib)
        est = estimate_stage_memory(recipe, "pretrain")
        total = parameter_counts(recipe, "pretrain")["total"]
        # building the random checkpoint: fp32 + bf16 copies; training: the offloaded states + a bf16 load
        host_needed = max(6 * total, est.host + 2 * total) / GIB + 8
        if est.fits and host_needed < 0.8 * host_gib:
            return name, recipe, est
    raise SystemExit(f"bench_train_7b: no candidate fits {gpu_gib:.0f} GiB per GPU with {host_gib:.0f} GiB of host "
                     "memory; lower --micro-batch")


def write_random_checkpoint(recipe, folder: Path) -> None:
    """config + tokenizer/processor (vocabulary padded to 32064) + random bf16 weights, manifest last."""
    from transformers import LlavaForConditionalGeneration

    from sharegpt4v.modeling.builder import _prepare_tokenizer, llava_config, make_processor, save_model
    from sharegpt4v.modeling.tokenizer import train_tokenizer
    from sharegpt4v.world import make_sample

    texts = [make_sample(0, i, recipe.world).metadata["detailed_caption"] for i in range(300)]
    tokenizer = train_tokenizer(texts, 1024)
    image_id = _prepare_tokenizer(tokenizer)
    tokenizer.add_tokens([f"<pad_{i}>" for i in range(VOCAB - len(tokenizer))])
    config = llava_config(recipe.model, len(tokenizer), image_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
                          tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    save_model(model, make_processor(tokenizer, 336, 14), str(folder), image_aspect="crop")


def bare_loop(recipe, world: str, checkpoint: str, steps: int, skip: int) -> tuple[float | None, float, str]:
    """(steps/s or None when it cannot fit one GPU, mean tokens per sample, note)."""
    from sharegpt4v.modeling.builder import load_model
    from sharegpt4v.training.data import Position, StageInputs, build_index, iter_batches
    from sharegpt4v.training.freezing import apply_freezing

    stage = recipe.pretrain
    index = build_index("pretrain", stage, StageInputs([world]), recipe.seed)
    model, processor = load_model(checkpoint)
    batches = iter_batches(index, stage, recipe.seed, 0, 1, Position(), stage.micro_batch_size, processor.tokenizer,
                           recipe.model.language.max_length, recipe.model.image_tokens, 336)
    encoded = [next(batches) for _ in range(steps)]
    tokens = sum(b.tokens for b in encoded) / sum(len(b.ids) for b in encoded)
    try:
        model = model.to("cuda", torch.bfloat16)
        trainable = set(apply_freezing(model, stage))
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if n in trainable], lr=2e-5, fused=True)
        inputs = [{k: v.to("cuda") for k, v in b.model_inputs().items()} for b in encoded]
        start = 0.0
        for i, batch in enumerate(inputs):
            if i == skip:
                torch.cuda.synchronize()
                start = time.perf_counter()
            model(**batch, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return (steps - skip) / (time.perf_counter() - start), tokens, "fused AdamW, bf16 weights and states"
    except torch.cuda.OutOfMemoryError:
        return None, tokens, "does not fit one GPU without ZeRO/offload"
    finally:
        del model
        torch.cuda.empty_cache()


def trainer_rate(recipe, world: str, checkpoint: str, out: Path, skip: int) -> float:
    from sharegpt4v.training.data import StageInputs
    from sharegpt4v.training.run import launch

    trace = out / "trace"
    launch("pretrain", recipe, StageInputs([world]), str(out / "run"), init=checkpoint, trace=str(trace))
    records = [json.loads(line) for line in (trace / "pretrain-rank0.jsonl").read_text().splitlines()]
    return (len(records) - skip) / (records[-1]["time"] - records[skip - 1]["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the timing")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--gpu-gib", type=float, default=0.0, help="with --plan: the GPU memory to plan for")
    parser.add_argument("--host-gib", type=float, default=0.0, help="with --plan: the host memory (default: this one)")
    parser.add_argument("--plan", action="store_true", help="print the chosen shape and its memory plan, then stop")
    args = parser.parse_args()
    from sharegpt4v.training.memory import format_plan

    if args.plan:
        gib = args.gpu_gib or (torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available()
                               else 80.0)
        host = args.host_gib or host_memory_gib()
        name, recipe, est = choose(args.micro_batch, args.steps, gib, host)
        print(f"{name} on a {gib:.0f} GiB GPU with {host:.0f} GiB of host memory, micro-batch {args.micro_batch}:")
        print(format_plan([est]), end="")
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_train_7b: no NVIDIA GPU here (torch.cuda.is_available() is False); run it on a GPU node "
                         "of the train image (`--plan` shows what it would train)")
    from sharegpt4v.config import WorldConfig
    from sharegpt4v.training.flops import flops_per_sample, peak_flops
    from sharegpt4v.world.generate import generate_world

    gpu = torch.cuda.get_device_name(0)
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    name, recipe, est = choose(args.micro_batch, args.steps, gib, host_memory_gib())
    peak, source = peak_flops(recipe, torch.device("cuda", 0))
    with tempfile.TemporaryDirectory(prefix="bench-train-7b-") as tmp:
        root = Path(tmp)
        world = str(root / "world")
        generate_world(world, args.steps * args.micro_batch * 2, 0, WorldConfig(image_size=336), progress=False)
        checkpoint = str(root / "random-llava")
        write_random_checkpoint(recipe, Path(checkpoint))
        bare, tokens, bare_note = bare_loop(recipe, world, checkpoint, args.steps, args.skip)
        trainer = trainer_rate(recipe, world, checkpoint, root / "trainer", args.skip)
    flops_per_step = args.micro_batch * flops_per_sample(recipe, "pretrain", tokens)
    rows = [("platform trainer (train_stage)", trainer, f"DeepSpeed ZeRO-{recipe.pretrain.zero_stage}"
             + (" + CPU offload" if recipe.compute.zero_offload else ""))]
    if bare is not None:
        rows.insert(0, ("bare torch loop", bare, bare_note))
    print(f"training on {gpu} ({gib:.0f} GiB): {name}, micro-batch {args.micro_batch}, ~{tokens:.0f} tokens/sample, "
          f"bf16, gradient checkpointing, SDPA; peak {peak / 1e12:.0f} TFLOP/s ({source}); planned "
          f"{est.total / 2**30:.1f} GiB/GPU")
    if bare is None:
        print(f"bare torch loop: {bare_note}")
    for label, rate, note in rows:
        ratio = f"{rate / bare:.2f}x vs bare" if bare else "(no bare row)"
        print(f"| {label} | {rate * args.micro_batch * tokens:.0f} tokens/s | MFU {100 * rate * flops_per_step / peak:.1f}% "
              f"| {ratio} | {note} |")


if __name__ == "__main__":
    main()

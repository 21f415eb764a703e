"""GPU: captioning throughput of a LLaVA-1.5-7B-sized model, the platform's vLLM backend vs the
transformers engine, on the same synthetic images, in one run. Nothing is downloaded.

The model is built from config (CLIP ViT-L/14-336 -> 2-layer MLP -> Llama-7B shapes, vocabulary
32064 as in llava-1.5-7b-hf), in bf16 with random weights: vLLM loads it with its `dummy` load
format (config, tokenizer and processor only), the transformers engine builds it on the GPU.
Every image gets exactly `--tokens` new tokens on both engines. Both rows run the platform's
sharded captioning job. Needs an NVIDIA GPU and the engine environment (SHAREGPT4V_ENGINE_PYTHON,
set in the train image); exits with a clear message otherwise.

Run: python bench/gpu/bench_captioning_7b.py [--images 256] [--tokens 250] [--hf-batch 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

LLAVA_7B = {
    "vision": {"image_size": 336, "patch_size": 14, "hidden_size": 1024, "num_layers": 24, "num_heads": 16,
               "intermediate_size": 4096, "feature_layer": -2},
    "language": {"vocab_size": 32064, "hidden_size": 4096, "num_layers": 32, "num_heads": 32,
                 "intermediate_size": 11008, "max_length": 2048, "initializer_range": 0.02},
    "projector": "mlp2x_gelu",
    "image_tokens": 576,
}


def build_folder(folder: Path) -> tuple[object, object]:
    """config.json (bf16) + tokenizer/processor (vocabulary padded to 32064) + chat template; no weights."""
    from sharegpt4v.config import load_recipe
    from sharegpt4v.modeling.builder import _prepare_tokenizer, llava_config, make_processor
    from sharegpt4v.modeling.hf_layout import write_layout
    from sharegpt4v.modeling.tokenizer import train_tokenizer
    from sharegpt4v.world import make_sample

    recipe = load_recipe("tiny", [f"model.{k}.{kk}={vv}" for k, v in LLAVA_7B.items() if isinstance(v, dict)
                                  for kk, vv in v.items()] + ["model.image_tokens=576"])
    texts = [make_sample(0, i, recipe.world).metadata["detailed_caption"] for i in range(300)]
    tokenizer = train_tokenizer(texts, 1024)
    image_id = _prepare_tokenizer(tokenizer)
    # Pad the vocabulary with plain tokens so every id a random model emits decodes.
    tokenizer.add_tokens([f"<pad_{i}>" for i in range(LLAVA_7B["language"]["vocab_size"] - len(tokenizer))])
    config = llava_config(recipe.model, len(tokenizer), image_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
                          tokenizer.pad_token_id)
    config.dtype = torch.bfloat16
    config.text_config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    processor = make_processor(tokenizer, 336, 14)
    processor.save_pretrained(folder)
    write_layout(folder, "pad")
    return recipe, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--vllm-batch", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_captioning_7b: no NVIDIA GPU here (torch.cuda.is_available() is False); "
                         "run it on a GPU node of the train image")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from sharegpt4v.captioning.engine import LlavaCaptioner, VllmCaptioner
    from sharegpt4v.captioning.job import run_caption_job
    from sharegpt4v.config import WorldConfig
    from sharegpt4v.engines.vllm_client import VllmEngine, engine_python
    from sharegpt4v.modeling.inference import InferenceEngine
    from sharegpt4v.world.generate import generate_world

    engine_python()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-7b-") as tmp:
        root = Path(tmp)
        folder = root / "llava-7b-random"
        recipe, config = build_folder(folder)
        world = str(root / "world")
        generate_world(world, args.images, 0, WorldConfig(image_size=336), progress=False)
        captioning = recipe.captioning.__class__(**{**vars(recipe.captioning), "max_new_tokens": args.tokens,
                                                    "batch_size": args.hf_batch})

        def job(captioner: object, name: str, batch: int) -> None:
            began = time.perf_counter()
            summary = run_caption_job(world, str(root / name), captioner, batch_size=batch, progress=False)
            seconds = time.perf_counter() - began
            rows.append({"name": name, "images/s": args.images / seconds,
                         "tokens/s": summary.completion_tokens / seconds, "seconds": seconds})

        with VllmEngine(folder, dtype="bfloat16", engine_args={"load_format": "dummy"}) as engine:
            captioner = VllmCaptioner(engine, captioning, "vllm", 336, "pad")
            captioner.min_new_tokens = args.tokens
            captioner.caption_batch([])  # nothing: the engine is up
            job(captioner, f"platform vLLM backend (vllm {engine.version}), batch {args.vllm_batch}", args.vllm_batch)

        with torch.device("cuda"):
            model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
        processor = AutoProcessor.from_pretrained(str(folder))
        hf = LlavaCaptioner(InferenceEngine(model, processor, recipe.model, captioning, device="cuda"), "hf")
        hf.min_new_tokens = args.tokens
        job(hf, f"transformers engine, batch {args.hf_batch}", args.hf_batch)

    gpu = torch.cuda.get_device_name(0)
    print(f"captioning on {gpu}: {args.images} synthetic 336 px images, {args.tokens} new tokens each, "
          f"LLaVA-1.5-7B shapes in bf16 with random weights")
    print(json.dumps(rows, indent=1))
    base = rows[1]["images/s"]
    for row in rows:
        print(f"| {row['name']} | {row['images/s']:.2f} images/s | {row['tokens/s']:.0f} tokens/s | "
              f"{row['images/s'] / base:.2f}x vs transformers |")


if __name__ == "__main__":
    main()

"""Raw vLLM, the peer of the platform's vLLM backend: `vllm.LLM.generate` on a folder of images.

Runs in the engine environment (.venv-engine/bin/python), started by bench_vllm.py; prints one JSON
line: the best wall seconds over `--repeats` (engine start and one warm-up call excluded) and the
generated tokens. Images are PNGs already padded and resized by the caller, as the platform sends them.
"""

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("images")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    args = parser.parse_args()

    import torch
    from PIL import Image
    from vllm import LLM, SamplingParams

    config = json.loads((Path(args.model) / "config.json").read_text())
    cpu = not torch.cuda.is_available()
    llm = LLM(model=args.model, dtype=config["dtype"], max_model_len=config["text_config"]["max_position_embeddings"],
              enforce_eager=cpu, limit_mm_per_prompt={"image": 1}, seed=0,
              **({"kv_cache_memory_bytes": int(args.kv_cache_gib * (1 << 30))} if cpu else {}))
    images = [Image.open(p).convert("RGB") for p in sorted(Path(args.images).glob("*.png"))]
    inputs = [{"prompt": args.prompt, "multi_modal_data": {"image": image}} for image in images]
    params = SamplingParams(max_tokens=args.tokens, min_tokens=args.tokens, temperature=0.0)
    llm.generate(inputs[:8], params, use_tqdm=False)  # warm-up
    best, tokens = float("inf"), 0
    for _ in range(args.repeats):
        began = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        best = min(best, time.perf_counter() - began)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("RESULT " + json.dumps({"seconds": best, "tokens": tokens, "images": len(images)}), flush=True)


if __name__ == "__main__":
    main()

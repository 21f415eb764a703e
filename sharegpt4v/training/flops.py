"""Model FLOPs of a training step and the peak they are compared with: model FLOPs utilisation (MFU).

Per language-model token (PaLM's accounting, appendix B): 6 N (forward 2 N, backward 4 N) plus
12 L h s for attention, N the decoder's weights without the input embedding (a lookup), s the mean
sequence length. A frozen part still passes gradients back to what trains before it, so it costs
4 N (forward and input gradients, no weight gradients); one that nothing before it trains costs
the forward only, 2 N. Per image: the projector on each image token and the ViT on each patch.
Padding is not counted: MFU measures useful work.

Peak FLOP/s: `compute.peak_tflops` when the recipe sets it; on an NVIDIA GPU the dense tensor-core
peak of the card by name (bf16/fp16, or tf32 for fp32); on CPU a matmul measured on this
process's threads (what the cores reach on the best-case kernel, not a datasheet figure).
"""

from __future__ import annotations

import functools
import time
from typing import Any

from sharegpt4v.training.memory import language_layer_parameters, parameter_counts, vision_layer_parameters

# Dense peak TFLOP/s per GPU (datasheets, SXM parts): 16-bit tensor cores, and TF32 for fp32 training.
GPU_PEAK_TFLOPS = {
    "H200": (989.0, 494.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10": (125.0, 62.5),
}


def flops_per_sample(recipe: Any, stage: str, tokens: float) -> float:
    """Training FLOPs of one sample of `tokens` language-model tokens (image tokens included)."""
    s, v, lang = getattr(recipe, stage), recipe.model.vision, recipe.model.language
    counts = parameter_counts(recipe, stage)
    h = lang.hidden_size
    decoder = lang.num_layers * language_layer_parameters(h, lang.intermediate_size) + h + lang.vocab_size * h
    vision_trains = counts["trainable_vision_layers"] > 0
    before_llm_trains = s.train_projector or vision_trains
    llm_factor = 6 if s.train_llm else (4 if before_llm_trains else 2)
    llm = tokens * (llm_factor * decoder + (12 if s.train_llm or before_llm_trains else 4) * lang.num_layers * h * tokens)
    image_tokens = recipe.model.image_tokens
    projector = image_tokens * (6 if s.train_projector else (4 if vision_trains else 2)) * counts["projector"]
    patches = (v.image_size // v.patch_size) ** 2 + 1
    layer = vision_layer_parameters(v.hidden_size, v.intermediate_size)
    used, trained = counts["used_vision_layers"], counts["trainable_vision_layers"]
    # layers below the first trained one: forward only; trained layers: forward + both gradients
    vision = patches * layer * (2 * (used - trained) + 6 * trained)
    return float(llm + projector + vision)


@functools.lru_cache(maxsize=4)
def measured_cpu_peak(precision: str = "fp32") -> float:
    """FLOP/s of a large matmul on this process's CPU threads (best of a few, ~0.3 s)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    best = 0.0
    deadline = time.perf_counter() + 0.3
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        best = max(best, 4 * 2 * 1024**3 / (time.perf_counter() - started))
    return best


def peak_flops(recipe: Any, device: Any) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    precision = recipe.compute.precision
    if recipe.compute.peak_tflops:
        return recipe.compute.peak_tflops * 1e12, "recipe (compute.peak_tflops)"
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (half if precision in ("bf16", "fp16") else tf32) * 1e12, f"datasheet peak of {name}"
        return 0.0, f"unknown GPU {name}: set compute.peak_tflops"
    return measured_cpu_peak(precision), "measured CPU matmul"

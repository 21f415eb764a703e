"""Per-GPU memory of a training stage, known before anything is submitted.

For each stage: parameters, gradients and optimizer states under the stage's ZeRO stage and the
recipe's offload, the ZeRO-3 working set of gathered parameters, activations (with or without
gradient checkpointing), the logits of the loss, and a fixed allowance for the CUDA context and
allocator. Bytes per element follow DeepSpeed's mixed-precision AdamW: 16-bit weights and
gradients plus fp32 master weights, momentum and variance (12 bytes per trainable parameter);
fp32 training keeps 4-byte weights and gradients and 8 bytes of AdamW moments.

Activations per token and layer (16-bit, fused SDPA attention, so no sequence-squared term):
the Llama layer keeps its input, normed input, q/k/v and attention output (12 h bytes), its MLP
input and normed input (4 h) and gate, up, activation and product (8 I): 16 h + 8 I bytes; a
CLIP layer 16 h + 4 I (fc1 and GELU outputs). With
gradient checkpointing only each layer's input stays (2 h bytes per layer) plus one layer being
recomputed. The logits cost b * s * V * (2 + 4 + 4) bytes: the 16-bit logits, the fp32 copy the
loss takes and its gradient. Trainable ViT layers add the same per-token terms over the image's
patches. These are estimates of the largest terms, not an allocator trace: they leave out
temporary buffers of fused kernels and fragmentation beyond the fixed allowance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sharegpt4v.errors import UsageError

GIB = 1024**3
CUDA_OVERHEAD_BYTES = 2 * GIB  # CUDA context, cuBLAS/NCCL workspaces, allocator slack
ZERO3_MAX_LIVE_PARAMETERS = int(1e9)  # stage3_max_live_parameters in the DeepSpeed config
TRAINING_STAGES = ("captioner", "pretrain", "sft")


class MemoryPlanError(UsageError):
    """A stage's plan cannot fit the configured GPU memory (a recipe error: exit 2)."""


def vision_layer_parameters(hidden: int, intermediate: int) -> int:
    """One CLIP encoder layer: q/k/v/o with biases, fc1/fc2 with biases, two LayerNorms."""
    return 4 * (hidden * hidden + hidden) + (hidden * intermediate + intermediate) + (intermediate * hidden + hidden) \
        + 4 * hidden


def language_layer_parameters(hidden: int, intermediate: int) -> int:
    """One Llama decoder layer: q/k/v/o (no biases, as many KV heads as heads), gate/up/down, two RMSNorms."""
    return 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden


def parameter_counts(recipe: Any, stage: str) -> dict[str, int]:
    """Parameters of the model the recipe builds, by part, and how many the stage trains."""
    v, lang, s = recipe.model.vision, recipe.model.language, getattr(recipe, stage)
    patches = (v.image_size // v.patch_size) ** 2
    vision_layer = vision_layer_parameters(v.hidden_size, v.intermediate_size)
    vision = (3 * v.patch_size * v.patch_size * v.hidden_size + v.hidden_size + (patches + 1) * v.hidden_size
              + 2 * v.hidden_size + v.num_layers * vision_layer + 2 * v.hidden_size)
    h = lang.hidden_size
    projector = v.hidden_size * h + h + (h * h + h if recipe.model.projector == "mlp2x_gelu" else 0)
    language = 2 * lang.vocab_size * h + lang.num_layers * language_layer_parameters(h, lang.intermediate_size) + h
    used_vision_layers = v.num_layers + v.feature_layer + 1 if v.feature_layer < 0 else v.feature_layer
    trainable_vision_layers = 0 if s.vit_unfreeze_from is None else max(0, used_vision_layers - s.vit_unfreeze_from)
    trainable = (language if s.train_llm else 0) + (projector if s.train_projector else 0) \
        + trainable_vision_layers * vision_layer
    return {"vision": vision, "projector": projector, "language": language, "total": vision + projector + language,
            "trainable": trainable, "used_vision_layers": used_vision_layers,
            "trainable_vision_layers": trainable_vision_layers}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of one stage; `host` is what offload keeps in CPU memory per GPU instead."""

    stage: str
    parameters: int
    gradients: int
    optimizer: int
    gathered: int
    activations: int
    logits: int
    overhead: int
    host: int
    capacity: int  # the configured GPU memory

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.gathered + self.activations + self.logits
                + self.overhead)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def row(self) -> dict[str, Any]:
        gib = {k: round(getattr(self, k) / GIB, 2) for k in ("parameters", "gradients", "optimizer", "gathered",
                                                              "activations", "logits", "overhead", "host")}
        return {"stage": self.stage, **gib, "total": round(self.total / GIB, 2), "capacity": round(self.capacity / GIB, 2),
                "fits": self.fits}


def estimate_stage_memory(recipe: Any, stage: str) -> MemoryEstimate:
    """The per-GPU memory of `stage` under the recipe's compute plan (see the module docstring)."""
    s, compute, lang, v = getattr(recipe, stage), recipe.compute, recipe.model.language, recipe.model.vision
    counts = parameter_counts(recipe, stage)
    n = compute.world_size
    half = compute.precision in ("bf16", "fp16")
    weight_bytes = 2 if half else 4
    optimizer_bytes = 12 if half else 8  # fp32 master + m + v, or m + v
    zero = s.zero_stage
    offload = compute.zero_offload and zero >= 1

    parameters = counts["total"] * weight_bytes // (n if zero == 3 else 1)
    gradients = counts["trainable"] * weight_bytes // (n if zero >= 2 else 1)
    optimizer = counts["trainable"] * optimizer_bytes // (n if zero >= 1 else 1)
    host = 0
    if offload:
        host += optimizer
        optimizer = 0
        if zero == 3:
            host += parameters
            parameters = 0
    gathered = 0
    if zero == 3:  # the layers being computed (and prefetched) are whole on every GPU
        largest = max(language_layer_parameters(lang.hidden_size, lang.intermediate_size), lang.vocab_size * lang.hidden_size)
        gathered = min(ZERO3_MAX_LIVE_PARAMETERS, 2 * largest) * weight_bytes

    scale = 1 if half else 2
    b, seq = s.micro_batch_size, lang.max_length
    per_token_layer = (16 * lang.hidden_size + 8 * lang.intermediate_size) * scale
    vision_tokens = (v.image_size // v.patch_size) ** 2 + 1
    vision_per_token_layer = (16 * v.hidden_size + 4 * v.intermediate_size) * scale  # fc1 and GELU outputs
    vision_layers = counts["trainable_vision_layers"]
    if s.gradient_checkpointing:
        activations = b * seq * (lang.num_layers * 2 * lang.hidden_size * scale + per_token_layer)
        if vision_layers:
            activations += b * vision_tokens * (vision_layers * 2 * v.hidden_size * scale + vision_per_token_layer)
    else:
        activations = b * seq * lang.num_layers * per_token_layer + b * vision_tokens * vision_layers * vision_per_token_layer
    logits = b * seq * lang.vocab_size * ((2 + 4 + 4) if half else (4 + 4))
    return MemoryEstimate(stage, parameters, gradients, optimizer, gathered, activations, logits, CUDA_OVERHEAD_BYTES,
                          host, int(compute.gpu_memory_gib * GIB))


def memory_plan(recipe: Any, stages: tuple[str, ...] = TRAINING_STAGES) -> list[MemoryEstimate]:
    return [estimate_stage_memory(recipe, stage) for stage in stages]


def check_memory_fit(recipe: Any, stages: tuple[str, ...] = TRAINING_STAGES) -> list[MemoryEstimate]:
    """The plan of each stage; on GPUs, one line naming the first stage that cannot fit, and why."""
    plan = memory_plan(recipe, stages)
    if recipe.compute.device != "cuda":
        return plan  # CPU processes share host memory: nothing per-GPU to check
    for est in plan:
        if not est.fits:
            terms = {"parameters": est.parameters, "gradients": est.gradients, "optimizer states": est.optimizer,
                     "activations": est.activations, "logits": est.logits}
            biggest = sorted(terms.items(), key=lambda kv: -kv[1])[:2]
            s = getattr(recipe, est.stage)
            raise MemoryPlanError(
                f"{est.stage}: needs ~{est.total / GIB:.1f} GiB per GPU but compute.gpu_memory_gib is "
                f"{recipe.compute.gpu_memory_gib:g} (largest: " + ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in biggest)
                + f"; zero_stage={s.zero_stage}, zero_offload={recipe.compute.zero_offload}, micro_batch_size="
                f"{s.micro_batch_size}, gradient_checkpointing={s.gradient_checkpointing}, {recipe.compute.world_size} GPUs)"
            )
    return plan


def format_plan(plan: list[MemoryEstimate], device: str = "cuda") -> str:
    """A small table (GiB per GPU) for `config show` and the pipeline's start task, as YAML comments."""
    cols = ("parameters", "gradients", "optimizer", "gathered", "activations", "logits", "overhead", "total",
            "capacity", "host")
    lines = ["# training memory per GPU (GiB; `host`: offloaded to CPU memory), sharegpt4v/training/memory.py:",
             "# " + " ".join(f"{c:>11}" for c in ("stage", *cols, "fits"))]
    for est in plan:
        row = est.row()
        fits = ("yes" if est.fits else "NO") if device == "cuda" else "(cpu run)"
        lines.append("# " + f"{est.stage:>11} " + " ".join(f"{row[c]:>11.2f}" for c in cols) + f" {fits:>11}")
    return "\n".join(lines) + "\n"

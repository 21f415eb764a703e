"""Typed recipe configuration: dataclasses, YAML profiles and `key.sub=value` overrides.

A recipe is loaded as profile YAML (``sharegpt4v/profiles/<name>.yaml``, or a path) merged
with command-line overrides, then validated once: an unknown key, a value of the wrong type
or an impossible combination raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

PROFILES_DIR = Path(__file__).parent / "profiles"

# Strict about keys, lax about "256" vs 256 so that command-line strings convert.
_STRICT_KEYS = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A recipe that cannot run; the message names the offending key."""


@dataclass(config=_STRICT_KEYS)
class WorldConfig:
    """The synthetic scene world: procedurally drawn scenes with known ground truth."""

    image_size: int = 64
    grid: Literal[3] = 3
    min_objects: int = 1
    max_objects: int = 6
    # Share of each source; the paper mixes photos (COCO/SAM/LCS), text-rich images and art.
    sources: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"photo": 0.5, "text": 0.25, "art": 0.25}
    )
    splits: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    text_probability: float = 0.15  # chance that an object in a photo/art scene carries a word
    samples_per_shard: int = 256
    workers: int = 1  # processes that render in parallel; output is identical for any value

    @model_validator(mode="after")
    def _check(self) -> "WorldConfig":
        if not 1 <= self.min_objects <= self.max_objects <= 6:
            raise ValueError("max_objects: need 1 <= min_objects <= max_objects <= 6 (a 3x3 grid, one object per cell)")
        if self.image_size < 16:
            raise ValueError("image_size: must be at least 16 pixels")
        unknown = set(self.sources) - {"photo", "text", "art"}
        if unknown:
            raise ValueError(f"sources: unknown source(s) {sorted(unknown)}; known: photo, text, art")
        if not self.sources or any(w < 0 for w in self.sources.values()) or sum(self.sources.values()) <= 0:
            raise ValueError("sources: weights must be non-negative with a positive sum")
        if set(self.splits) - {"train", "val", "test"} or abs(sum(self.splits.values()) - 1.0) > 1e-6:
            raise ValueError("splits: keys from train/val/test whose fractions sum to 1")
        if self.samples_per_shard < 1 or self.workers < 1:
            raise ValueError("samples_per_shard: must be >= 1 (and workers >= 1)")
        return self


@dataclass(config=_STRICT_KEYS)
class IngestConfig:
    """Limits that decide which input images become error records instead of samples."""

    max_pixels: int = 89_478_485  # decompression-bomb guard (Pillow's own default)
    min_side: int = 8
    max_aspect_ratio: float = 20.0
    samples_per_shard: int = 1000
    jpeg_quality: int = 95  # used only when an image must be re-encoded (CMYK, EXIF rotation, ...)

    @model_validator(mode="after")
    def _check(self) -> "IngestConfig":
        if self.max_pixels < 1 or self.min_side < 1 or self.samples_per_shard < 1:
            raise ValueError("max_pixels: max_pixels, min_side and samples_per_shard must be >= 1")
        if self.max_aspect_ratio < 1:
            raise ValueError("max_aspect_ratio: must be >= 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality: must be within 1..100")
        return self


@dataclass(config=_STRICT_KEYS)
class VisionConfig:
    """CLIP vision tower. `path` (folder or s3:// prefix) loads weights; otherwise built from these sizes."""

    path: str | None = None
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    feature_layer: int = -2  # LLaVA-1.5 takes the second-to-last layer; the last never trains

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @model_validator(mode="after")
    def _check(self) -> "VisionConfig":
        if self.image_size % self.patch_size:
            raise ValueError("image_size: must be a multiple of patch_size")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size: must be divisible by num_heads")
        if not -self.num_layers <= self.feature_layer < self.num_layers:
            raise ValueError("feature_layer: outside the tower's layers")
        return self


@dataclass(config=_STRICT_KEYS)
class LanguageConfig:
    """The LLM. `path` loads a Llama/Vicuna checkpoint; otherwise a tiny Llama is built from these sizes."""

    path: str | None = None
    vocab_size: int = 2048  # tiny profile: the BPE tokenizer is trained to this size
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 256
    max_length: int = 256
    # Weight init std of a model built from config. HF's 0.02 is tuned for wide models: at width 128 the
    # attention barely moves off uniform and a tiny LLaVA never learns to read its image tokens
    # (measured: colour at chance after 1000 steps with 0.02, learnt in 250 with 0.08 ~ 1/sqrt(width)).
    initializer_range: float = 0.02

    @model_validator(mode="after")
    def _check(self) -> "LanguageConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size: must be divisible by num_heads")
        if self.max_length < 8:
            raise ValueError("max_length: must be at least 8 tokens")
        return self


@dataclass(config=_STRICT_KEYS)
class FoundationsConfig:
    """Stand-ins for CLIP and Vicuna when the model is built from config (`sharegpt4v.training.foundations`).

    The paper starts from a CLIP tower pretrained on web alt text and a chat LLM. A model built from
    config gets both from the world's training split first: a CLIP vision tower trained contrastively
    on image <-> alt-text pairs (alt text names the objects and the background; no positions, sizes or
    counts) and a Llama trained on the world's text. Unused when `model.vision.path` and
    `model.language.path` point to real checkpoints.
    """

    split: str = "train"
    vision_steps: int = 1500
    vision_batch_size: int = 128
    vision_learning_rate: float = 2e-3
    # Position embeddings drawn this large at init, so that every image token says which grid cell it is
    # (HF's 0.02 leaves them at ~4% of a token's norm and the contrastive loss has no reason to keep them).
    vision_position_init_std: float = 0.5
    vision_alt_text: Literal["names", "names+size", "names+size+texture", "names+size+position"] = "names"  # what the alt text says
    # How the image tokens become one embedding for the contrastive loss: their mean, or all of them
    # flattened into one linear map (each token's content then has to stay in its own token).
    vision_pooling: Literal["mean", "flatten"] = "mean"
    language_steps: int = 600
    language_batch_size: int = 32
    language_learning_rate: float = 1e-3
    # Then text QA, as Vicuna is tuned on text conversations: the world's questions answered from a plain
    # statement of the scene in the chat template, only the answers supervised (0: none). It is where the
    # stand-in learns to check a word against what it was told, which yes/no and multiple choice need.
    language_qa_steps: int = 0

    @model_validator(mode="after")
    def _check(self) -> "FoundationsConfig":
        if min(self.vision_steps, self.vision_batch_size, self.language_steps, self.language_batch_size) < 1:
            raise ValueError("vision_steps: steps and batch sizes must be >= 1")
        if self.language_qa_steps < 0:
            raise ValueError("language_qa_steps: must be >= 0")
        if not (0 < self.vision_learning_rate < 1 and 0 < self.language_learning_rate < 1):
            raise ValueError("vision_learning_rate: learning rates must be within (0, 1)")
        if self.vision_batch_size < 2:
            raise ValueError("vision_batch_size: a contrastive batch needs >= 2 images")
        return self


@dataclass(config=_STRICT_KEYS)
class ModelConfig:
    """LLaVA-1.5: CLIP vision tower -> 2-layer MLP projector -> LLM."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    language: LanguageConfig = dataclasses.field(default_factory=LanguageConfig)
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    projector_path: str | None = None  # e.g. LLaVA-1.5's stage-1 projector weights
    checkpoint: str | None = None  # a complete HF LLaVA checkpoint (llava-1.5-7b-hf layout)
    image_tokens: int = 16  # visual tokens per image: (image_size / patch_size)^2, CLS dropped

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.image_tokens != self.vision.num_patches:
            raise ValueError(
                f"image_tokens: {self.image_tokens} != (vision.image_size / vision.patch_size)^2 = "
                f"{self.vision.num_patches}"
            )
        if self.image_tokens >= self.language.max_length:
            raise ValueError("image_tokens: must be smaller than language.max_length")
        return self


@dataclass(config=_STRICT_KEYS)
class ComputeConfig:
    """Where a stage runs. The global batch is fixed by the stage; accumulation adapts to this."""

    device: Literal["cpu", "cuda"] = "cpu"
    num_nodes: int = 1
    gpus_per_node: int = 1  # processes per node (CPU processes for the tiny profile)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    tf32: bool = False
    zero_offload: bool = False  # ZeRO optimizer (and ZeRO-3 parameter) state in CPU memory: fits 7B on fewer GPUs
    gpu_memory_gib: float = 80.0  # per GPU (A100-80G); training plans that need more are refused before submit
    peak_tflops: float | None = None  # per device, for MFU; None: the GPU's datasheet peak, or a measured CPU matmul

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @model_validator(mode="after")
    def _check(self) -> "ComputeConfig":
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise ValueError("gpus_per_node: num_nodes and gpus_per_node must be >= 1")
        if self.device == "cpu" and self.precision == "fp16":
            raise ValueError("precision: fp16 needs a GPU; use fp32 or bf16 on cpu")
        return self


VQA_KINDS = ("short", "yesno", "mc")  # the kinds of world questions (`StageConfig.vqa_repeats`)


@dataclass(config=_STRICT_KEYS)
class StageConfig:
    """One training stage (captioner, pretrain or sft)."""

    template: Literal["plain", "vicuna_v1"] = "plain"
    image_aspect: Literal["crop", "pad"] = "crop"  # pretraining crops, SFT pads to a square
    global_batch_size: int = 32
    micro_batch_size: int = 32
    learning_rate: float = 1e-3
    # The language model's own rate (None: `learning_rate` for every part). ShareGPT4V pretrains the LLM at
    # its SFT rate (2e-5) from a projector LLaVA-1.5 aligned at 1e-3.
    llm_learning_rate: float | None = None
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None  # caps the epoch-derived step count (tiny runs)
    train_llm: bool = True
    # With `train_llm`, whether the LLM's input embeddings train too: freezing them keeps the words' meanings
    # the language model came with (README, "More yes/no in SFT": detailed-caption pretraining pulls the
    # colour words together and the model then fails to compare them).
    train_llm_embeddings: bool = True
    train_projector: bool = True
    vit_unfreeze_from: int | None = None  # first trainable ViT layer; None keeps the ViT frozen
    gradient_checkpointing: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 0
    max_grad_norm: float = 1.0
    save_every_steps: int = 0  # 0: only at the end
    log_every_steps: int = 10  # steps between MLflow metric batches
    keep_checkpoints: int = 2  # complete checkpoints kept besides the final one
    # Which caption trains the stage when captions come from the synthetic world itself (no caption
    # set given): the paper's point is detailed vs brief.
    caption_field: Literal["detailed_caption", "brief_caption"] = "detailed_caption"
    # SFT data mix by relative weight: world VQA conversations, caption conversations, and
    # conversation records that came with the dataset (an ingested LLaVA JSON).
    mix: dict[str, float] = dataclasses.field(default_factory=lambda: {"vqa": 1.0, "captions": 0.0, "conversations": 1.0})
    max_samples: int | None = None  # use at most this many training samples (tiny runs, smoke tests)
    # World yes/no items answered with the fact that decides them: "after" the answer word ("no, it is
    # blue.") or "before" it ("it is blue, so no.": the comparison left in plain text). A probe of where
    # yes/no fails (README, "Where yes/no fails"); "none" in every profile.
    yes_no_reasons: Literal["none", "after", "before"] = "none"
    # How many times each world VQA item of a kind (short answers, yes/no, multiple choice) enters the
    # `vqa` pool per pass: 0 leaves the kind out, 2 trains its items twice as often; a kind not named: 1.
    vqa_repeats: dict[Literal["short", "yesno", "mc"], int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(VQA_KINDS, 1))

    @field_validator("vqa_repeats")
    @classmethod
    def _every_vqa_kind(cls, repeats: dict[str, int]) -> dict[str, int]:
        return {**dict.fromkeys(VQA_KINDS, 1), **repeats}  # a kind not named: 1

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("global_batch_size: batch sizes must be >= 1")
        if not 0 < self.learning_rate < 1:
            raise ValueError("learning_rate: must be within (0, 1)")
        if self.llm_learning_rate is not None and not 0 < self.llm_learning_rate < 1:
            raise ValueError("llm_learning_rate: must be within (0, 1), or null for learning_rate")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio: must be within [0, 1)")
        if self.epochs <= 0 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("epochs: must be > 0 (and max_steps >= 1 when set)")
        if self.vit_unfreeze_from is not None and self.vit_unfreeze_from < 0:
            raise ValueError("vit_unfreeze_from: must be a layer index >= 0, or null for a frozen ViT")
        if not (self.train_llm or self.train_projector or self.vit_unfreeze_from is not None):
            raise ValueError("train_llm: nothing would train (LLM, projector and ViT all frozen)")
        if set(self.mix) - {"vqa", "captions", "conversations"} or any(w < 0 for w in self.mix.values()):
            raise ValueError("mix: weights >= 0 for vqa, captions and conversations")
        if self.log_every_steps < 1:
            raise ValueError("log_every_steps: must be >= 1")
        if any(n < 0 for n in self.vqa_repeats.values()) or not any(self.vqa_repeats.values()):
            raise ValueError("vqa_repeats: counts >= 0 for short, yesno and mc, at least one of them > 0")
        if self.keep_checkpoints < 0 or (self.max_samples is not None and self.max_samples < 1):
            raise ValueError("keep_checkpoints: must be >= 0 (and max_samples >= 1 when set)")
        return self


@dataclass(config=_STRICT_KEYS)
class CaptioningConfig:
    """Generation settings for the captioner (and the teacher's answer length)."""

    batch_size: int = 16
    max_new_tokens: int = 160
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    backend: Literal["transformers", "vllm"] = "transformers"

    @model_validator(mode="after")
    def _check(self) -> "CaptioningConfig":
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError("batch_size: batch_size, max_new_tokens and num_beams must be >= 1")
        if self.temperature <= 0 or self.repetition_penalty <= 0:
            raise ValueError("temperature: temperature and repetition_penalty must be > 0")
        return self


@dataclass(config=_STRICT_KEYS)
class TeacherConfig:
    """The teacher VLM behind an OpenAI-compatible chat-completions endpoint.

    The base URL and API key are read from the environment variables named here (a
    Kubernetes Secret in cluster); their values never enter the recipe, logs or MLflow.
    """

    model: str = "gpt-4o"
    base_url_env: str = "OPENAI_BASE_URL"
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    requests_per_minute: float = 600.0  # client-side rate limit
    max_retries: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    timeout_s: float = 60.0
    max_tokens: int = 1024
    temperature: float = 0.2
    min_caption_chars: int = 40  # shorter answers are recorded as errors ("short")
    usd_per_1k_prompt_tokens: float = 0.0025
    usd_per_1k_completion_tokens: float = 0.01
    budget_usd: float | None = None  # stop cleanly once this much was spent in one run

    @model_validator(mode="after")
    def _check(self) -> "TeacherConfig":
        if self.concurrency < 1 or self.max_retries < 0 or self.max_tokens < 1:
            raise ValueError("concurrency: concurrency and max_tokens must be >= 1, max_retries >= 0")
        if self.requests_per_minute <= 0 or self.timeout_s <= 0 or self.backoff_base_s < 0:
            raise ValueError("requests_per_minute: rate, timeout and backoff must be positive")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ValueError("budget_usd: must be >= 0 (or null for no cap)")
        return self


@dataclass(config=_STRICT_KEYS)
class EvalConfig:
    """Evaluation: greedy, batched, with the paper's prompt suffixes."""

    benchmarks: list[str] = dataclasses.field(default_factory=lambda: ["world-vqa"])
    split: str = "test"  # synthetic-world split to evaluate on
    batch_size: int = 32
    max_new_tokens: int = 16  # answers are a word, a phrase or a letter
    limit: int | None = None  # evaluate at most this many questions per benchmark
    champion_metric: str = "world-vqa.overall"  # what promotion to champion compares
    champion_threshold: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        if self.batch_size < 1 or self.max_new_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("batch_size: batch_size and max_new_tokens must be >= 1 (limit too, when set)")
        if not self.benchmarks:
            raise ValueError("benchmarks: name at least one benchmark")
        return self


@dataclass(config=_STRICT_KEYS)
class ServingConfig:
    """Triton serving of the captioner and the chat model (Python backend, dynamic batching).

    `instance_kind` is what an exported repository asks for in the cluster (KIND_GPU); local
    serving exports with KIND_CPU. Requests outside the limits get an error response of their own.
    """

    max_batch_size: int = 8  # requests (rows) Triton gathers into one model call
    max_queue_delay_us: int = 20_000  # how long the dynamic batcher waits to fill a batch
    instance_kind: Literal["KIND_GPU", "KIND_CPU"] = "KIND_GPU"
    instance_count: int = 1  # model instances (per GPU for KIND_GPU)
    max_new_tokens: int = 64  # default when a request sends no max_tokens
    max_tokens_limit: int = 256  # a request's max_tokens must be within 1..this
    temperature: float = 0.0  # default; 0 = greedy
    max_prompt_chars: int = 4000  # prompt or all chat messages together
    max_image_bytes: int = 20_000_000
    streaming: bool = True  # also export `chat_stream`, a decoupled model that streams tokens (gRPC stream)
    # transformers: Triton + the batched engine on an exported repository; vllm: vLLM's OpenAI server on the
    # checkpoint itself (`serve vllm`, `deploy render --engine vllm`; serving/vllm_server.py says why not Triton)
    engine: Literal["transformers", "vllm"] = "transformers"

    @model_validator(mode="after")
    def _check(self) -> "ServingConfig":
        if self.max_batch_size < 1 or self.instance_count < 1 or self.max_queue_delay_us < 0:
            raise ValueError("max_batch_size: max_batch_size and instance_count must be >= 1, max_queue_delay_us >= 0")
        if not 1 <= self.max_new_tokens <= self.max_tokens_limit:
            raise ValueError("max_new_tokens: must be within 1..max_tokens_limit")
        if not 0 <= self.temperature <= 2:
            raise ValueError("temperature: must be within [0, 2] (0 = greedy)")
        if self.max_prompt_chars < 1 or self.max_image_bytes < 1:
            raise ValueError("max_prompt_chars: max_prompt_chars and max_image_bytes must be >= 1")
        return self


def _default_stage(**kw: Any) -> Any:
    return dataclasses.field(default_factory=lambda: StageConfig(**kw))


@dataclass(config=_STRICT_KEYS)
class RecipeConfig:
    """The whole recipe: data, model, compute and one section per stage."""

    profile: str = "custom"
    seed: int = 0
    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    foundations: FoundationsConfig = dataclasses.field(default_factory=FoundationsConfig)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    captioner: StageConfig = _default_stage(template="vicuna_v1", image_aspect="pad",
                                            mix={"captions": 1.0, "vqa": 0.0, "conversations": 0.0})
    pretrain: StageConfig = _default_stage(template="plain", image_aspect="crop", vit_unfreeze_from=0)
    sft: StageConfig = _default_stage(template="vicuna_v1", image_aspect="pad")
    captioning: CaptioningConfig = dataclasses.field(default_factory=CaptioningConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    serving: ServingConfig = dataclasses.field(default_factory=ServingConfig)

    @model_validator(mode="after")
    def _check(self) -> "RecipeConfig":
        for name in ("captioner", "pretrain", "sft"):
            stage: StageConfig = getattr(self, name)
            per_step = stage.micro_batch_size * self.compute.world_size
            if stage.global_batch_size % per_step:
                raise ValueError(
                    f"{name}.global_batch_size: {stage.global_batch_size} is not divisible by "
                    f"{name}.micro_batch_size x compute.num_nodes x compute.gpus_per_node = "
                    f"{stage.micro_batch_size} x {self.compute.num_nodes} x {self.compute.gpus_per_node} = {per_step}"
                )
            layers = self.model.vision.num_layers
            if stage.vit_unfreeze_from is not None and stage.vit_unfreeze_from >= layers - 1:
                raise ValueError(
                    f"{name}.vit_unfreeze_from: {stage.vit_unfreeze_from} leaves no trainable ViT layer "
                    f"(the tower has {layers}; the last one never gets a gradient)"
                )
        return self

    def gradient_accumulation_steps(self, stage: str) -> int:
        s: StageConfig = getattr(self, stage)
        return s.global_batch_size // (s.micro_batch_size * self.compute.world_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """`{"pretrain.learning_rate": 2e-5, ...}`: MLflow params, diffs between runs."""
        return flatten(self.to_dict())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`pretrain.learning_rate=2e-5` -> (["pretrain", "learning_rate"], 2e-5)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config key '{key}': cannot parse value {raw!r} ({exc.problem})") from None
    return parts, value


def load_recipe(profile: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Load a profile by name (or YAML path), apply overrides, validate everything."""
    path = Path(profile) if profile.endswith((".yaml", ".yml")) else PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise ConfigError(f"profile {profile!r} not found (known: {', '.join(available_profiles())})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"profile {profile!r}: top level must be a mapping")
    data.setdefault("profile", path.stem)
    # Start from the defaults so that a partial mapping (world.sources.art=0) merges into them.
    data = _merge(RecipeConfig().to_dict(), data)
    for item in overrides:
        parts, value = parse_override(item)
        _set_path(data, parts, value)
    return recipe_from_dict(data)


def with_overrides(recipe: RecipeConfig, overrides: list[str] | tuple[str, ...]) -> RecipeConfig:
    """`recipe` with `key.sub=value` overrides applied, validated like a loaded profile."""
    data = recipe.to_dict()
    for item in overrides:
        parts, value = parse_override(item)
        _set_path(data, parts, value)
    return recipe_from_dict(data)


def recipe_from_dict(data: dict[str, Any]) -> RecipeConfig:
    try:
        return RecipeConfig(**copy.deepcopy(data))
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    except TypeError as exc:  # e.g. a section given as a scalar
        raise ConfigError(f"config: {exc}") from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_path(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}': is a value, not a section")
        node = child
    node[parts[-1]] = value


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if p != "__root__"]
        key = ".".join(loc)
        if err["type"] == "extra_forbidden" or err["type"] == "unexpected_keyword_argument":
            lines.append(f"config key '{key}': unknown key{_suggest(loc)}")
        elif err["type"] == "value_error":
            # Our validators start their message with the field name relative to the section.
            message = str(err["msg"]).removeprefix("Value error, ")
            field, _, rest = message.partition(": ")
            if " " in field:  # message did not start with a field name
                lines.append(f"config key '{key or '<root>'}': {message}")
            else:
                full = f"{key}.{field}" if key else field
                lines.append(f"config key '{full}': {rest}")
        else:
            got = err.get("input")
            lines.append(f"config key '{key}': {err['msg']} (got {got!r})")
    return "; ".join(lines)


def _suggest(loc: list[str]) -> str:
    cls: Any = RecipeConfig
    for part in loc[:-1]:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return ""
        cls = _field_class(cls, part)
        if cls is None:
            return ""
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(loc[-1], names, n=1)
    prefix = ".".join(loc[:-1])
    return f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""


def _field_class(cls: Any, name: str) -> Any:
    default = next(f for f in dataclasses.fields(cls) if f.name == name)
    if default.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = default.default_factory()  # type: ignore[misc]
        return type(value) if dataclasses.is_dataclass(value) else None
    return None

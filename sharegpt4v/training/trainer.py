"""One training loop for the captioner, pretraining and SFT stages, driven by the recipe.

`train_stage(stage, recipe, inputs, out)` builds (or loads) the model, freezes what the stage
keeps frozen, streams its examples, and trains with torch's AdamW, a warmup + cosine schedule,
gradient clipping and gradient accumulation = `recipe.gradient_accumulation_steps(stage)` (the
global batch holds for any number of processes). Several processes, or any ZeRO stage, run
through DeepSpeed (`deepspeed.initialize` with the torch optimizer and scheduler; gloo on CPU);
one process with `zero_stage: 0` runs a plain torch loop (same optimizer, same results).
Checkpoints (see `checkpoint.py`) are written every `save_every_steps`, the newest complete one
is resumed from, `final/` is written at the end. Rank 0 tracks the stage in MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import resource
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sharegpt4v.modeling.hf_layout import write_layout
from sharegpt4v.provenance import OutputMismatch, refuse_if_different
from sharegpt4v.training import checkpoint as ckpt
from sharegpt4v.training.data import DataIndex, Position, StageInputs, build_index, held_out_images, iter_batches
from sharegpt4v.training.flops import flops_per_sample, peak_flops

if TYPE_CHECKING:
    from sharegpt4v.config import RecipeConfig, StageConfig

log = logging.getLogger("sharegpt4v.training")

STAGES = ("captioner", "pretrain", "sft")
FLAGS = ("fully_masked", "truncated", "bad_image")
ENGINE_ENV = "SHAREGPT4V_TRAIN_ENGINE"  # auto (default) | torch | deepspeed
TRACE_ENV = "SHAREGPT4V_TRAIN_TRACE"  # a local folder: per-rank JSONL of step, loss, lr and sample ids
HISTORY_KEPT = 10_000  # per-step losses kept in trainer_state
# Micro-batches prepared ahead by a background thread. It pays off while the GPU computes; on a small
# CPU-only machine the thread only competes with torch's own threads for the cores (measured: slower).
PREFETCH = {"cuda": 2, "cpu": 0}


@dataclass
class StageResult:
    checkpoint_uri: str  # `<out>/final`: loadable with sharegpt4v.modeling.builder.load_model
    steps: int
    final_loss: float  # mean loss of the last (up to) 10 steps
    samples_seen: int  # steps x global batch
    flagged_samples: int  # samples trained on that were fully masked, truncated or had a bad image
    run_id: str | None  # the stage's MLflow run (None without tracking)
    flagged: dict[str, int] = field(default_factory=dict)  # by reason
    examples: int = 0  # examples in the stage's data (after mix and max_samples)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# recipe -> optimisation settings ------------------------------------------------------------------


def total_steps(stage: "StageConfig", examples: int) -> int:
    """min(epochs x examples / global batch, max_steps), at least 1."""
    steps = max(1, int(math.floor(stage.epochs * examples / stage.global_batch_size)))
    return min(steps, stage.max_steps) if stage.max_steps else steps


def warmup_steps(stage: "StageConfig", total: int) -> int:
    return int(math.ceil(stage.warmup_ratio * total))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine to 0 at `total` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], stage: "StageConfig") -> torch.optim.AdamW:
    """torch's AdamW (not DeepSpeed's compiled one); no weight decay on biases and norms."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": stage.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=stage.learning_rate, betas=(0.9, 0.999), eps=1e-8)


def make_scheduler(optimizer: torch.optim.Optimizer, stage: "StageConfig", total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(stage, total)
    schedule = stage.lr_schedule
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, schedule))


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    return {"last_epoch": int(scheduler.last_epoch), "_step_count": int(scheduler._step_count),
            "base_lrs": [float(x) for x in scheduler.base_lrs], "_last_lr": [float(x) for x in scheduler._last_lr]}


def load_scheduler_state(scheduler: Any, state: dict[str, Any]) -> None:
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    for group, lr in zip(scheduler.optimizer.param_groups, state["_last_lr"]):
        group["lr"] = lr


def deepspeed_config(recipe: "RecipeConfig", stage: str, offload: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a stage: batch sizes for the recipe's world size, ZeRO, precision, clipping."""
    s: StageConfig = getattr(recipe, stage)
    precision = recipe.compute.precision
    if offload is None:
        offload = recipe.compute.zero_offload
    hidden = recipe.model.language.hidden_size
    zero: dict[str, Any] = {"stage": s.zero_stage}
    if s.zero_stage >= 1:
        zero.update(overlap_comm=recipe.compute.device == "cuda", contiguous_gradients=True,
                    reduce_bucket_size=int(hidden * hidden), allgather_bucket_size=int(5e8), reduce_scatter=True)
    if s.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
            stage3_param_persistence_threshold=int(10 * hidden),
            stage3_max_live_parameters=int(1e9),
            stage3_max_reuse_distance=int(1e9),
            sub_group_size=int(1e9),
            # Without this a ZeRO-3 save writes no consolidated weights (only partitions).
            stage3_gather_16bit_weights_on_model_save=True,
        )
        zero.pop("allgather_bucket_size")
    if offload and s.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": recipe.compute.device == "cuda"}
        if s.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": recipe.compute.device == "cuda"}
    config: dict[str, Any] = {
        "train_batch_size": s.global_batch_size,
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps(stage),
        "gradient_clipping": s.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,  # torch's AdamW under ZeRO
        "zero_force_ds_cpu_optimizer": False,  # ... also with optimizer offload (no compiled DeepSpeedCPUAdam)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return config


# freezing -----------------------------------------------------------------------------------------


def vision_layers(model: Any) -> Any:
    tower = model.model.vision_tower
    encoder = tower.encoder if hasattr(tower, "encoder") else tower.vision_model.encoder
    return encoder.layers


def used_vision_layers(model: Any) -> int:
    """How many ViT layers feed the projector: with `vision_feature_layer = -2` all but the last."""
    n = len(vision_layers(model))
    layer = model.config.vision_feature_layer
    layer = layer[-1] if isinstance(layer, (list, tuple)) else layer  # several layers: the deepest counts
    return n + layer + 1 if layer < 0 else layer


def apply_freezing(model: Any, stage: "StageConfig") -> list[str]:
    """Set `requires_grad` per the stage; returns the trainable parameter names.

    LLM (+ lm_head) if `train_llm`; projector if `train_projector`; ViT layers from
    `vit_unfreeze_from` up to the last one that feeds the projector (with feature layer -2 the
    last layer never gets a gradient and stays frozen: DDP/DeepSpeed fail on unused parameters).
    Embeddings and norms of the ViT stay frozen.
    """
    model.requires_grad_(False)
    if stage.train_llm:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if stage.train_projector:
        model.model.multi_modal_projector.requires_grad_(True)
    if stage.vit_unfreeze_from is not None:
        layers = vision_layers(model)
        for i in range(stage.vit_unfreeze_from, min(len(layers), used_vision_layers(model))):
            layers[i].requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("nothing to train: every parameter is frozen for this stage")
    return names


# distributed helpers ------------------------------------------------------------------------------


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (torchrun, deepspeed)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_env() -> dict[str, str]:
    """What DeepSpeed needs to run one process without looking for MPI."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _dist_on():
        torch.distributed.barrier()


def _gather(obj: Any) -> list[Any]:
    if not _dist_on():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if not _dist_on():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _local_first(local_rank: int, fn: Any) -> Any:
    """Run `fn` on local rank 0 first (e.g. one download into a node's cache), then on the others."""
    if local_rank == 0:
        result = fn()
        _barrier()
        return result
    _barrier()
    return fn()


def use_deepspeed(recipe: "RecipeConfig", stage: "StageConfig", world_size: int) -> bool:
    choice = os.environ.get(ENGINE_ENV, "auto")
    if choice == "deepspeed":
        return True
    needed = world_size > 1 or stage.zero_stage > 0 or recipe.compute.precision == "fp16"
    if choice == "torch":
        if needed:
            raise ValueError(f"{ENGINE_ENV}=torch: {world_size} processes / ZeRO {stage.zero_stage} / "
                             f"{recipe.compute.precision} need DeepSpeed")
        return False
    return needed


def _init_deepspeed_dist(device: str) -> tuple[bool, list[str]]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU).

    Returns whether this call created the process group, and the environment variables it set
    for a lone process (no launcher), which the caller removes again.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
    if "TORCH_EXTENSIONS_DIR" not in os.environ:  # DeepSpeed compiles its CPU comm op once, here
        from sharegpt4v.modeling.builder import cache_root

        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache_root() / "torch_extensions")
    added = []
    if os.environ.get("WORLD_SIZE", "1") == "1":
        for key, value in single_process_env().items():
            if key not in os.environ:
                os.environ[key] = value
                added.append(key)
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    backend = "gloo" if device == "cpu" else "nccl"
    if _dist_on():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        return False, added
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return True, added


# the engine: plain torch or DeepSpeed ----------------------------------------------------------------


@dataclass
class _Engine:
    kind: str  # "torch" | "deepspeed"
    model: Any  # the HF model (DeepSpeed's `module`)
    optimizer: Any  # what holds the optimizer state: torch AdamW, or DeepSpeed's wrapper of it
    scheduler: Any
    device: torch.device
    accumulation: int
    max_grad_norm: float
    precision: str
    ds: Any = None
    dtype: torch.dtype = torch.float32

    def forward(self, batch: Any) -> torch.Tensor:
        inputs = {k: v.to(self.device) for k, v in batch.model_inputs().items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        module = self.ds if self.ds is not None else self.model
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                    if self.ds is None and self.precision == "bf16" else contextlib.nullcontext())
        with autocast:
            if batch.supervised_tokens == 0:  # nothing to learn: a zero loss that still backpropagates
                labels = inputs.pop("labels")
                out = module(**inputs, use_cache=False)
                return out.logits.float().sum() * 0.0 + labels.sum() * 0.0
            return module(**inputs, use_cache=False).loss

    def backward(self, loss: torch.Tensor) -> None:
        if self.ds is not None:
            self.ds.backward(loss)
        else:
            (loss / self.accumulation).backward()

    def boundary_step(self, params: list[torch.nn.Parameter]) -> float | None:
        """Apply the accumulated gradients; returns the gradient norm before clipping."""
        if self.ds is not None:
            norm = None
            if not ckpt.is_fragmented(params):  # ZeRO-0 fp32: DeepSpeed clips but does not report the norm
                grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
                norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
            self.ds.step()
            reported = self.ds.get_global_grad_norm()
            return float(reported) if reported is not None else norm
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def micro_step(self) -> None:
        """DeepSpeed counts micro-batches itself; `step()` is a no-op until the accumulation boundary."""
        if self.ds is not None:
            self.ds.step()

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])


def _make_engine(recipe: "RecipeConfig", stage: str, model: Any, named: list[tuple[str, torch.nn.Parameter]],
                 total: int, deepspeed_on: bool, device: torch.device) -> _Engine:
    s: StageConfig = getattr(recipe, stage)
    optimizer = make_optimizer(named, s)
    scheduler = make_scheduler(optimizer, s, total)
    accumulation = recipe.gradient_accumulation_steps(stage)
    if not deepspeed_on:
        model.to(device)
        dtype = next(model.parameters()).dtype
        return _Engine("torch", model, optimizer, scheduler, device, accumulation, s.max_grad_norm,
                       recipe.compute.precision, dtype=dtype)
    import deepspeed

    ds, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(recipe, stage)
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.compute.precision, torch.float32)
    return _Engine("deepspeed", model, ds_optimizer, ds_scheduler or scheduler, device, accumulation,
                   s.max_grad_norm, recipe.compute.precision, ds=ds, dtype=dtype)


# model -----------------------------------------------------------------------------------------


def initial_model(recipe: "RecipeConfig", index: DataIndex, source: str | None, local_rank: int = 0) -> tuple[Any, Any]:
    """The model a stage starts from: a checkpoint (`init`/resume), the recipe's pretrained parts, or
    a tiny model from config with a tokenizer trained on the stage's data (all ranks build the same)."""
    from sharegpt4v.modeling.builder import build_model, load_model, materialize

    if source:
        _local_first(local_rank, lambda: materialize(source, require_manifest=True))
        return load_model(source)
    m = recipe.model
    if m.checkpoint or m.vision.path or m.language.path:
        return _local_first(local_rank, lambda: build_model(m, seed=recipe.seed))
    from sharegpt4v.modeling.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(index.corpus, m.language.vocab_size, m.language.max_length)
    return build_model(m, tokenizer, seed=recipe.seed)


def _consolidated_state_dict(engine: _Engine) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0 (collective under ZeRO-3)."""
    if engine.ds is not None and engine.ds.zero_optimization_stage() == 3:
        return engine.ds._zero3_consolidated_16bit_state_dict()
    return engine.model.state_dict() if dist_env()[0] == 0 else None


# misc -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a progress bar per save; a training log does not need one per checkpoint."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _seed_all(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_inputs(inputs: Any) -> StageInputs:
    if isinstance(inputs, StageInputs):
        return inputs
    if isinstance(inputs, str):
        return StageInputs([inputs])
    if isinstance(inputs, dict):
        return StageInputs(**inputs)
    raise TypeError(f"inputs: expected StageInputs, a dict or a dataset URI, got {type(inputs).__name__}")


@contextlib.contextmanager
def _tracking_run(rank: int, name: str, params: dict[str, Any], tags: dict[str, str],
                  run_id: str | None) -> Iterator[Any]:
    """Rank 0's MLflow run for the stage; a resumed stage continues the run its checkpoint names.

    Only a run the server says does not exist (another tracking server, or deleted) starts a new run,
    with a warning and the old id as tag `resumed_from_run`; a server that fails to answer is asked
    again a few times, then the stage fails: it never splits the loss curve silently.
    """
    from sharegpt4v import tracking

    if rank != 0 or not tracking.tracking_enabled():
        yield None
        return
    if run_id:
        mlflow = tracking._mlflow()  # pointed at $MLFLOW_TRACKING_URI, not at whatever mlflow was last given

        attempts, found = 3, None
        for attempt in range(attempts):
            try:
                found = mlflow.get_run(run_id)
                break
            except Exception as exc:
                if tracking.is_not_found(exc):
                    break
                if attempt == attempts - 1:
                    raise tracking.mlflow_error(f"{name}: resuming the checkpoint's MLflow run {run_id}", exc) from exc
                log.warning("%s: MLflow run %s could not be read (%s); asking again", name, run_id,
                            type(exc).__name__)
                time.sleep(2.0 * 2**attempt)
        if found is not None and found.info.lifecycle_stage != "deleted":
            tracking.ensure_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or tracking.DEFAULT_EXPERIMENT)
            with mlflow.start_run(run_id=run_id, log_system_metrics=True) as run:
                yield run
            return
        log.warning("%s: the checkpoint's MLflow run %s %s; starting a new run (tag resumed_from_run=%s): the loss "
                    "curve before the resume stays in the old run", name, run_id,
                    "was deleted" if found is not None else "does not exist on this tracking server", run_id)
        tags = {**tags, "resumed_from_run": run_id}
    with tracking.stage_run(name, params, tags, log_system_metrics=True) as run:  # system/ CPU, memory, GPU metrics
        yield run


class _Trace:
    """Per-rank JSONL of every step (loss, lr, sample ids): for tests and debugging only."""

    def __init__(self, folder: str | None, stage: str, rank: int):
        self.path = Path(folder) / f"{stage}-rank{rank}.jsonl" if folder else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# the stage ----------------------------------------------------------------------------------------


def train_stage(stage: str, recipe: "RecipeConfig", inputs: Any, out: str, init: str | None = None,
                resume: bool = True, *, trace: str | None = None) -> StageResult:
    """Train one stage into `out` (local folder or s3:// prefix) and return where the model is.

    `inputs`: `StageInputs` (or a dict of its fields, or one dataset URI). `init`: checkpoint to
    start from (the previous stage's `final/`). With `resume`, the newest complete checkpoint in
    `out` is continued (optimizer, schedule, data position, RNG), and a stage whose `final/` is
    complete returns at once; without it, earlier checkpoints in `out` are removed first.
    Run it in each process of a torchrun/DeepSpeed launch, or once for one process.
    """
    if stage not in STAGES:
        raise ValueError(f"stage: unknown {stage!r} (known: {', '.join(STAGES)})")
    s: StageConfig = getattr(recipe, stage)
    inputs = _as_inputs(inputs)
    rank, world, local_rank = dist_env()
    if world != recipe.compute.world_size:
        raise ValueError(
            f"compute: the launch has {world} process(es) but the recipe says num_nodes x gpus_per_node = "
            f"{recipe.compute.world_size}; set compute.gpus_per_node (and num_nodes) to match"
        )
    if recipe.compute.device == "cuda":  # refuse a plan that cannot fit before a 7B model is loaded
        from sharegpt4v.training.memory import check_memory_fit

        check_memory_fit(recipe, (stage,))
    deepspeed_on = use_deepspeed(recipe, s, world)
    if deepspeed_on and s.zero_stage == 0 and recipe.compute.precision != "fp32":
        # DeepSpeed's stage-0 mixed-precision wrappers keep fp32 masters outside the per-parameter
        # mapping that checkpoints read; ZeRO-1 keeps them there at the same cost on one GPU.
        raise ValueError(f"{stage}.zero_stage: 0 with compute.precision={recipe.compute.precision} under DeepSpeed "
                         "cannot be checkpointed; use zero_stage >= 1")
    if recipe.compute.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        if recipe.compute.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # transformers may import DeepSpeed; no GPU probing
    created, added = _init_deepspeed_dist(recipe.compute.device) if deepspeed_on else (False, [])
    try:
        return _train(stage, recipe, s, inputs, out, init, resume, trace or os.environ.get(TRACE_ENV),
                      rank, world, local_rank, deepspeed_on, device)
    finally:
        if created and _dist_on():
            torch.distributed.destroy_process_group()
        for key in added:
            os.environ.pop(key, None)


def _finished(out: str, stage: str, made_from: dict[str, Any]) -> StageResult | None:
    from sharegpt4v import storage

    store = storage.open_store(out)
    if not store.is_complete("final"):
        return None
    m = store.read_manifest("final")
    if m.get("made_from") and m.get("stage") != stage:
        raise OutputMismatch(f"{store.url('final')}: holds a {m.get('stage')} model, not {stage}; "
                             "train each stage into its own output")
    refuse_if_different(store.url("final"), f"a {stage} model", m.get("made_from"), made_from, "--no-resume")
    if m.get("stage") != stage or "steps" not in m:
        return None
    return StageResult(store.url("final"), int(m["steps"]), float(m["final_loss"]), int(m["samples_seen"]),
                       int(m["flagged_samples"]), m.get("run_id"), dict(m.get("flagged", {})), int(m.get("examples", 0)))


def _train(stage: str, recipe: "RecipeConfig", s: "StageConfig", inputs: StageInputs, out: str, init: str | None,
           resume: bool, trace_dir: str | None, rank: int, world: int, local_rank: int, deepspeed_on: bool,
           device: torch.device) -> StageResult:
    from sharegpt4v import storage, tracking
    from sharegpt4v.modeling.builder import materialize, tokenizer_of

    store = storage.open_store(out)
    made_from = ckpt.stage_made_from(stage, recipe, inputs, init)
    if resume:
        done = _finished(out, stage, made_from)
        if done is not None:
            log.info("%s: %s is complete (%d steps); nothing to do", stage, done.checkpoint_uri, done.steps)
            return done
    elif rank == 0:
        for info in ckpt.list_checkpoints(out):
            store.delete(f"{ckpt.checkpoint_name(info.step)}/{storage.MANIFEST_NAME}")
            store.delete_prefix(ckpt.checkpoint_name(info.step))
        store.delete(f"final/{storage.MANIFEST_NAME}")
    _barrier()
    _seed_all(recipe.seed + rank)

    index = build_index(stage, s, inputs, recipe.seed)
    total = total_steps(s, len(index))
    resume_uri = ckpt.latest_checkpoint(out, stage) if resume else None
    state: dict[str, Any] | None = None
    folder: Path | None = None
    if resume_uri:
        refuse_if_different(resume_uri, f"a {stage} checkpoint", storage.open_store(resume_uri).read_manifest().get("made_from"),
                            made_from, "--no-resume")
        folder = _local_first(local_rank, lambda: materialize(resume_uri, require_manifest=True))
        state = ckpt.read_state(folder)
        log.info("%s: resuming from %s (step %d of %d)", stage, resume_uri, state["step"], total)
    model, processor = initial_model(recipe, index, resume_uri or init, local_rank)
    if recipe.compute.precision == "fp32" and next(model.parameters()).dtype != torch.float32:
        model.float()  # e.g. a bf16 checkpoint trained further in fp32 (DeepSpeed casts bf16/fp16 itself)
    tokenizer = tokenizer_of(processor)
    if world > 1:  # every rank built or loaded its own: the token ids must agree
        vocab = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()
        if len(set(_gather(vocab))) != 1:
            raise RuntimeError(f"{stage}: the ranks' tokenizers differ; train it once (e.g. a previous stage) and pass --init")
    names = set(apply_freezing(model, s))
    if s.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if n in names]
    engine = _make_engine(recipe, stage, model, named, total, deepspeed_on, device)
    params = [p for _, p in named]

    step, position, history, flags = 0, Position(), [], Counter()
    run_id = None
    if state is not None:
        assert folder is not None
        step = int(state["step"])
        position = Position.from_dict(state["position"])
        if int(state["world_size"]) != world:
            # Another process count orders the epoch differently: continue at the same share of the epoch.
            position = Position(position.epoch, position.index * int(state["world_size"]) // world)
            log.warning("%s: checkpoint written by %s processes, resumed on %d: the data order of the current "
                        "epoch changes from here", stage, state["world_size"], world)
        if state.get("data_digest") != index.digest():
            log.warning("%s: the stage's examples changed since the checkpoint; the data position is approximate", stage)
        ckpt.restore_optimizer_tensors(named, engine.optimizer, [folder / f for f in state["optimizer_files"]],
                                       state["optimizer_step"])
        load_scheduler_state(engine.scheduler, state["scheduler"])
        if str(rank) in state["rng"]:
            ckpt.set_rng_state(state["rng"][str(rank)],
                               ckpt.load_tensors(folder / ckpt.STATE_DIR / f"rng-rank-{rank:05d}.safetensors"))
        history = [tuple(x) for x in state["loss_history"]]
        flags = Counter(state.get("flagged", {}))
        run_id = state.get("run_id")

    vision = model.config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    batches = iter_batches(index, s, recipe.seed, rank, world, position, s.micro_batch_size, tokenizer,
                           recipe.model.language.max_length, image_tokens, vision.image_size, prefetch=PREFETCH[device.type])
    trace = _Trace(trace_dir, stage, rank)
    log_every = s.log_every_steps
    peak, peak_source = peak_flops(recipe, device)  # MFU's denominator, per device
    run_params = {**recipe.flat(), "run.peak_tflops_per_device": round(peak / 1e12, 3), "run.peak_source": peak_source,
                  "run.stage": stage, "run.data": ",".join(inputs.data), "run.captions": inputs.captions,
                  "run.split": inputs.split, "run.init": init, "run.out": out, "run.world_size": world,
                  "run.engine": engine.kind, "run.total_steps": total, "run.examples": len(index),
                  "run.gradient_accumulation_steps": engine.accumulation}
    tags = {"stage": stage, "output": out, **({"init": init} if init else {})}
    ctx = _Context(stage, recipe, s, inputs, out, init, index, engine, processor, named, rank, world, total,
                   made_from=made_from)

    with contextlib.ExitStack() as stack:
        run = stack.enter_context(_tracking_run(rank, stage, run_params, tags, run_id))
        ctx.run_id = run.info.run_id if run is not None else None
        if run is not None and state is None:
            for i, d in enumerate(index.datasets):
                tracking.log_dataset(storage.join(d["uri"], storage.MANIFEST_NAME), d["digest"], "training",
                                     name=f"{stage}-images" + (f"-{i}" if i else ""))
            if index.caption_set:
                c = index.caption_set
                tracking.log_dataset(storage.join(c["uri"], storage.MANIFEST_NAME), c["digest"], "training",
                                     name=f"{stage}-captions")
                tracking.log_metrics({"data.caption_records_ok": c["ok"], "data.caption_records_error": c["error"]})
            tracking.log_metrics({f"data.{k}": v for k, v in index.counts.items()})
        if rank == 0:
            log.info("%s: %d examples %s, %d steps x global batch %d (micro %d x %d processes x accumulation %d), %s",
                     stage, len(index), index.counts, total, s.global_batch_size, s.micro_batch_size, world,
                     engine.accumulation, engine.kind)

        window_start, window = time.perf_counter(), Counter()
        flagged_examples: list[str] = []
        stack.callback(batches.close)  # stops the prefetch thread, also on errors
        while step < total:
            losses, local = [], Counter()
            ids: list[str] = []
            for micro in range(engine.accumulation):
                batch = next(batches)
                loss = engine.forward(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{stage}: loss is {loss.item()} at step {step + 1} (samples {batch.ids[:4]})")
                engine.backward(loss)
                if micro < engine.accumulation - 1:
                    engine.micro_step()
                losses.append(float(loss.detach()))
                local.update(tokens=batch.tokens, samples=len(batch.ids), **batch.flags)
                ids += batch.ids
                if batch.flagged_ids and len(flagged_examples) < 5:
                    flagged_examples += batch.flagged_ids[: 5 - len(flagged_examples)]
                position = batch.position
            grad_norm = engine.boundary_step(params)
            step += 1
            summed = _all_sum([sum(losses), len(losses), local["tokens"], local["samples"],
                               *(local[f] for f in FLAGS)], device)
            step_loss = summed[0] / summed[1]
            flags.update({f: int(v) for f, v in zip(FLAGS, summed[4:]) if v})
            history.append((step, step_loss))
            window.update(steps=1, loss=step_loss, grad_norm=grad_norm or 0.0, tokens=summed[2], samples=summed[3])
            trace.write({"step": step, "time": time.time(), "loss": step_loss, "local_loss": sum(losses) / len(losses),
                         "lr": engine.lr, "grad_norm": grad_norm, "ids": ids, "position": position.to_dict()})
            if step % log_every == 0 or step == total:
                elapsed = time.perf_counter() - window_start
                samples = max(1.0, window["samples"])
                model_flops = samples * flops_per_sample(recipe, stage, window["tokens"] / samples)
                metrics = {"loss": window["loss"] / window["steps"], "lr": engine.lr,
                           "grad_norm": window["grad_norm"] / window["steps"], "tokens_per_s": window["tokens"] / elapsed,
                           "samples_per_s": window["samples"] / elapsed, "rss_mb": _rss_mb(), "epoch": position.epoch,
                           "model_tflops_per_s": model_flops / elapsed / 1e12,
                           **({"mfu": model_flops / elapsed / (peak * world)} if peak else {}),
                           **{f"flagged.{f}": flags[f] for f in FLAGS}}
                if device.type == "cuda":
                    metrics["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                tracking.log_metrics(metrics, step=step)
                if rank == 0:
                    log.info("%s step %d/%d loss %.4f lr %.3g grad-norm %.3f %.0f tokens/s MFU %.1f%%", stage, step,
                             total, metrics["loss"], metrics["lr"], metrics["grad_norm"], metrics["tokens_per_s"],
                             100 * metrics.get("mfu", 0.0))
                    _log_flags(stage, flags, flagged_examples, step)
                window_start, window = time.perf_counter(), Counter()
            if s.save_every_steps and step % s.save_every_steps == 0 and step < total:
                state_out = {"position": position.to_dict(), "loss_history": history[-HISTORY_KEPT:],
                             "flagged": dict(flags), "run_id": ctx.run_id}
                ctx.save(step, state_out)

        batches.close()
        final_loss = sum(x[1] for x in history[-10:]) / max(1, len(history[-10:]))
        result = StageResult(store.url("final"), step, final_loss, step * s.global_batch_size, sum(flags.values()),
                             ctx.run_id, {f: flags[f] for f in FLAGS}, len(index))
        ctx.save_final(result)
        if rank == 0:
            _log_flags(stage, flags, flagged_examples, step, final=True)
            ckpt.prune_checkpoints(out, s.keep_checkpoints, all_incomplete=True)
            if run is not None:
                tracking.log_metrics({"final_loss": final_loss, "steps": step, "samples_seen": result.samples_seen,
                                      "flagged_samples": result.flagged_samples,
                                      **{f"flagged.{f}": flags[f] for f in FLAGS}}, step=step)
                _log_curve_and_samples(stage, recipe, s, inputs, result, history)
        _barrier()
    return result


def _log_flags(stage: str, flags: Counter, examples: list[str], step: int, final: bool = False) -> None:
    total = sum(flags.values())
    if not total:
        if final:
            log.info("%s: no sample was fully masked or truncated", stage)
        return
    log.warning("%s%s: %d flagged samples trained on so far: %d fully masked (no supervised token: zero loss), "
                "%d truncated before the answer ended, %d with an undecodable image; e.g. %s",
                stage, "" if final else f" step {step}", total, flags["fully_masked"], flags["truncated"],
                flags["bad_image"], ", ".join(examples[:5]))


@dataclass
class _Context:
    stage: str
    recipe: Any
    s: Any
    inputs: StageInputs
    out: str
    init: str | None
    index: DataIndex
    engine: _Engine
    processor: Any
    named: list[tuple[str, torch.nn.Parameter]]
    rank: int
    world: int
    total: int
    run_id: str | None = None
    made_from: dict[str, Any] | None = None  # recorded in every manifest: a rerun refuses other inputs

    def _write(self, name: str, meta: dict[str, Any], state: dict[str, Any] | None) -> str:
        """Write `out/<name>/` from every rank; rank 0 commits the manifest last. Collective."""
        from sharegpt4v import storage

        store = storage.open_store(self.out)
        uri = store.url(name)
        if self.rank == 0:  # leftovers of a killed writer at the same step go first
            store.delete(f"{name}/{storage.MANIFEST_NAME}")
            store.delete_prefix(name)
        _barrier()
        state_dict = _consolidated_state_dict(self.engine)
        entries: list[Any] = []
        rng_plain = None
        with ckpt.tempdir() as tmp:
            tmp_path = Path(tmp)
            if state is not None:
                mine = tmp_path / "rank"
                tensors = ckpt.gather_optimizer_tensors(self.named, self.engine.optimizer, self.rank, self.world)
                ckpt.save_tensors(tensors, mine / ckpt.STATE_DIR / f"optimizer-rank-{self.rank:05d}.safetensors")
                rng_plain, rng_tensors = ckpt.rng_state()
                ckpt.save_tensors(rng_tensors, mine / ckpt.STATE_DIR / f"rng-rank-{self.rank:05d}.safetensors")
                entries = ckpt.upload_folder(mine, uri)
            gathered = _gather((entries, rng_plain))
            if self.rank == 0:
                model_dir = tmp_path / "model"
                with _no_progress_bars():
                    self.engine.model.save_pretrained(model_dir, state_dict=state_dict)
                    self.processor.save_pretrained(model_dir)
                write_layout(model_dir, self.s.image_aspect)  # the llava-hf layout every engine loads
                if state is not None:
                    state = {
                        **state,
                        "stage": self.stage,
                        "step": meta["step"],
                        "total_steps": self.total,
                        "world_size": self.world,
                        "engine": self.engine.kind,
                        "optimizer_step": ckpt.optimizer_step_count(self.engine.optimizer),
                        "optimizer_files": [f"{ckpt.STATE_DIR}/optimizer-rank-{r:05d}.safetensors" for r in range(self.world)],
                        "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                         for g in self.engine.scheduler.optimizer.param_groups],
                        "scheduler": scheduler_state(self.engine.scheduler),
                        "rng": {str(r): g[1] for r, g in enumerate(gathered)},
                        "data_digest": self.index.digest(),
                        "recipe": self.recipe.to_dict(),
                    }
                    ckpt.write_json(model_dir / ckpt.STATE_FILE, state)
                all_entries = ckpt.upload_folder(model_dir, uri) + [e for g in gathered for e in g[0]]
                parameters = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.engine.model.parameters())
                store.commit_folder(name, files=sorted(all_entries, key=lambda e: e.path), parameters=parameters, **meta)
        _barrier()
        return uri

    def save(self, step: int, state: dict[str, Any]) -> str:
        uri = self._write(ckpt.checkpoint_name(step), {"kind": ckpt.CHECKPOINT_KIND, "stage": self.stage, "step": step,
                                                        "total_steps": self.total, "made_from": self.made_from}, state)
        if self.rank == 0:
            log.info("%s: checkpoint %s", self.stage, uri)
            ckpt.prune_checkpoints(self.out, max(1, self.s.keep_checkpoints))
        _barrier()
        return uri

    def save_final(self, result: StageResult) -> str:
        meta = {"kind": ckpt.FINAL_KIND, "stage": self.stage, "steps": result.steps, "final_loss": result.final_loss,
                "samples_seen": result.samples_seen, "flagged_samples": result.flagged_samples, "flagged": result.flagged,
                "examples": result.examples, "run_id": result.run_id, "data": self.inputs.data,
                "captions": self.inputs.captions, "init": self.init, "made_from": self.made_from}
        uri = self._write("final", meta, None)
        if self.rank == 0:
            log.info("%s: final model %s", self.stage, uri)
        return uri


def _log_curve_and_samples(stage: str, recipe: Any, s: Any, inputs: StageInputs, result: StageResult,
                           history: list[tuple[int, float]]) -> None:
    """Rank 0, tracking on: the loss curve (PNG) and greedy captions of 4 held-out images."""
    import mlflow
    from matplotlib.figure import Figure

    from sharegpt4v import tracking
    from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
    from sharegpt4v.modeling.builder import load_model
    from sharegpt4v.modeling.inference import InferenceEngine
    from sharegpt4v.modeling.templates import generation_prompt

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot([h[0] for h in history], [h[1] for h in history], linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{stage}: training loss")
    fig.tight_layout()
    mlflow.log_figure(fig, f"{stage}/loss_curve.png")

    images = held_out_images(inputs, 4)
    held_out = True
    if not images:  # no val/test split: show training images, and say so
        from sharegpt4v.data.shards import iter_samples, open_dataset, sample_image

        held_out = False
        for sample in iter_samples(open_dataset(inputs.data[0]).shard_uris()):
            images.append((sample["__key__"], sample_image(sample)[1]))
            if len(images) == 4:
                break
    model, processor = load_model(result.checkpoint_uri)
    engine = InferenceEngine(model, processor, recipe.model, recipe.captioning, aspect=s.image_aspect)
    prompt = generation_prompt(s.template, "" if s.template == "plain" else CAPTION_INSTRUCTION)
    generations = engine.generate([img for _, img in images], [prompt] * len(images), num_beams=1, do_sample=False)
    tracking.log_dict({"stage": stage, "checkpoint": result.checkpoint_uri, "held_out": held_out, "prompt": prompt,
                       "samples": [{"id": sid, "text": g.text, "finish_reason": g.finish_reason}
                                   for (sid, _), g in zip(images, generations)]},
                      f"{stage}/sample_generations.json")

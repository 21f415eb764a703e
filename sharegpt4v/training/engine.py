"""The engine a stage trains with: a plain torch loop or DeepSpeed (ZeRO 0-3), its config and process group."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sharegpt4v.training import checkpoint as ckpt
from sharegpt4v.training.distributed import _dist_on, single_process_env
from sharegpt4v.training.optimizer import make_optimizer, make_scheduler

if TYPE_CHECKING:
    from sharegpt4v.config import RecipeConfig, StageConfig

ENGINE_ENV = "SHAREGPT4V_TRAIN_ENGINE"  # auto (default) | torch | deepspeed


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

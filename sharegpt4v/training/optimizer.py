"""A stage's optimisation from its recipe: step counts, torch's AdamW, the warmup + cosine schedule and its state."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from sharegpt4v.training.freezing import LLM_PREFIXES

if TYPE_CHECKING:
    from sharegpt4v.config import StageConfig


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
    """torch's AdamW (not DeepSpeed's compiled one); no weight decay on biases and norms; the language
    model at `stage.llm_learning_rate` when set (the vision side at `learning_rate`)."""
    llm_lr = stage.learning_rate if stage.llm_learning_rate is None else stage.llm_learning_rate
    groups = []
    for llm, lr in ((False, stage.learning_rate), (True, llm_lr)):
        part = [(n, p) for n, p in named if n.startswith(LLM_PREFIXES) == llm]
        groups += [{"params": [p for _, p in part if p.ndim >= 2], "weight_decay": stage.weight_decay, "lr": lr},
                   {"params": [p for _, p in part if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.learning_rate, betas=(0.9, 0.999), eps=1e-8)


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

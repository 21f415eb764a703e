"""One training loop for the captioner, pretraining and SFT stages, driven by the recipe.

`train_stage(stage, recipe, inputs, out)` builds (or loads) the model, freezes what the stage
keeps frozen, streams its examples, and trains with torch's AdamW, a warmup + cosine schedule,
gradient clipping and gradient accumulation = `recipe.gradient_accumulation_steps(stage)` (the
global batch holds for any number of processes). Several processes, or any ZeRO stage, run
through DeepSpeed (`deepspeed.initialize` with the torch optimizer and scheduler; gloo on CPU);
one process with `zero_stage: 0` runs a plain torch loop (same optimizer, same results).
Checkpoints (see `checkpoint.py`) are written every `save_every_steps`, the newest complete one
is resumed from, `final/` is written at the end. Rank 0 tracks the stage in MLflow.

This module is the loop; its parts live beside it: `optimizer` (step counts, AdamW, schedule),
`freezing`, `engine` (torch or DeepSpeed), `distributed` (rank, collectives), `checkpoint_writer`
(saving from every rank) and `tracking_hooks` (MLflow run, loss curve, sample captions).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import resource
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sharegpt4v.provenance import OutputMismatch, refuse_if_different
from sharegpt4v.training import checkpoint as ckpt
from sharegpt4v.training.checkpoint_writer import _Context
from sharegpt4v.training.data import DataIndex, Position, StageInputs, build_index, iter_batches
from sharegpt4v.training.distributed import _all_sum, _barrier, _dist_on, _gather, _local_first, dist_env
from sharegpt4v.training.engine import _init_deepspeed_dist, _make_engine, use_deepspeed
from sharegpt4v.training.flops import flops_per_sample, peak_flops
from sharegpt4v.training.freezing import apply_freezing
from sharegpt4v.training.optimizer import load_scheduler_state, total_steps
from sharegpt4v.training.tracking_hooks import _log_curve_and_samples, _log_flags, _tracking_run

if TYPE_CHECKING:
    from sharegpt4v.config import RecipeConfig, StageConfig

log = logging.getLogger("sharegpt4v.training")

STAGES = ("captioner", "pretrain", "sft")
FLAGS = ("fully_masked", "truncated", "bad_image")
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


# misc -----------------------------------------------------------------------------------------


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


def as_stage_inputs(inputs: Any) -> StageInputs:
    if isinstance(inputs, StageInputs):
        return inputs
    if isinstance(inputs, str):
        return StageInputs([inputs])
    if isinstance(inputs, dict):
        return StageInputs(**inputs)
    raise TypeError(f"inputs: expected StageInputs, a dict or a dataset URI, got {type(inputs).__name__}")


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
    inputs = as_stage_inputs(inputs)
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


def finished_result(out: str, stage: str, made_from: dict[str, Any]) -> StageResult | None:
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
        done = finished_result(out, stage, made_from)
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

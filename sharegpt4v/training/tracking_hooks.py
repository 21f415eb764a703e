"""What rank 0 reports of a stage: its MLflow run (resumed with it), loss curve, sample captions, flagged samples."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sharegpt4v.training.data import StageInputs, held_out_images

if TYPE_CHECKING:
    from sharegpt4v.training.trainer import StageResult

log = logging.getLogger("sharegpt4v.training")


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

"""MLflow tracking for stages: one run per stage call, params flattened, metrics in batches.

Tracking is on when `MLFLOW_TRACKING_URI` is set (the demo and KFP's MLflow plugin set it);
otherwise the helpers do nothing, so a stage runs the same in a notebook without MLflow.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

DEFAULT_EXPERIMENT = "sharegpt4v"
ARTIFACT_ROOT_ENV = "SHAREGPT4V_MLFLOW_ARTIFACT_ROOT"
_MAX_PARAM_CHARS = 6000  # MLflow's limit for one param value


def tracking_enabled() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


@contextmanager
def stage_run(run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> Iterator[Any]:
    """Start (or nest under the active) MLflow run; yields the run, or None when tracking is off."""
    if not tracking_enabled():
        yield None
        return
    import mlflow

    ensure_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
    with mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None, tags=tags) as run:
        mlflow.log_params({k: str(v)[:_MAX_PARAM_CHARS] for k, v in params.items()})
        yield run


def ensure_experiment(name: str) -> str:
    """Select experiment `name`, creating it under `SHAREGPT4V_MLFLOW_ARTIFACT_ROOT` when set.

    Without a server, MLflow would put artifacts in ./mlruns of whatever folder it runs in.
    """
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        root = os.environ.get(ARTIFACT_ROOT_ENV)
        mlflow.create_experiment(name, artifact_location=f"{root.rstrip('/')}/{name}" if root else None)
    return mlflow.set_experiment(name).experiment_id


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """One batched call for many metrics (a synchronous call costs ~50 ms)."""
    if not tracking_enabled():
        return
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_image(image: Any, artifact_file: str) -> None:
    if not tracking_enabled():
        return
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_image(image, artifact_file)


def log_dict(data: dict[str, Any], artifact_file: str) -> None:
    if not tracking_enabled():
        return
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_dict(data, artifact_file)

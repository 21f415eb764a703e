"""MLflow tracking for stages: one run per stage call, params flattened, metrics in batches.

Tracking is on when `MLFLOW_TRACKING_URI` is set (the demo and KFP's MLflow plugin set it);
otherwise the helpers do nothing, so a stage runs the same in a notebook without MLflow.
A run started with no active run in this process nests under `parent_run_id`, else under
`$SHAREGPT4V_MLFLOW_PARENT_RUN_ID` (a pipeline's run, or a task's run for the processes it
launches); `$MLFLOW_RUN_ID` (set by KFP's MLflow plugin) makes the first run resume that run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sharegpt4v.errors import PlatformError

DEFAULT_EXPERIMENT = "sharegpt4v"
ARTIFACT_ROOT_ENV = "SHAREGPT4V_MLFLOW_ARTIFACT_ROOT"
PARENT_RUN_ENV = "SHAREGPT4V_MLFLOW_PARENT_RUN_ID"  # runs started without an active run nest under this one
_MAX_PARAM_CHARS = 6000  # MLflow's limit for one param value


def tracking_enabled() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


def _mlflow() -> Any:
    """mlflow, pointed at $MLFLOW_TRACKING_URI: the environment decides, not leftover global state."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    return mlflow


def _client() -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None)


@contextmanager
def experiment(name: str) -> Iterator[None]:
    """Runs started inside the block go to experiment `name`; the previous choice comes back after."""
    previous = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    os.environ["MLFLOW_EXPERIMENT_NAME"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = previous


@contextmanager
def stage_run(run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, log_system_metrics: bool | None = None) -> Iterator[Any]:
    """Start (or nest under the active) MLflow run; yields the run, or None when tracking is off.

    With no active run, the new run nests under `parent_run_id` or `$SHAREGPT4V_MLFLOW_PARENT_RUN_ID`.
    Params and tags are recorded without credentials in any URL they hold (`redacted`).
    `log_system_metrics=True`: MLflow samples CPU, memory, disk, network (and GPU where
    `nvidia-ml-py` is installed) into `system/...` metrics while the run is open.
    """
    if not tracking_enabled():
        yield None
        return
    mlflow = _mlflow()

    ensure_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
    active = mlflow.active_run() is not None
    parent = None if active else (parent_run_id or os.environ.get(PARENT_RUN_ENV) or None)
    tags = redacted(tags, limit=None) if tags else tags
    with mlflow.start_run(run_name=run_name, nested=active, parent_run_id=parent, tags=tags,
                          log_system_metrics=log_system_metrics) as run:
        mlflow.log_params(redacted(params))
        yield run


def redacted(values: dict[str, Any], limit: int | None = _MAX_PARAM_CHARS) -> dict[str, str]:
    """Param (or tag) values as MLflow should record them: strings, with credentials cut out of any URL
    in them (userinfo, secret query parameters: see `sharegpt4v.redact`), at most `limit` characters."""
    from sharegpt4v.redact import redact_text

    return {k: redact_text(str(v))[:limit] for k, v in values.items()}


def ensure_experiment(name: str) -> str:
    """Select experiment `name`, creating it under `SHAREGPT4V_MLFLOW_ARTIFACT_ROOT` when set.

    Without a server, MLflow would put artifacts in ./mlruns of whatever folder it runs in.
    """
    mlflow = _mlflow()

    from mlflow.exceptions import MlflowException

    if mlflow.get_experiment_by_name(name) is None:
        root = os.environ.get(ARTIFACT_ROOT_ENV)
        try:
            mlflow.create_experiment(name, artifact_location=f"{root.rstrip('/')}/{name}" if root else None)
        except MlflowException as exc:  # another process created it between our lookup and create
            if "already exists" not in str(exc).lower():
                raise
    return mlflow.set_experiment(name).experiment_id


def _active_run_mlflow() -> Any | None:
    """The mlflow module when tracking is on and a run is active (the log_* calls below are no-ops otherwise)."""
    if not tracking_enabled():
        return None
    mlflow = _mlflow()
    return mlflow if mlflow.active_run() is not None else None


def log_metrics(metrics: dict[str, float], step: int | None = None, model_id: str | None = None) -> None:
    """One batched call for many metrics (a synchronous call costs ~50 ms). `model_id`: an MLflow 3
    LoggedModel the metrics are about (`logged_model_id`): the model's page and its registered
    versions show them."""
    if (mlflow := _active_run_mlflow()) is not None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, model_id=model_id)


def log_model_input(model_id: str) -> None:
    """Record an MLflow 3 LoggedModel as an input of the active run (the model an evaluation scores)."""
    if (mlflow := _active_run_mlflow()) is not None:
        from mlflow.entities import LoggedModelInput

        _client().log_inputs(mlflow.active_run().info.run_id, models=[LoggedModelInput(model_id)])


def log_image(image: Any, artifact_file: str) -> None:
    if (mlflow := _active_run_mlflow()) is not None:
        mlflow.log_image(image, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    if (mlflow := _active_run_mlflow()) is not None:
        mlflow.log_text(text, artifact_file)


def log_dict(data: dict[str, Any], artifact_file: str) -> None:
    if (mlflow := _active_run_mlflow()) is not None:
        mlflow.log_dict(data, artifact_file)


# Model registry and lineage ------------------------------------------------------------------

# Registered model per stage: what each stage's output is called in the MLflow registry.
REGISTERED_MODELS = {
    "base": "sharegpt4v-base",  # pretrained on brief captions (LLaVA-1.5's stage): what the captioner starts from
    "captioner": "sharegpt4v-captioner",
    "pretrain": "sharegpt4v-pretrained",
    "sft": "sharegpt4v-chat",
}


def register_checkpoint(
    stage: str,
    checkpoint_uri: str,
    run_id: str | None = None,
    lineage: dict[str, str] | None = None,
    aliases: tuple[str, ...] = ("candidate",),
    description: str | None = None,
) -> dict[str, str]:
    """Register a stage's checkpoint (a folder or s3:// prefix with a manifest) as a model version.

    The version is an MLflow model (`sharegpt4v.serving.pyfunc`): a LoggedModel, output of `run_id`
    when given, whose pyfunc loads the checkpoint where it is (no copy of the weights in MLflow), so
    `mlflow.pyfunc.load_model("models:/<name>@<alias>")` answers (image, prompt) rows. The version
    (and the LoggedModel) carry the tags `stage`, `checkpoint` and `lineage.<key>`, e.g.
    `parent_model` ("sharegpt4v-pretrained/3"), `dataset` (a shard manifest URI), `dataset_digest`,
    `captions` (a caption-set URI). Returns {"name", "version", "uri", "model_id"} where `uri` is
    `models:/<name>/<version>` and `model_id` the LoggedModel's id.
    """
    from mlflow.exceptions import MlflowException

    from sharegpt4v.serving.pyfunc import log_checkpoint_model

    _mlflow()  # the registry resolves `models:/<model id>` sources through mlflow's own tracking URI
    client = _client()
    name = REGISTERED_MODELS[stage]
    tags = redacted({"stage": stage, "checkpoint": checkpoint_uri,
                     **{f"lineage.{k}": v for k, v in (lineage or {}).items()}}, None)
    try:
        try:
            client.create_registered_model(name, description=f"ShareGPT4V recipe: {stage} stage output")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(exc).lower():
                raise
        experiment_id = (client.get_run(run_id).info.experiment_id if run_id
                         else ensure_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT))
        logged = log_checkpoint_model(client, name, stage, tags["checkpoint"], run_id, tags, experiment_id)
        version = client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=run_id, tags=tags,
                                              description=description, model_id=logged.model_id)
        # the LoggedModel's page links its registered versions (what mlflow.register_model records)
        client.set_logged_model_tags(logged.model_id, {"mlflow.modelVersions": json.dumps(
            [{"name": name, "version": str(version.version)}])})
        for alias in aliases:
            client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as exc:
        raise mlflow_error(f"registering {checkpoint_uri} as model {name!r}", exc) from exc
    return {"name": name, "version": str(version.version), "uri": f"models:/{name}/{version.version}",
            "model_id": logged.model_id}


def version_checkpoint(version: Any) -> str:
    """The checkpoint a registered version serves: its `checkpoint` tag (versions registered before
    they were MLflow models have the checkpoint as their source)."""
    return (version.tags or {}).get("checkpoint") or version.source


def version_model_id(version: Any) -> str | None:
    """The MLflow 3 LoggedModel id of a registered version (None for a version that is no MLflow model)."""
    if getattr(version, "model_id", None):
        return str(version.model_id)
    source = str(version.source or "")
    if source.startswith("models:/m-") and "/" not in source[len("models:/"):]:
        return source[len("models:/"):]
    return None


def is_not_found(exc: BaseException) -> bool:
    """The tracking server answered that the run / model / version does not exist (not: it failed)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def mlflow_error(what: str, exc: BaseException) -> PlatformError:
    """One line for a failed MLflow call: what was being done, where, and the cause (the connection
    failure, or the first line of the error, without credentials in any URL it quotes)."""
    from sharegpt4v.errors import connection_failure, first_line
    from sharegpt4v.redact import redact_text

    where = redact_text(os.environ.get("MLFLOW_TRACKING_URI") or "MLflow")
    unreachable = connection_failure(exc)
    if unreachable:
        return PlatformError(f"{what}: cannot reach the MLflow server at {where}: {unreachable}")
    cause = redact_text(first_line(exc))[:500]
    code = getattr(exc, "error_code", None)
    if code and code not in cause:
        cause = f"{code}: {cause}"
    return PlatformError(f"{what}: MLflow at {where} failed: {cause}")


def stage_lineage(parent: dict[str, str], init: str | None, dataset: str, dataset_digest: str,
                  captions: str | None = None, captions_digest: str | None = None,
                  pipeline_run: str | None = None) -> dict[str, str]:
    """The lineage tags of a stage's model version: the model it started from (a registered
    version, else the init checkpoint, else "built from config"), its data and caption set with
    their manifest digests, and the pipeline run that made it."""
    lineage = {
        "parent_model": f"{parent['name']}/{parent['version']}" if parent else (init or "built from config"),
        "dataset": dataset, "dataset_digest": dataset_digest,
    }
    if captions:
        lineage.update(captions=captions, captions_digest=captions_digest or "")
    if pipeline_run:
        lineage["pipeline_run"] = pipeline_run
    return lineage


def promote(name: str, version: str, alias: str = "champion") -> None:
    _client().set_registered_model_alias(name, alias, version)


MODEL_REF_FORMS = "models:/<name>@<alias> or models:/<name>/<version>"


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None] | None:
    """`models:/name@alias` -> (name, alias, None), `models:/name/3` -> (name, None, "3"); None for
    anything that is not a `models:/` reference. A malformed one is a `UsageError` naming the forms."""
    from sharegpt4v.errors import UsageError

    if not ref.startswith("models:/"):
        return None
    body = ref[len("models:/") :]
    name, at, alias = body.partition("@")
    if at:
        if name and alias and "/" not in name and not any(c in alias for c in "/@"):
            return name, alias, None
    else:
        parts = body.split("/")
        if len(parts) == 2 and parts[0] and parts[1].isdigit():
            return parts[0], None, parts[1]
    raise UsageError(f"{ref}: not a registered model reference; expected {MODEL_REF_FORMS}")


def resolve_model(ref: str) -> tuple[str, dict[str, str]]:
    """`models:/name@alias` or `models:/name/version` -> (checkpoint URI, {"name", "version"});
    anything else is already a checkpoint URI (folder or s3:// prefix) and is returned as is.

    A malformed reference is a `UsageError`; no `MLFLOW_TRACKING_URI` (MLflow would otherwise make a
    registry in ./mlflow.db), an unreachable server or a missing model or alias a one-line `PlatformError`.
    """
    parsed = parse_model_ref(ref)
    if parsed is None:
        return ref, {}
    version = registered_version(ref)
    return version_checkpoint(version), {"name": parsed[0], "version": str(version.version)}


def logged_model_id(ref: str | None) -> str | None:
    """The MLflow 3 LoggedModel behind `ref` when it is a `models:/` reference to a version that is an
    MLflow model (metrics logged with it show per version in the registry); None otherwise."""
    if not ref or not tracking_enabled() or not ref.startswith("models:/"):
        return None
    return version_model_id(registered_version(ref))


def registered_version(ref: str) -> Any:
    """The registry's ModelVersion for a `models:/` reference (errors as `resolve_model` describes)."""
    from sharegpt4v.errors import PlatformError, connection_failure, first_line
    from sharegpt4v.redact import redact_text

    parsed = parse_model_ref(ref)
    if parsed is None:
        raise ValueError(f"{ref}: not a models:/ reference")
    name, alias, number = parsed
    if not tracking_enabled():
        raise PlatformError(f"{ref}: a registered model needs the MLflow registry; set MLFLOW_TRACKING_URI "
                            "(e.g. http://mlflow.sharegpt4v:5000), or give a checkpoint folder or s3:// prefix")
    uri = redact_text(os.environ["MLFLOW_TRACKING_URI"])
    try:
        client = _client()
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except Exception as exc:
        cause = connection_failure(exc)
        if cause:
            raise PlatformError(f"{ref}: cannot reach the MLflow server at {uri}: {cause}") from exc
        if not type(exc).__module__.startswith(("mlflow", "requests", "urllib3", "sqlalchemy")):
            raise
        message = redact_text(first_line(exc))
        if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" or "not found" in message.lower():
            raise PlatformError(f"{ref}: not in the MLflow registry at {uri} ({message})") from exc
        raise PlatformError(f"{ref}: the MLflow registry at {uri} failed: {message}") from exc


def log_dataset(uri: str, digest: str, context: str, name: str | None = None) -> None:
    """Record a dataset input of the active run (shard or caption-set manifest URI + digest)."""
    if not tracking_enabled():
        return
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.exceptions import MlflowException

    mlflow = _mlflow()
    if mlflow.active_run() is None:
        return
    with warnings.catch_warnings():  # a local path matches two equivalent local source types
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)  # S3 or local artifact source: recorded, never downloaded
    dataset = MetaDataset(source=source, name=name or uri.rstrip("/").rsplit("/", 1)[-1], digest=digest[:36])
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as exc:
        # Two runs logging the same new dataset at once race on its unique row (seen with sqlite);
        # the loser's retry finds the row the winner wrote.
        if "UNIQUE constraint" not in str(exc) and "already exists" not in str(exc).lower():
            raise
        mlflow.log_input(dataset, context=context)

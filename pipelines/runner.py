"""Compile, check, run locally and submit the pipelines.

    compile_all()                      -> {name: path}: the IR YAML under pipelines/compiled/
    check_compiled()                   -> [problems]: committed YAML == what the code compiles to,
                                          and each file parses as the KFP PipelineSpec/PlatformSpec
    run_local(workdir, ...)            -> dict: the end-to-end pipeline with kfp.local in this
                                          environment, on embedded S3 + MLflow (or the ones in env)
    submit(host, ...)                  -> dict: a run (or a recurring run) on a KFP endpoint
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sharegpt4v.environment import patched_environ
from sharegpt4v.errors import PlatformError

COMPILED_DIR = Path(__file__).resolve().parent / "compiled"
BUCKET = "sharegpt4v"
LOCAL_EXPERIMENT = "sharegpt4v"


class PipelineError(PlatformError):
    """A pipeline could not be compiled, run or submitted (the CLI prints it as one line)."""


# compile and check ----------------------------------------------------------------------------------


def _pipelines() -> dict[str, Any]:
    from pipelines.definitions import PIPELINES

    return PIPELINES


def compile_pipeline(name: str, path: str | Path) -> Path:
    from kfp import compiler

    if name not in _pipelines():
        raise PipelineError(f"pipeline {name!r}: choose one of {', '.join(_pipelines())}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(_pipelines()[name], str(path))
    return path


def compile_all(out_dir: str | Path = COMPILED_DIR) -> dict[str, Path]:
    return {name: compile_pipeline(name, Path(out_dir) / f"{name}.yaml") for name in _pipelines()}


def parse_ir(path: str | Path) -> tuple[Any, Any]:
    """(PipelineSpec, PlatformSpec) protobufs of a compiled file; strict: unknown fields fail."""
    import yaml
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    docs = list(yaml.safe_load_all(Path(path).read_text()))
    if len(docs) != 2:
        raise PipelineError(f"{path}: expected 2 YAML documents (pipeline spec, platform spec), found {len(docs)}")
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    return spec, platform


def check_compiled(out_dir: str | Path = COMPILED_DIR) -> list[str]:
    """Problems with the committed IR YAML (empty when it is up to date and valid)."""
    problems = []
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="sharegpt4v-ir-") as tmp:
        fresh = compile_all(tmp)
        for name, path in fresh.items():
            committed = out_dir / path.name
            if not committed.exists():
                problems.append(f"{committed}: missing (run `sharegpt4v pipeline compile`)")
                continue
            if committed.read_text() != path.read_text():
                problems.append(f"{committed}: out of date with pipelines/definitions.py (run `sharegpt4v pipeline compile`)")
            try:
                parse_ir(committed)
            except Exception as exc:  # a parse error names the field
                problems.append(f"{committed}: not a valid PipelineSpec/PlatformSpec: {exc}")
        extra = sorted(p.name for p in out_dir.glob("*.yaml") if p.stem not in fresh)
        problems += [f"{out_dir / name}: no pipeline of that name in the code" for name in extra]
    return problems


# local runs --------------------------------------------------------------------------------------


def local_parameters(images: int, seed: int, profile: str, overrides: list[str] | tuple[str, ...], shard_groups: int,
                     champion_threshold: float, output_root: str) -> dict[str, Any]:
    """The `sharegpt4v` pipeline's arguments for a local run: a synthetic world, the synthetic teacher,
    one process per task (tasks run on this machine's CPU)."""
    return {"output_root": output_root, "world_images": images, "world_seed": seed, "profile": profile,
            "overrides": list(overrides), "teacher_endpoint": "synthetic", "shard_groups": shard_groups,
            "train_gpus": 1, "caption_gpus": 1, "eval_gpus": 1, "champion_threshold": champion_threshold,
            "export_kind": "KIND_CPU", "serving_profile": "dev", "deploy_dry_run": True,
            "mlflow_experiment": LOCAL_EXPERIMENT}


def run_local(workdir: str | Path, *, images: int = 96, seed: int = 0, profile: str = "tiny",
              overrides: list[str] | tuple[str, ...] = (), shard_groups: int = 2, champion_threshold: float = 0.0,
              start_services: bool = True, output_root: str | None = None,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the end-to-end `sharegpt4v` pipeline with kfp.local in this environment; returns its outputs.

    With `start_services`, embedded S3 (SeaweedFS) and MLflow (sqlite) run under `workdir` for the
    duration; otherwise the S3 and MLflow of the environment are used (call it inside
    `sharegpt4v.services.local_services` to keep them up for what comes next, e.g. serving).
    The pipeline's MLflow run is created first, so every task nests under it; it ends FINISHED,
    or FAILED when a task failed (then PipelineError is raised).

    Returns {"world", "caption_sets", "models", "eval", "champion", "model_repository", "deploy",
    "mlflow_run_id", "kfp_run", "workdir", "minutes"}.
    """
    from sharegpt4v.services import local_services

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if not start_services:
        return _run_local(workdir, images, seed, profile, overrides, shard_groups, champion_threshold, output_root,
                          extra)
    with local_services(workdir, buckets=(BUCKET,)):
        return _run_local(workdir, images, seed, profile, overrides, shard_groups, champion_threshold, output_root,
                          extra)


def _run_local(workdir: Path, images: int, seed: int, profile: str, overrides: Any, shard_groups: int,
               threshold: float, output_root: str | None, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    from kfp import dsl, local

    from components.resources import local_build
    from pipelines.definitions import sharegpt4v
    from sharegpt4v import tracking

    started = time.perf_counter()
    params = {**local_parameters(images, seed, profile, overrides, shard_groups, threshold,
                                 output_root or f"s3://{BUCKET}/pipeline"), **(extra or {})}
    kfp_dir = workdir / "kfp"
    root = kfp_dir / "outputs"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               workspace_root=str(kfp_dir / "workspace"), raise_on_error=True)
    before = set(root.glob("*")) if root.exists() else set()
    run_id = None
    if tracking.tracking_enabled():
        experiment_id = tracking.ensure_experiment(params["mlflow_experiment"])
        run_id = tracking._client().create_run(experiment_id, run_name="sharegpt4v-local",
                                               tags={"kfp.runner": "local"}).info.run_id
    # tasks (subprocesses) nest under the pipeline's run
    with patched_environ({"TOKENIZERS_PARALLELISM": "false", **({tracking.PARENT_RUN_ENV: run_id} if run_id else {})}):
        with local_build():  # the same DAG, without retry backoffs (see components.resources.local_build)
            pipeline = dsl.pipeline(name=sharegpt4v.name, description=sharegpt4v.description)(sharegpt4v.pipeline_func)
        try:
            with kfp_local_globals_restored():
                pipeline(**params)
        except RuntimeError as exc:
            raise PipelineError(f"the local pipeline failed: {str(exc).splitlines()[0]}") from exc
    runs = sorted(set(root.glob("*")) - before, key=lambda p: p.stat().st_mtime)
    if not runs:
        raise PipelineError(f"{root}: the local run left no outputs")
    outputs = collect_outputs(runs[-1])
    return {**summarize(outputs), "mlflow_run_id": run_id, "kfp_run": str(runs[-1]), "workdir": str(workdir),
            "minutes": (time.perf_counter() - started) / 60}


@contextlib.contextmanager
def kfp_local_globals_restored() -> Any:
    """Put back `print` and the root logger as they were before a kfp.local run.

    kfp.local swaps `builtins.print` (to indent task logs) and the root logger's handlers around
    each task; the tasks of a ParallelFor run in threads and undo those swaps out of order, which
    can leave every later `print` of the process indented by four spaces (kfp 2.17).
    """
    root = logging.getLogger()
    saved_print, saved_handlers, saved_level = builtins.print, root.handlers[:], root.level
    try:
        yield
    finally:
        builtins.print = saved_print
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def collect_outputs(run_dir: Path) -> dict[str, Any]:
    """Outputs of each task of a local run, by task name (loop iterations as a list): parameters, the
    values of Metrics artifacts and the local path of other artifacts (e.g. an HTML report)."""
    outputs: dict[str, Any] = {}
    for path in sorted(run_dir.rglob("executor_output.json")):
        task = path.parent.name
        executor_output = json.loads(path.read_text())
        values = {}
        for name, entry in executor_output.get("artifacts", {}).items():  # Metrics: their values; others: the file
            for artifact in entry.get("artifacts", [])[:1]:
                values[name] = artifact.get("metadata") or artifact.get("uri")
        values.update(executor_output.get("parameterValues", {}))
        if any(part.startswith("for-loop-") for part in path.relative_to(run_dir).parts[:-2]):
            outputs.setdefault(task, []).append(values)
        else:
            outputs[task] = values
    return outputs


def summarize(outputs: dict[str, Any]) -> dict[str, Any]:
    """What a user asks of an end-to-end run: data, caption sets, model versions, evaluation, serving."""
    world = outputs.get("synthetic-world") or outputs.get("ingest") or {}
    models = {}
    for task, stage in (("train-base", "base"), ("train-captioner", "captioner"), ("pretrain", "pretrain"),
                        ("sft", "sft")):
        if task in outputs:
            out = outputs[task]
            models[stage] = {k: out.get(k, "") for k in ("model_uri", "checkpoint_uri", "version", "digest")}
    ev = outputs.get("evaluate", {})
    table = None
    if ev.get("out"):
        from sharegpt4v import storage

        table = storage.open_store(ev["out"]).get_bytes("results.md").decode()
    return {
        "world": world.get("uri"),
        "overrides": outputs.get("foundations", {}).get("Output"),
        "caption_sets": {"seed": outputs.get("seed-captions", {}).get("uri"),
                         "corpus": outputs.get("merge-captions", {}).get("uri")},
        "caption_groups": [g.get("Output", g) for g in outputs.get("caption-shard-group", [])],
        "caption_report": {k: outputs.get("merge-captions", {}).get(k) for k in ("report", "metrics")},
        "models": models,
        "eval": {"score": ev.get("score"), "metrics": ev.get("results", {}), "table": table, "out": ev.get("out")},
        "champion": outputs.get("promote", {}).get("Output"),
        "model_repository": outputs.get("export-model-repository", {}).get("uri"),
        "deploy": outputs.get("deploy", {}).get("Output"),  # "dry-run", "created" or "patched"
    }


# submission -----------------------------------------------------------------------------------------


def submit(host: str, *, pipeline: str = "sharegpt4v", arguments: Mapping[str, Any] | None = None,
           experiment: str = "sharegpt4v", run_name: str | None = None, recurring: str | None = None,
           namespace: str | None = None, token: str | None = None, service_account: str | None = None,
           enable_caching: bool | None = None, max_concurrency: int = 1) -> dict[str, Any]:
    """Create a run of `pipeline` (its committed IR YAML) in `experiment` on the KFP API at `host`,
    or, with `recurring` (a 6-field KFP cron expression, seconds first), a recurring run.

    `token`: a bearer token for a KFP behind auth (default: $KFP_TOKEN). Returns the ids and URLs.
    An unknown pipeline is a `UsageError`; an API that cannot be reached or refuses is a one-line
    `PipelineError` naming the host (without credentials).
    """
    import warnings

    import kfp

    from sharegpt4v.errors import UsageError, connection_failure, first_line
    from sharegpt4v.redact import redact_url

    path = COMPILED_DIR / f"{pipeline}.yaml"
    if not path.exists():
        raise UsageError(f"{path}: no compiled pipeline {pipeline!r} (known: {', '.join(_pipelines())})")
    where = f"the Kubeflow Pipelines API at {redact_url(host)}"
    try:
        # kfp prints links (stdout stays for the result) and warns that it needs KFP v2 (one line is all there is)
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"kfp\.")
            return _submit(kfp, host, path, pipeline, dict(arguments or {}), experiment, run_name, recurring, namespace,
                           token, service_account, enable_caching, max_concurrency)
    except PlatformError:
        raise
    except Exception as exc:
        cause = connection_failure(exc)
        if cause:
            raise PipelineError(f"cannot reach {where}: {cause}") from exc
        status = getattr(exc, "status", None)
        if type(exc).__module__.startswith("kfp_server_api") and status:
            message = _api_message(exc)
            answer = f"{status} {getattr(exc, 'reason', None) or ''}".strip() + (f": {message}" if message else "")
            raise PipelineError(f"{where} answered HTTP {answer}") from exc
        if isinstance(exc, TimeoutError) and "healthz" in str(exc):
            raise PipelineError(f"{where} failed its health check ({first_line(exc)}); "
                                "is --host the KFP API endpoint?") from exc
        raise


def _api_message(exc: BaseException) -> str:
    """The error message in a KFP API error's JSON body, else nothing."""
    try:
        body = json.loads(getattr(exc, "body", None) or "{}")
    except (TypeError, ValueError):
        return ""
    message = (body.get("error_message") or body.get("message") or "") if isinstance(body, dict) else ""
    return str(message).splitlines()[0] if message else ""


def _submit(kfp: Any, host: str, path: Path, pipeline: str, args: dict[str, Any], experiment: str, run_name: str | None,
            recurring: str | None, namespace: str | None, token: str | None, service_account: str | None,
            enable_caching: bool | None, max_concurrency: int) -> dict[str, Any]:
    client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token or os.environ.get("KFP_TOKEN"))
    name = run_name or f"{pipeline}-{time.strftime('%Y%m%d-%H%M%S')}"
    if recurring:
        exp = client.create_experiment(experiment, namespace=namespace)
        job = client.create_recurring_run(exp.experiment_id, name, cron_expression=recurring, params=args,
                                          pipeline_package_path=str(path), max_concurrency=max_concurrency,
                                          enable_caching=enable_caching, service_account=service_account)
        return {"recurring_run_id": job.recurring_run_id, "experiment_id": exp.experiment_id, "name": name,
                "cron": recurring}
    result = client.create_run_from_pipeline_package(str(path), arguments=args, run_name=name,
                                                     experiment_name=experiment, namespace=namespace,
                                                     enable_caching=enable_caching, service_account=service_account)
    return {"run_id": result.run_id, "name": name, "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}"}


def parse_arguments(items: list[str]) -> dict[str, Any]:
    """NAME=VALUE pairs; a VALUE that parses as JSON (numbers, true/false, lists) is taken as such."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise PipelineError(f"argument {item!r}: expected NAME=VALUE")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out

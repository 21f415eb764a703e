"""What each pipeline task does, as plain functions over URIs (no `kfp` import).

A KFP component body (`components/stages.py`) imports this module and calls one function; tests,
notebooks and the CLI can call the same functions directly. Each function wraps one core stage
(`sharegpt4v.world`, `.data`, `.captioning`, `.training`, `.evaluation`, `.tracking`, `.serving`)
and adds only what a pipeline task needs around it:

- its MLflow run, nested under the pipeline's run (`task_run`);
- content-keyed output folders: a task's output folder is named after the digests of its inputs
  and its recipe, so a rerun with the same inputs resumes or reuses its work (training resumes
  from its newest checkpoint, captioning skips finished shards) and changed inputs never mix with
  old outputs;
- a small JSON-able result (URIs, digests, counts, metrics) that the component returns to KFP.

The pipeline's MLflow run is found, in this order: the parent of `$MLFLOW_RUN_ID` (KFP's MLflow
plugin creates one nested run per task and injects its id), `$SHAREGPT4V_MLFLOW_PARENT_RUN_ID`
(the local runner creates the run before the pipeline starts), or the run tagged with this KFP
run's id (`$KFP_RUN_ID`, from the pod's `pipeline/runid` label; the start task creates it).
Nothing here takes the pipeline run's id as an input, so tasks stay cacheable across runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

from sharegpt4v import storage, tracking
from sharegpt4v.config import RecipeConfig, load_recipe
from sharegpt4v.environment import patched_environ

KFP_RUN_ID_ENV = "KFP_RUN_ID"
RUN_TAG = "kfp.run_id"  # tag of the pipeline's MLflow run: the KFP run id
SYNTHETIC_TEACHER = "synthetic"  # teacher_endpoint value: the synthetic world's stand-in teacher, in process


# small helpers ----------------------------------------------------------------------------------


def recipe_of(profile: str, overrides: list[str] | None) -> RecipeConfig:
    return load_recipe(profile, [str(o) for o in (overrides or [])])


def content_key(*parts: Any) -> str:
    """12 hex digits naming an output folder after everything that determines its content."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def folder_digest(uri: str) -> str:
    """Digest of a complete folder's manifest (dataset, caption set, model repository)."""
    return storage.manifest_digest(storage.open_store(uri).read_manifest())[:16]


def _model(ref: str) -> tuple[str, dict[str, str], str]:
    """(checkpoint URI, registry version or {}, checkpoint digest) of a checkpoint or models:/ reference."""
    from sharegpt4v.modeling.builder import checkpoint_digest

    checkpoint, version = tracking.resolve_model(ref)
    return checkpoint, version, checkpoint_digest(checkpoint)


def _numbers(tree: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in tree.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# MLflow: the pipeline's run and one nested run per task -------------------------------------------


def _client() -> Any:
    return tracking._client()


def find_pipeline_run(kfp_run_id: str = "") -> str | None:
    """The pipeline's MLflow run id (see the module docstring), or None."""
    if not tracking.tracking_enabled():
        return None
    client = _client()
    plugin_run = os.environ.get("MLFLOW_RUN_ID")
    if plugin_run:
        return client.get_run(plugin_run).data.tags.get("mlflow.parentRunId") or plugin_run
    if os.environ.get(tracking.PARENT_RUN_ENV):
        return os.environ[tracking.PARENT_RUN_ENV]
    kfp_run_id = kfp_run_id or os.environ.get(KFP_RUN_ID_ENV, "")
    if not kfp_run_id:
        return None
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{RUN_TAG}` = '{kfp_run_id}'", max_results=1,
                              order_by=["attributes.start_time ASC"]) if experiments else []
    return runs[0].info.run_id if runs else None


@contextlib.contextmanager
def task_run(name: str, params: dict[str, Any]) -> Iterator[Any]:
    """This task's MLflow run: the plugin's run for the task, or a new run nested under the pipeline's.

    Stage runs started inside nest under it, in this process (active run) and in processes it
    launches (torchrun ranks: `$SHAREGPT4V_MLFLOW_PARENT_RUN_ID`). Yields None without tracking.
    """
    if not tracking.tracking_enabled():
        yield None
        return
    client = _client()
    plugin_run = os.environ.get("MLFLOW_RUN_ID")  # mlflow.start_run resumes it and removes it from os.environ
    parent = None if plugin_run else find_pipeline_run()
    anchor = plugin_run or parent
    experiment = (client.get_experiment(client.get_run(anchor).info.experiment_id).name if anchor
                  else os.environ.get("MLFLOW_EXPERIMENT_NAME") or tracking.DEFAULT_EXPERIMENT)
    with tracking.experiment(experiment), patched_environ({tracking.PARENT_RUN_ENV: None}):
        with tracking.stage_run(name, params, tags={"kfp.task": name}, parent_run_id=parent) as run:
            with patched_environ({tracking.PARENT_RUN_ENV: run.info.run_id}):
                yield run


def start_pipeline_run(pipeline: str, kfp_run_id: str, kfp_run_name: str, params: dict[str, Any],
                       experiment: str = tracking.DEFAULT_EXPERIMENT) -> str:
    """Create (or adopt) the pipeline's MLflow run and record the KFP run and the pipeline parameters.

    Adopted: the plugin's run (parent of `$MLFLOW_RUN_ID`) or the local runner's
    (`$SHAREGPT4V_MLFLOW_PARENT_RUN_ID`); a retried start finds its own run by the KFP run id.
    The run stays RUNNING until `finish_pipeline_run`. Returns its id ("" without tracking).
    With a `profile` in `params`, the training stages' per-GPU memory is printed first and a plan
    that cannot fit is refused here, before any GPU task is scheduled.
    """
    if params.get("profile"):
        check_training_plan(str(params["profile"]), str(params.get("overrides") or "").split(),
                            gpu_count(params.get("train_gpus")))
    if not tracking.tracking_enabled():
        return ""
    client = _client()
    run_id = find_pipeline_run(kfp_run_id)
    if run_id is None:
        with tracking.experiment(experiment):
            experiment_id = tracking.ensure_experiment(experiment)
        run_id = client.create_run(experiment_id, run_name=kfp_run_name or pipeline).info.run_id
    tags = {RUN_TAG: kfp_run_id, "kfp.run_name": kfp_run_name, "kfp.pipeline": pipeline}
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    from mlflow.entities import Param

    logged = client.get_run(run_id).data.params
    fresh = [Param(f"pipeline.{k}", v) for k, v in sorted(tracking.redacted(params).items())
             if f"pipeline.{k}" not in logged]
    if fresh:
        client.log_batch(run_id, params=fresh)
    return run_id


def gpu_count(value: Any) -> int:
    """A GPU count as a pipeline parameter reaches a task inside a dict (`params`): 8, 8.0, "8" or "8.0" (kfp's
    local runner renders an integer parameter in a dict as the text of a float); None or "" is 0."""
    number = float(value or 0)
    if not number.is_integer() or number < 0:
        raise ValueError(f"{value!r} is not a GPU count")
    return int(number)


def check_training_plan(profile: str, overrides: list[str], train_gpus: int = 0) -> list[Any]:
    """Print each training stage's per-GPU memory; refuse (one line) a plan that cannot fit.

    `train_gpus`: the processes a one-node train task launches in its pod; a multi-node recipe trains as a
    TrainJob on its own `num_nodes x gpus_per_node` GPUs, so its plan is the recipe's."""
    from sharegpt4v.training.memory import check_memory_fit, format_plan, memory_plan
    from sharegpt4v.training.run import on_one_node

    recipe = recipe_of(profile, overrides)
    if train_gpus and recipe.compute.num_nodes == 1:  # the pod's processes, as launch runs them
        recipe = on_one_node(recipe, train_gpus)
    print(format_plan(memory_plan(recipe), recipe.compute.device), end="", flush=True)
    return check_memory_fit(recipe)


def train_task_resources(profile: str, overrides: list[str] | None, train_gpus: Any, train_size: dict[str, str],
                         follow_size: dict[str, str]) -> dict[str, Any]:
    """What a train task's pod asks for: {"train_gpus": GPU count, "train_cpu": CPU, "train_memory": memory}.

    A one-node recipe trains in the task's pod: `train_gpus` GPUs and `train_size` ({"cpu": "64", "memory":
    "800Gi"}). A multi-node recipe (`compute.num_nodes > 1`) trains as a TrainJob on its own `num_nodes x
    gpus_per_node` GPUs and the task's pod only creates and follows it (`train`): no GPU and `follow_size`, so
    the waiting pod holds nothing the TrainJob needs."""
    multi_node = recipe_of(profile, overrides).compute.num_nodes > 1
    size = follow_size if multi_node else train_size
    return {"train_gpus": 0 if multi_node else gpu_count(train_gpus), "train_cpu": str(size["cpu"]),
            "train_memory": str(size["memory"])}


def finish_pipeline_run(kfp_run_id: str, state: str, error: str = "") -> str:
    """Mark the pipeline's MLflow run FINISHED (the KFP run succeeded) or FAILED; returns the status set.

    A run that did not succeed (failed, cancelled) first deletes the unfinished TrainJobs it started
    (labelled with its KFP run id), when this runs in a pod; a failed clean-up is raised after the MLflow run
    is marked, so the exit handler's task shows it.
    """
    cleanup_error = _stop_trainjobs(kfp_run_id, state)
    status = _mark_pipeline_run(kfp_run_id, state, error)
    if cleanup_error is not None:
        raise cleanup_error
    return status


def _stop_trainjobs(kfp_run_id: str, state: str) -> Exception | None:
    from sharegpt4v.training.trainjob import cleanup_trainjobs, in_cluster

    if state.upper() == "SUCCEEDED" or not kfp_run_id or not in_cluster():
        return None
    try:
        cleanup_trainjobs(kfp_run_id)
    except Exception as exc:  # the API server unreachable, not allowed: the MLflow run is marked all the same
        print(f"exit handler: {exc}", flush=True)
        return exc
    return None


def _mark_pipeline_run(kfp_run_id: str, state: str, error: str) -> str:
    run_id = find_pipeline_run(kfp_run_id)
    if run_id is None:
        return "none"
    client = _client()
    status = "FINISHED" if state.upper() == "SUCCEEDED" else "FAILED"
    client.set_tag(run_id, "kfp.state", state)
    if error:
        client.set_tag(run_id, "kfp.error", tracking.redacted({"error": error}, 5000)["error"])
    client.set_terminated(run_id, status)
    return status


# data ----------------------------------------------------------------------------------------------


def synthetic_world(out_root: str, images: int, seed: int, profile: str, overrides: list[str] | None) -> dict[str, Any]:
    """A synthetic world at `<out_root>/world-<key>` (generated once; a rerun reuses it)."""
    from sharegpt4v.data.inspect import inspect_dataset
    from sharegpt4v.world.generate import generate_world

    cfg = dataclasses.asdict(recipe_of(profile, overrides).world)
    cfg.pop("workers")  # how it is computed does not change what is computed
    uri = storage.join(out_root, f"world-{content_key(images, seed, cfg)}")
    with task_run("synthetic-world", {"out": uri, "images": images, "seed": seed, "profile": profile}):
        store = storage.open_store(uri)
        if not store.is_complete():
            generate_world(uri, images=images, seed=seed, cfg=recipe_of(profile, overrides).world, overwrite=True,
                           progress=False)
        report = inspect_dataset(uri, progress=False)
        tracking.log_metrics({"images": report["ok"], "shards": report["shards"]})
    return {"uri": uri, "digest": folder_digest(uri), "ok": report["ok"], "shards": report["shards"],
            "splits": report["splits"]}


def ingest_images(source_uri: str, out_root: str, kind: str, source_name: str, profile: str,
                  overrides: list[str] | None) -> dict[str, Any]:
    """Images / img2dataset shards / a LLaVA JSON -> image shards at `<out_root>/ingested-<key>`."""
    from sharegpt4v.data.ingest import ingest

    recipe = recipe_of(profile, overrides)
    uri = storage.join(out_root, f"ingested-{content_key(source_uri, kind, source_name, dataclasses.asdict(recipe.ingest))}")
    with task_run("ingest", {"source": source_uri, "out": uri, "kind": kind}):
        summary = ingest(source_uri, uri, recipe.ingest, kind=kind, source_name=source_name or None, overwrite=True,
                         progress=False)
    counts = summary.to_dict()
    return {"uri": uri, "digest": folder_digest(uri), **{k: counts[k] for k in ("ok", "error", "duplicate")}}


# captioning ----------------------------------------------------------------------------------------


def seed_captions(dataset_uri: str, out_root: str, split: str, teacher_endpoint: str, teacher_model: str,
                  budget_usd: float, profile: str, overrides: list[str] | None) -> dict[str, Any]:
    """Seed captions of `split` from the teacher VLM (OpenAI-compatible endpoint, key from $OPENAI_API_KEY).

    `teacher_endpoint`: a `/v1` URL, "" for `$OPENAI_BASE_URL` (the teacher Secret), or "synthetic"
    for the synthetic world's stand-in teacher, started in this process. The caption set goes to
    `<out_root>/seed-<key>`; a rerun continues where the last one stopped (exactly once per shard).
    """
    from sharegpt4v.captioning.job import run_caption_job
    from sharegpt4v.captioning.teacher import TeacherClient
    from sharegpt4v.captioning.teacher_sim import TeacherSim

    recipe = recipe_of(profile, overrides)
    teacher = recipe.teacher
    if teacher_model:
        teacher = dataclasses.replace(teacher, model=teacher_model)
    if budget_usd > 0:
        teacher = dataclasses.replace(teacher, budget_usd=budget_usd)
    synthetic = teacher_endpoint == SYNTHETIC_TEACHER
    uri = storage.join(out_root, f"seed-{content_key(folder_digest(dataset_uri), split, teacher.model, synthetic)}")
    params = {"dataset": dataset_uri, "out": uri, "split": split or "all", "teacher_model": teacher.model,
              "teacher_endpoint": "synthetic" if synthetic else (teacher_endpoint or f"${teacher.base_url_env}")}
    with contextlib.ExitStack() as stack:
        stack.enter_context(task_run("seed-captions", params))
        base_url, api_key = teacher_endpoint or None, None
        if synthetic:
            sim = stack.enter_context(TeacherSim(world_uri=dataset_uri))
            base_url, api_key = sim.url, "synthetic-teacher-key"
        client = stack.enter_context(TeacherClient(teacher, base_url=base_url, api_key=api_key))
        summary = run_caption_job(dataset_uri, uri, client, batch_size=4 * teacher.concurrency, split=split or None,
                                  progress=False)
    if not summary.complete:
        raise RuntimeError(f"seed captions incomplete ({summary.stopped or 'shards left'}): rerun to continue -> {uri}")
    result = summary.to_dict()
    return {"uri": uri, "digest": folder_digest(uri), "ok": result["ok"], "error": result["error"],
            "captioned": result["captioned"], "reasons": result["reasons"]}


def caption_shard_group(dataset_uri: str, dataset_digest: str, model: str, out_root: str, group: int, groups: int,
                        split: str, gpus: int, profile: str, overrides: list[str] | None) -> dict[str, Any]:
    """Caption the shards of group `group` of `groups` with a trained captioner (exactly once per shard).

    All groups write one caption set, `<out_root>/corpus-<key>` (keyed by the dataset and the
    captioner's checkpoint), that `merge_captions` publishes once every shard is done.
    """
    from sharegpt4v.captioning.engine import make_captioner
    from sharegpt4v.captioning.job import run_caption_job

    recipe = recipe_of(profile, overrides)
    checkpoint, _, model_digest = _model(model)
    uri = storage.join(out_root, f"corpus-{content_key(dataset_digest, model_digest, split, dataclasses.asdict(recipe.captioning))}")
    group, groups = int(group), int(groups)
    params = {"dataset": dataset_uri, "model": model, "out": uri, "group": group, "groups": groups,
              "split": split or "all", "gpus": gpus}
    with task_run(f"caption-group-{group}-of-{groups}", params):
        captioner = make_captioner(checkpoint, recipe, device=recipe.compute.device)
        try:
            summary = run_caption_job(dataset_uri, uri, captioner, batch_size=recipe.captioning.batch_size,
                                      worker=group, num_workers=groups, split=split or None, progress=False)
        finally:
            captioner.close()
    result = summary.to_dict()
    return {"uri": uri, "group": group, "groups": groups, "captioned": result["captioned"], "ok": result["ok"],
            "error": result["error"], "shards": result["shards_total"]}


def merge_captions(dataset_uri: str, split: str, groups: list[dict[str, Any]], reference: str,
                   report_root: str) -> dict[str, Any]:
    """Fan-in: publish the corpus caption set and write its quality report (HTML + JSON).

    `groups`: the results of every `caption_shard_group` task. The report compares the set with
    `reference` (e.g. the teacher's seed captions) and, on a synthetic world, scores facts against
    the ground truth.
    """
    from sharegpt4v.captioning.job import finalize_caption_set
    from sharegpt4v.captioning.report import report_metrics, run_report, world_caption_sets

    uris = sorted({g["uri"] for g in groups})
    if len(uris) != 1:
        raise ValueError(f"merge_captions: the shard groups wrote {len(uris)} caption sets ({uris}); expected one")
    uri = uris[0]
    report_uri = storage.join(report_root, f"report-{uri.rstrip('/').rsplit('/', 1)[-1]}")
    with task_run("merge-captions", {"captions": uri, "groups": len(groups), "report": report_uri}):
        manifest = finalize_caption_set(dataset_uri, uri, split or None)
        sets: dict[str, Any] = {"captioner": uri}
        if reference:
            sets["reference"] = reference
        if "world" in storage.open_store(dataset_uri).read_manifest():
            sets.update(world_caption_sets(dataset_uri, split or None))
        report = run_report(sets, report_uri, dataset_uri=dataset_uri, split=split or None, samples=8)
    html = storage.open_store(report_uri).get_bytes("report.html").decode()
    return {"uri": uri, "digest": folder_digest(uri), "counts": manifest["counts"], "report_uri": report_uri,
            "metrics": _numbers(report_metrics(report)), "html": html}


# training ------------------------------------------------------------------------------------------


def foundations(dataset_uri: str, dataset_digest: str, out_root: str, profile: str,
                overrides: list[str] | None) -> dict[str, Any]:
    """The overrides every later task uses: `overrides`, plus the paths of the CLIP and Vicuna stand-ins
    (`training.foundations`) when the recipe builds its model from config. A recipe whose model comes
    from checkpoints (the 7B profile: `model.vision.path`, `model.language.path`) is returned as it is.
    The foundations go to `<out_root>/foundations-<key>` (keyed by the dataset and the recipe's model
    and foundations sections) and are trained once."""
    from sharegpt4v.training.foundations import build_foundations

    recipe = recipe_of(profile, overrides)
    m = recipe.model
    given = list(overrides or [])
    if m.checkpoint or m.vision.path or m.language.path:
        return {"overrides": given, "uri": "", "trained": False}
    key = content_key(dataset_digest, dataclasses.asdict(recipe.model), dataclasses.asdict(recipe.foundations), recipe.seed)
    uri = storage.join(out_root, f"foundations-{key}")
    with task_run("foundations", {"dataset": dataset_uri, "out": uri}):
        result = build_foundations(recipe, dataset_uri, uri)
    return {"overrides": [*given, *result["overrides"]], "uri": uri, "trained": True,
            "metrics": _numbers({k: v for k, v in result.items() if "." in k})}


def train(stage: str, dataset_uri: str, dataset_digest: str, captions: str, captions_digest: str, init: str,
          out_root: str, gpus: int, profile: str, overrides: list[str] | None, split: str = "train",
          register_as: str = "") -> dict[str, Any]:
    """Train `stage` (captioner, pretrain, sft) on `split` with `gpus` processes and register it (alias candidate).

    With `compute.num_nodes > 1` the stage runs as a Kubeflow Trainer TrainJob on `num_nodes x
    gpus_per_node` GPUs (`sharegpt4v.training.trainjob`: created or re-attached, followed, deleted on
    SIGTERM) into the same prefix, and `gpus` only is recorded; the result is the same.

    The checkpoint prefix is `<out_root>/<stage>-<key>`, keyed by the input digests, the split, the init
    checkpoint and the recipe: a retried task resumes from its newest checkpoint, a finished one
    returns at once, and the same checkpoint is registered once. `init`: a checkpoint, a `models:/`
    reference, or "" (built from the recipe). `register_as`: the registry entry (`tracking.REGISTERED_MODELS`
    key) when it is not the stage's own, e.g. "base" for the brief-caption pretraining the captioner starts from.
    """
    from sharegpt4v.training.data import StageInputs
    from sharegpt4v.training.run import launch

    recipe = recipe_of(profile, overrides)
    init_checkpoint, parent, init_digest = _model(init) if init else (None, {}, "")
    section = {k: v for k, v in recipe.to_dict().items() if k not in ("captioning", "teacher", "eval", "world", "ingest")}
    section["compute"] = {k: v for k, v in section["compute"].items() if k not in ("num_nodes", "gpus_per_node")}
    name = register_as or stage
    out = storage.join(out_root, f"{name}-{content_key(stage, dataset_digest, captions_digest, init_digest, split, section)}")
    params = {"stage": stage, "dataset": dataset_uri, "captions": captions or "none", "init": init or "recipe",
              "out": out, "gpus": gpus, "profile": profile, "split": split, "registered_as": name}
    pipeline_run = find_pipeline_run()  # before task_run: inside, new runs nest under the task's run
    with task_run(name, params):
        inputs = StageInputs([dataset_uri], captions=captions or None, split=split or None)
        if recipe.compute.num_nodes > 1:  # a Kubeflow Trainer TrainJob on the recipe's nodes, followed from here
            from sharegpt4v.training.trainjob import run_trainjob

            result = run_trainjob(stage, recipe, inputs, out, init_checkpoint, profile=profile,
                                  overrides=[str(o) for o in overrides or []])
        else:
            result = launch(stage, recipe, inputs, out, init=init_checkpoint, nproc=int(gpus))
        registered: dict[str, str] = {}
        if tracking.tracking_enabled():
            lineage = tracking.stage_lineage(parent, init, dataset_uri, dataset_digest, captions, captions_digest,
                                             pipeline_run)
            registered = _register_once(name, result.checkpoint_uri, result.run_id, lineage)
        tracking.log_metrics({"steps": result.steps, "final_loss": result.final_loss, "samples_seen": result.samples_seen})
    from sharegpt4v.modeling.builder import checkpoint_digest

    return {"checkpoint_uri": result.checkpoint_uri, "digest": checkpoint_digest(result.checkpoint_uri),
            "model_uri": registered.get("uri", result.checkpoint_uri), "name": registered.get("name", ""),
            "version": registered.get("version", ""), "steps": result.steps, "final_loss": result.final_loss,
            "samples_seen": result.samples_seen, "flagged_samples": result.flagged_samples}


def _register_once(stage: str, checkpoint: str, run_id: str | None, lineage: dict[str, str]) -> dict[str, str]:
    """Register the checkpoint unless a version of it exists already (a rerun that found `final/` done)."""
    name = tracking.REGISTERED_MODELS[stage]
    client = _client()
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception as exc:
        if not tracking.is_not_found(exc):  # only "no such model" means no versions; a failure is not that
            raise tracking.mlflow_error(f"looking up the versions of model {name!r}", exc) from exc
        versions = []  # the registered model does not exist yet
    from sharegpt4v.redact import redact_text

    recorded = redact_text(checkpoint)  # as the version's `checkpoint` tag holds it
    for version in versions:
        if tracking.version_checkpoint(version) in (checkpoint, recorded):
            client.set_registered_model_alias(name, "candidate", version.version)
            return {"name": name, "version": str(version.version), "uri": f"models:/{name}/{version.version}",
                    "model_id": tracking.version_model_id(version) or ""}
    return tracking.register_checkpoint(stage, checkpoint, run_id, lineage)


# evaluation and the registry -----------------------------------------------------------------------


def evaluate(model: str, dataset_uri: str, out_root: str, metric: str, gpus: int, profile: str,
             overrides: list[str] | None) -> dict[str, Any]:
    """Benchmarks of `eval.benchmarks` on `model`; `score` is `metric` (what the promotion gate compares)."""
    from sharegpt4v.evaluation import evaluate as run_eval
    from sharegpt4v.evaluation import flat_metrics

    recipe = recipe_of(profile, overrides)
    checkpoint, _, model_digest = _model(model)
    out = storage.join(out_root, f"eval-{content_key(model_digest, folder_digest(dataset_uri), dataclasses.asdict(recipe.eval))}")
    with task_run("evaluate", {"model": model, "dataset": dataset_uri, "out": out, "metric": metric, "gpus": gpus}):
        results = run_eval(checkpoint, recipe, dataset_uri=dataset_uri, out=out, model_id=model)
    metrics = flat_metrics(results)
    if metric not in metrics:
        raise ValueError(f"champion metric {metric!r} was not measured (have: {', '.join(metrics)})")
    table = storage.open_store(out).get_bytes("results.md").decode()
    return {"out": out, "metrics": metrics, "score": float(metrics[metric]), "table": table}


def promote(model: str, metrics: dict[str, float], metric: str, threshold: float, alias: str = "champion") -> dict[str, str]:
    """Alias the registered version `alias` and tag it with its evaluation metrics."""
    _, version, _ = _model(model)
    if not version:
        raise ValueError(f"promote: {model!r} is not a registered model (models:/<name>/<version>)")
    with task_run("promote", {"model": model, "alias": alias, "metric": metric, "threshold": threshold}):
        client = _client()
        for key, value in sorted(metrics.items()):
            client.set_model_version_tag(version["name"], version["version"], f"eval.{key}", str(value))
        client.set_model_version_tag(version["name"], version["version"], "promoted_by", f"{metric} >= {threshold}")
        tracking.promote(version["name"], version["version"], alias)
        tracking.log_metrics({"score": float(metrics.get(metric, 0.0))})
    return {"name": version["name"], "version": version["version"], "alias": alias,
            "uri": f"models:/{version['name']}@{alias}"}


# serving -------------------------------------------------------------------------------------------


def export_repository(models: dict[str, str], out_root: str, kind: str, profile: str,
                      overrides: list[str] | None) -> dict[str, Any]:
    """A Triton model repository for `models` ({"chat": ref, "captioner": ref}) at `<out_root>/repository-<key>`,
    keyed by the models' checkpoints and the instance kind (KIND_GPU on the cluster, KIND_CPU locally)."""
    from sharegpt4v.serving.export import export_model_repository

    recipe = recipe_of(profile, overrides)
    digests = {name: _model(ref)[2] for name, ref in sorted(models.items())}
    uri = storage.join(out_root, f"repository-{content_key(digests, kind, dataclasses.asdict(recipe).get('serving'))}")
    with task_run("export-model-repository", {"models": json.dumps(models, sort_keys=True), "out": uri, "kind": kind}):
        result = export_model_repository(dict(models), uri, recipe, kind=kind or None)
    return {"uri": result["uri"], "digest": result["digest"][:16],
            "models": {name: {k: str(v) for k, v in info.items()} for name, info in result["models"].items()}}


def deploy(model: str, storage_uri: str, serving_profile: str, namespace: str, dry_run: bool) -> dict[str, Any]:
    """Create or merge-patch the KServe InferenceService serving `model` from `storage_uri` (dry run: print it)."""
    import io

    from sharegpt4v.deploy import apply_inference_service, render_inference_service, to_yaml

    obj = render_inference_service(model, serving_profile, storage_uri=storage_uri, namespace=namespace or None)
    with task_run("deploy", {"model": model, "storage_uri": storage_uri, "profile": serving_profile,
                             "namespace": namespace, "dry_run": dry_run}):
        printed = io.StringIO()
        action = apply_inference_service(obj, dry_run=dry_run, out=printed)
    if dry_run:
        print(printed.getvalue(), end="")
    return {"action": action, "name": obj["metadata"]["name"], "namespace": obj["metadata"].get("namespace", ""),
            "yaml": to_yaml([obj])}

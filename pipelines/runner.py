"""Compile, check, run locally and submit the pipelines.

    compile_all(out_dir, image)        -> {name: path}: the IR YAML under pipelines/compiled/, every
                                          component on `image` (default: components.resources.IMAGE)
                                          and every parameter described
    write_reference(paths)             -> path: components/COMPONENTS.md from the components' docstrings,
                                          their cards (components.catalog) and the compiled pipelines
    check_compiled()                   -> [problems]: committed YAML == what the code compiles to,
                                          each file parses as the KFP PipelineSpec/PlatformSpec, the
                                          component reference is up to date and the cards agree with
                                          the pipelines
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
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sharegpt4v.environment import patched_environ
from sharegpt4v.errors import PlatformError, UsageError, first_line

COMPILED_DIR = Path(__file__).resolve().parent / "compiled"
BUCKET = "sharegpt4v"
LOCAL_EXPERIMENT = "sharegpt4v"


class PipelineError(PlatformError):
    """A pipeline could not be compiled, run or submitted (the CLI prints it as one line)."""


# compile and check ----------------------------------------------------------------------------------


def _pipelines() -> dict[str, Any]:
    from pipelines.definitions import PIPELINES

    return PIPELINES


# An OCI image reference (the distribution grammar): [registry[:port]/]path[:tag][@digest], with a tag
# or a digest (a bare name would mean `latest`, which no two clusters agree on).
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?)"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_IMAGE_REF = re.compile(rf"(?:{_DOMAIN}/)?{_PATH}(?P<tag>:[\w][\w.-]{{0,127}})?"
                        r"(?P<digest>@(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}))?")


def default_image() -> str:
    """The image of the committed compiled files: `components.resources.IMAGE` (the training image)."""
    from components.resources import IMAGE

    return IMAGE


def image_reference(ref: str) -> str:
    """`ref` if it is an image reference with a tag or a digest, e.g.
    registry.example/sharegpt4v/train@sha256:<64 hex digits>; else a `UsageError`."""
    match = _IMAGE_REF.fullmatch(ref or "")
    if not match or not (match.group("tag") or match.group("digest")):
        raise UsageError(f"--image {ref!r}: not an image reference; expected REGISTRY/IMAGE@sha256:<64 hex digits> "
                         "(or REGISTRY/IMAGE:TAG)")
    return ref


def compile_pipeline(name: str, path: str | Path, image: str | None = None) -> Path:
    """Compile pipeline `name` to IR YAML at `path`, every component on `image` (default: `default_image()`).

    What `kfp.compiler.Compiler().compile` does, with steps between building the spec and writing it:
    the executors' image is set (a component's `base_image` is fixed when it is decorated), the
    parameters of the DAG components (ExitHandler, If, ParallelFor) get the description of the value
    they carry, and each description becomes one line. A parameter left without a description is an
    error: the docstrings' `Args:` and `Returns:` describe every input and output.
    """
    from kfp.compiler import pipeline_spec_builder as builder

    if name not in _pipelines():
        raise PipelineError(f"pipeline {name!r}: choose one of {', '.join(_pipelines())}")
    image = default_image() if image is None else image_reference(image)
    pipeline = _pipelines()[name]
    spec = builder.modify_pipeline_spec_with_override(pipeline.pipeline_spec, None, None)  # a copy
    set_image(spec, image)
    describe_channels(spec)
    for definition in _definitions(spec):  # a docstring's line breaks are no paragraphs: one line each
        definition.description = " ".join(definition.description.split())
    missing = undocumented(spec)
    if missing:
        raise PipelineError(f"pipeline {name!r}: no description for {', '.join(missing)} (document it in the Args: or "
                            "Returns: of its function's docstring)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    builder.write_pipeline_spec_to_file(pipeline_spec=spec, pipeline_description=pipeline.description,
                                        platform_spec=pipeline.platform_spec, package_path=str(path))
    return path


def compile_all(out_dir: str | Path = COMPILED_DIR, image: str | None = None) -> dict[str, Path]:
    if image is not None:
        image = image_reference(image)
    return {name: compile_pipeline(name, Path(out_dir) / f"{name}.yaml", image) for name in _pipelines()}


def set_image(spec: Any, image: str) -> None:
    """Every container executor of a PipelineSpec runs `image`."""
    for executor in spec.deployment_spec["executors"].values():
        if "container" in executor:
            executor["container"]["image"] = image


def describe_channels(spec: Any) -> None:
    """Give each input and output parameter of the DAG components (`pipelinechannel--...`: what an
    ExitHandler, If or ParallelFor passes on) the description of the value it carries: the pipeline
    parameter's, or the output's of the task that produces it."""
    components = spec.components
    graphs = {"root": spec.root, **{name: c for name, c in components.items() if c.WhichOneof("implementation") == "dag"}}
    users: dict[str, list[tuple[str, Any]]] = {}  # component -> [(the DAG holding a task of it, the task)]
    for graph_name, graph in graphs.items():
        for task in graph.dag.tasks.values():
            users.setdefault(task.component_ref.name, []).append((graph_name, task))

    def component_output(name: str, key: str) -> tuple[list[str], str]:
        """(where the value comes from, its description) of output `key` of component `name`."""
        comp = components[name]
        if comp.WhichOneof("implementation") != "dag" or key not in comp.dag.outputs.parameters:
            defined = comp.output_definitions.parameters
            return [], defined[key].description if key in defined else ""
        out = comp.dag.outputs.parameters[key]  # a DAG passes on what one of its tasks produces
        selectors = ([out.value_from_parameter] if out.WhichOneof("kind") == "value_from_parameter"
                     else list(out.value_from_oneof.parameter_selectors))
        found = [task_output(name, s.producer_subtask, s.output_parameter_key) for s in selectors]
        return [where for origin, _ in found for where in origin], next((d for _, d in found if d), "")

    def task_output(graph_name: str, task_name: str, key: str) -> tuple[list[str], str]:
        producer = graphs[graph_name].dag.tasks[task_name].component_ref.name
        origin, description = component_output(producer, key)
        return origin or [f"`{key}` of task `{task_name}`"], description

    def component_input(name: str, key: str) -> str:
        defined = graphs[name].input_definitions.parameters
        if key in defined and defined[key].description:
            return defined[key].description
        for graph_name, task in users.get(name, []):
            if key in task.inputs.parameters:
                source = task.inputs.parameters[key]
                kind = source.WhichOneof("kind")
                if kind == "component_input_parameter":
                    description = component_input(graph_name, source.component_input_parameter)
                elif kind == "task_output_parameter":
                    origin, text = task_output(graph_name, source.task_output_parameter.producer_task,
                                               source.task_output_parameter.output_parameter_key)
                    description = f"{' or '.join(dict.fromkeys(origin))}: {text}" if text else ""
                else:
                    description = ""
            elif task.HasField("parameter_iterator") and task.parameter_iterator.item_input == key:
                items = component_input(name, task.parameter_iterator.items.input_parameter)
                description = f"One item of the loop over {items}" if items else ""
            else:
                continue
            if description:
                return description
        return ""

    for name, comp in graphs.items():
        if name == "root":
            continue
        for key, parameter in comp.input_definitions.parameters.items():
            if not parameter.description:
                parameter.description = component_input(name, key)
        for key, parameter in comp.output_definitions.parameters.items():
            if not parameter.description:
                origin, text = component_output(name, key)
                parameter.description = f"{' or '.join(dict.fromkeys(origin))}: {text}" if text and origin else text


def _definitions(spec: Any, named: bool = False) -> list[Any]:
    """Every input and output definition (parameters and artifacts) of a PipelineSpec's root and
    components; with `named`, as ("<component>.<inputs|outputs>.<name>", definition)."""
    found = []
    for name, comp in [("root", spec.root), *sorted(spec.components.items())]:
        for side, definitions in (("inputs", comp.input_definitions), ("outputs", comp.output_definitions)):
            for kind in (definitions.parameters, definitions.artifacts):
                found += [(f"{name}.{side}.{key}", value) for key, value in sorted(kind.items())]
    return found if named else [value for _, value in found]


def undocumented(spec: Any) -> list[str]:
    """The inputs and outputs (parameters and artifacts) of a PipelineSpec's root and components that
    have no description, as "<component>.<inputs|outputs>.<name>"."""
    return [name for name, value in _definitions(spec, named=True) if not value.description.strip()]


def load_compiled(paths: dict[str, Path]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """{pipeline: (PipelineSpec as a dict, the Kubernetes platform spec's executors)} of compiled files."""
    import yaml

    loaded = {}
    for name, path in paths.items():
        docs = list(yaml.safe_load_all(Path(path).read_text()))
        k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
        loaded[name] = (docs[0], k8s)
    return loaded


def render_reference(paths: dict[str, Path]) -> str:
    """components/COMPONENTS.md for the compiled files at `paths` (see `components.catalog`)."""
    from components import catalog

    return catalog.render_reference(load_compiled(paths), default_image())


def write_reference(paths: dict[str, Path], path: str | Path | None = None) -> Path:
    from components import catalog

    path = Path(path or catalog.REFERENCE_PATH)
    text = render_reference(paths)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


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


def check_compiled(out_dir: str | Path = COMPILED_DIR, image: str | None = None,
                   reference: str | Path | None = None) -> list[str]:
    """Problems with the committed IR YAML (empty when it is up to date and valid): each file must be
    what `compile_all(image=image)` writes (default: the default image) and parse as the KFP protobufs;
    the component reference (`reference`, default components/COMPONENTS.md) must be what
    `write_reference` writes, and the components' cards must agree with the pipelines."""
    from components import catalog

    problems = []
    out_dir = Path(out_dir)
    reference = Path(reference or catalog.REFERENCE_PATH)
    with tempfile.TemporaryDirectory(prefix="sharegpt4v-ir-") as tmp:
        try:
            fresh = compile_all(tmp, image)
        except PipelineError as exc:
            return [first_line(exc)]
        for name, path in fresh.items():
            committed = out_dir / path.name
            if not committed.exists():
                problems.append(f"{committed}: missing (run `sharegpt4v pipeline compile`)")
                continue
            if committed.read_text() != path.read_text():
                problems.append(f"{committed}: out of date with pipelines/definitions.py and components/stages.py "
                                "(run `sharegpt4v pipeline compile`)")
            try:
                parse_ir(committed)
            except Exception as exc:  # a parse error names the field
                problems.append(f"{committed}: not a valid PipelineSpec/PlatformSpec: {first_line(exc)}")
        extra = sorted(p.name for p in out_dir.glob("*.yaml") if p.stem not in fresh)
        problems += [f"{out_dir / name}: no pipeline of that name in the code" for name in extra]
        problems += catalog.check_cards(load_compiled(fresh))
        if not reference.exists():
            problems.append(f"{reference}: missing (run `sharegpt4v pipeline compile`)")
        elif reference.read_text() != render_reference(fresh):
            problems.append(f"{reference}: out of date with components/stages.py (run `sharegpt4v pipeline compile`)")
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

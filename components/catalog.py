"""What each component reads, writes and needs: its card, declared once, beside the component.

`components/stages.py` declares every component with `@component(reads=..., writes=..., gpu=...,
teacher=..., needs=...)`; the card lands in `CATALOG` and at the end of the component's description
(what `kfp` shows for a component). `render_reference` turns the components' docstrings (the same
`Args:` / `Returns:` text the KFP compiler puts into the IR as input and output descriptions), their
cards and what the compiled pipelines give each task (GPU requests, CPU/memory, caching, retries,
Secrets) into `components/COMPONENTS.md`; `check_cards` compares the cards' GPU and Secret needs with
the compiled pipelines. `sharegpt4v pipeline compile` writes the reference and `--check` fails when
it is stale or a card disagrees with the pipelines (`pipelines.runner.check_compiled`).

A parameter or output described the same way in several docstrings (components' and pipelines') is
described once, in `SHARED_DOCS`; a docstring names it with a placeholder that `expand` fills in
before the KFP decorators read the docstring (`document`).
"""

from __future__ import annotations

import ast
import inspect
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharegpt4v.cluster import GPU_PRODUCT_LABEL, GPU_RESOURCE, MLFLOW_SECRET, S3_SECRET, SECRET_ENV, TEACHER_SECRET
from sharegpt4v.config import TeacherConfig

REFERENCE_PATH = Path(__file__).resolve().parent / "COMPONENTS.md"

# What every task is given (components.resources.with_secrets) and, for teacher tasks, the teacher's.
SECRETS = {
    S3_SECRET: "S3 credentials (" + ", ".join(key for key, _ in SECRET_ENV[S3_SECRET]) + ")",
    MLFLOW_SECRET: "MLflow tracking server (" + ", ".join(
        key + (" (optional)" if optional else "") for key, optional in SECRET_ENV[MLFLOW_SECRET]) + ")",
    TEACHER_SECRET: f"teacher VLM: OpenAI-compatible endpoint and API key ({TeacherConfig.base_url_env}, "
                    f"{TeacherConfig.api_key_env}); optional: a task given `teacher_endpoint` runs without it",
}
ALWAYS = (S3_SECRET, MLFLOW_SECRET)
# the start task and its outputs a train task's GPU count, CPU and memory come from (components.resources.train_task)
START_TASK = "start-run"
START_OUTPUTS = ("train_gpus", "train_cpu", "train_memory")


@dataclass(frozen=True)
class Card:
    """What a component reads, writes and needs (free text, one sentence each; `gpu` and `teacher`
    are checked against the compiled pipelines)."""

    reads: str
    writes: str
    gpu: bool = False  # runs on A100 nodes with nvidia.com/gpu (components.resources.gpu_task)
    teacher: bool = False  # gets the teacher Secret (the OpenAI-compatible key)
    # a train task (components.resources.train_task): a multi-node recipe trains as a TrainJob it only follows, so
    # its GPUs, CPU and memory are the start task's train_gpus / train_cpu / train_memory outputs
    trainjob: bool = False
    needs: str = ""  # anything else: RBAC, network

    @property
    def secrets(self) -> tuple[str, ...]:
        return (*ALWAYS, *((TEACHER_SECRET,) if self.teacher else ()))

    def gpu_text(self) -> str:
        if not self.gpu:
            return "none (CPU only)"
        where = (f"on nodes labelled `{GPU_PRODUCT_LABEL}` (the `gpu_product` parameter), with the GPU toleration and "
                 "a memory-backed `/dev/shm`")
        if self.trainjob:
            return (f"`{GPU_RESOURCE}` x the start task's `{START_OUTPUTS[0]}` output, CPU and memory its "
                    f"`{START_OUTPUTS[1]}` and `{START_OUTPUTS[2]}`: the `train_gpus` parameter and the \"train\" size "
                    "for a one-node recipe, which trains in the task's pod; no GPU and the small \"follow\" size for a "
                    "multi-node one (`compute.num_nodes > 1`), whose pod only creates and follows a TrainJob with GPUs "
                    f"of its own; {where}")
        return f"`{GPU_RESOURCE}` x the pipeline's GPU-count parameter, {where}"

    def text(self) -> str:
        """The card as the lines appended to the component's description."""
        lines = [f"Reads: {self.reads}", f"Writes: {self.writes}", f"GPUs: {self.gpu_text()}",
                 "Secrets (as env): " + ", ".join(self.secrets)]
        if self.needs:
            lines.append(f"Needs: {self.needs}")
        return "\n".join(lines)


# python function name -> (the component, its card); filled by `register`, in declaration order
CATALOG: dict[str, tuple[Any, Card]] = {}


def register(component: Any, card: Card) -> Any:
    """Record `component`'s card and append it to the component's description."""
    name = component.python_func.__name__
    spec = component.component_spec
    spec.description = "\n\n".join(part for part in (spec.description, card.text()) if part)
    CATALOG[name] = (component, card)
    return component


# descriptions several docstrings share -------------------------------------------------------------

# name -> the description, as its docstring lines (`expand` indents the later ones); a placeholder fills in its
# `{field}`s. Components' parameters and outputs, then the pipelines' parameters (`pipeline.`); `overrides` serves
# both.
SHARED_DOCS: dict[str, str] = {name: inspect.cleandoc(text) for name, text in {
    "dataset_uri": """
        The image dataset (shards + manifest) from `synthetic_world` or `ingest`, e.g.
        "s3://sharegpt4v/pipeline/data/world-0123456789ab".""",
    "dataset_digest": """
        Digest of the dataset's manifest (16 hex digits): part of the cache key, so a changed dataset
        is never answered from the cache.""",
    "captions_digest": """
        Digest of the caption set's manifest (16 hex digits): part of the cache key.""",
    "out_root": """
        S3 prefix (or local folder) of the output, written to `<out_root>/{folder}-<key>` (the key: 12 hex
        digits of the inputs and the recipe, so a rerun with the same inputs reuses or resumes it), e.g.
        "s3://sharegpt4v/pipeline/{area}".""",
    "training_gpus": """
        Training processes of a one-node recipe, one per GPU (count; then the task's `nvidia.com/gpu` limit),
        e.g. 8 for one 8 x A100 node, 1 locally; a multi-node recipe (`compute.num_nodes > 1`) trains as a
        TrainJob on its own `num_nodes x gpus_per_node` GPUs, the task's pod has none, and this is only recorded.""",
    "task_gpus": """
        GPUs the task is given (count; its `nvidia.com/gpu` limit), e.g. 1; recorded in its MLflow run.""",
    "profile": """
        Recipe profile: "tiny" (small models, runs on a CPU) or "a100-7b" (7B LMM on A100 80GB
        nodes), or a profile YAML path; see `sharegpt4v/profiles/`.""",
    "overrides": """
        Recipe overrides applied after the profile, "section.key=value" strings, e.g.
        ["pretrain.max_steps=500", "eval.limit=200"]; [] for none.""",
    "manifest_digest": """
        Digest of its manifest (16 hex digits): the cache key of the steps that read it.""",
    "checkpoint_uri": """
        The checkpoint folder the run wrote (S3), under `<out_root>/{folder}-<key>`.""",
    "model_uri": """
        The registered version, "models:/{name}/<version>" (the checkpoint URI when MLflow
        tracking is off): what later steps load.""",
    "checkpoint_digest": """
        Digest of the checkpoint (12 hex digits): the cache key of the steps that read it.""",
    "version": """
        The MLflow model registry version, e.g. "3" ("" when tracking is off).""",
    "training_metrics": """
        steps, final_loss (mean token cross-entropy of the last steps), samples_seen and flagged_samples
        (samples skipped as malformed) of the run.""",
    "pipeline.dataset_uri": """
        The image dataset (shards + manifest) from `sharegpt4v data ingest` or an earlier run,
        e.g. "s3://sharegpt4v/pipeline/data/world-0123456789ab".""",
    "pipeline.output_root": """
        S3 prefix every output goes under, in content-keyed folders (data/, captions/, models/,
        eval/, reports/, serving/): resubmitting with the same parameters resumes or reuses the work, e.g.
        "s3://sharegpt4v/pipeline".""",
    "pipeline.profile": """
        Recipe profile: "a100-7b" (7B LMM, DeepSpeed ZeRO-3 on 8 x A100 80GB nodes) or "tiny" (small
        models, for smoke runs); see `sharegpt4v/profiles/`.""",
    "pipeline.teacher_endpoint": """
        OpenAI-compatible base URL of the teacher VLM, ending in /v1, e.g.
        "https://api.openai.com/v1" or an in-cluster vLLM "http://teacher.sharegpt4v:8000/v1"; "" reads
        OPENAI_BASE_URL from the sharegpt4v-teacher Secret (whose OPENAI_API_KEY is the key in every case);
        "synthetic": the synthetic world's stand-in teacher (synthetic worlds only, no network).""",
    "pipeline.teacher_model": """
        The model the teacher endpoint serves, e.g. "gpt-4o"; "" keeps the recipe's
        `teacher.model`.""",
    "pipeline.teacher_budget_usd": """
        Most the seed captions may cost, in US dollars (e.g. 50.0), priced per 1k
        tokens by the recipe; 0 keeps the recipe's `teacher.budget_usd` (unset: no cap). At the budget the
        seed captions task stops and fails; a rerun continues where it stopped.""",
    "pipeline.seed_split": """
        The images the teacher captions and the captioner learns from, e.g. "val"; "" for every
        image.""",
    "pipeline.sft_split": """
        The images whose questions instruction tuning (SFT) trains on, e.g. "val".""",
    "pipeline.captioner_base": """
        The pretrained LMM the captioner is fine-tuned from: a registered version or
        checkpoint, e.g. "models:/llava-1.5-7b/1" or a mirrored llava-1.5-7b-hf "s3://models/llava-1.5-7b-hf";
        "" pretrains one here on the brief captions of `{split}`.""",
    "pipeline.base_model": """
        Where pretraining starts: a registered version or checkpoint, e.g.
        "models:/sharegpt4v-base/1"; "" builds the model from the recipe's vision encoder and language model.""",
    "pipeline.shard_groups": """
        Parallel corpus captioning tasks (count, at least 1), each on `caption_gpus` GPUs,
        e.g. 4.""",
    "pipeline.train_gpus": """
        GPUs (nvidia.com/gpu) per training task, one process each (count), e.g. 8 for one
        8 x A100 node, when the recipe is one node; a multi-node recipe (`compute.num_nodes > 1`, e.g.
        "a100-7b") trains as a TrainJob on its own `num_nodes x gpus_per_node` GPUs and its train tasks,
        which only follow it, hold no GPU whatever this says.""",
    "pipeline.caption_gpus": """
        GPUs (nvidia.com/gpu) per corpus captioning task (count), e.g. 1.""",
    "pipeline.eval_gpus": """
        GPUs (nvidia.com/gpu) of the evaluation task (count), e.g. 1.""",
    "pipeline.gpu_product": """
        The `nvidia.com/gpu.product` node label GPU tasks are scheduled on, e.g.
        "NVIDIA-A100-SXM4-80GB" (the default) or "NVIDIA-H100-80GB-HBM3".""",
    "pipeline.champion_metric": """
        The metric that decides promotion, "<benchmark>.<metric>", e.g.
        "world-vqa.overall" (accuracy, 0 to 1); the run fails when the benchmarks do not measure it.""",
    "pipeline.mlflow_experiment": """
        MLflow experiment of the pipeline's run and its tasks' nested runs, e.g.
        "sharegpt4v"; created when missing.""",
}.items()}

# `{name}` or `{name(field=value, ...)}`; anything else in braces (`{"uri": ...}`, `{{$.placeholder}}`) is text
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.]*)(?:\(([^(){}]*)\))?\}")
_MALFORMED = re.compile(r"\{[A-Za-z_][\w.]*\(")


def _fill(match: re.Match[str], indent: str) -> str:
    name, arguments = match.group(1), match.group(2)
    if name not in SHARED_DOCS:
        raise ValueError(f"docstring placeholder {match.group(0)}: no {name!r} in components.catalog.SHARED_DOCS")
    template = SHARED_DOCS[name]
    pairs = [item.partition("=") for item in arguments.split(",")] if arguments else []
    if any(not sep for _, sep, _ in pairs):
        raise ValueError(f"docstring placeholder {match.group(0)}: fields are given as field=value, comma-separated")
    values = {key.strip(): value.strip() for key, _, value in pairs}
    fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    if set(values) != fields:
        raise ValueError(f"docstring placeholder {match.group(0)}: {name!r} takes "
                         f"{', '.join(sorted(fields)) or 'no fields'}, got {', '.join(sorted(values)) or 'none'}")
    return template.format(**values).replace("\n", "\n" + indent + "    ")


def expand(doc: str) -> str:
    """`doc` with its placeholders replaced by `SHARED_DOCS`: `{name}` by `SHARED_DOCS[name]`, `{name(field=value,
    ...)}` by it with its `{field}`s filled in; the description's later lines are indented four spaces more than the
    placeholder's line (a Google-style docstring's continuation). An unknown name, a missing or extra field or an
    unclosed placeholder raises ValueError."""
    lines = []
    for line in doc.split("\n"):
        indent = line[:len(line) - len(line.lstrip())]
        line = _PLACEHOLDER.sub(lambda match: _fill(match, indent), line)
        if _MALFORMED.search(line):
            raise ValueError(f"malformed docstring placeholder in {line.strip()!r}")
        lines.append(line)
    return "\n".join(lines)


def document(fn: Any) -> Any:
    """`fn` with its docstring expanded (`expand`), for the KFP decorators, which read `fn.__doc__`: under
    `@dsl.pipeline(...)`; `components.stages.component` calls it (and `expand_embedded`) for components."""
    if fn.__doc__:
        fn.__doc__ = expand(fn.__doc__)
    return fn


def expand_embedded(component: Any) -> Any:
    """The function source a lightweight component embeds (the container runs it; kfp reads it from the file, so
    its docstring still has the placeholders) with its docstring expanded too, as if written out in full."""
    container = component.component_spec.implementation.container
    source = container.command[-1]
    name = component.python_func.__name__
    node = next(node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name == name)
    raw = ast.get_docstring(node, clean=False)
    if raw is not None and expand(raw) != raw:
        if source.count(raw) != 1:
            raise ValueError(f"component {name}: its docstring is not found once, as written, in its embedded source "
                             "(a docstring with placeholders may not use escapes)")
        container.command[-1] = source.replace(raw, expand(raw))
    return component


# what the compiled pipelines give each component --------------------------------------------------


def _function(spec: dict[str, Any], label: str) -> str:
    """The python function an executor runs (its `--function_to_execute` argument)."""
    args = spec["deploymentSpec"]["executors"][label]["container"].get("args", [])
    return args[args.index("--function_to_execute") + 1] if "--function_to_execute" in args else ""


def _tasks(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    graphs = [spec["root"], *spec["components"].values()]
    return [(name, task) for graph in graphs for name, task in graph.get("dag", {}).get("tasks", {}).items()]


_CHANNEL = re.compile(r"pipelinechannel--([A-Za-z0-9_-]+)")


def _source(value: Any) -> str:
    """A resource value as compiled: a constant as it is; a placeholder by what fills it in, a pipeline parameter's
    name (`train_gpus`) or a task's output, `<task>.<output>` (`start-run.train_cpu`)."""
    channel = _CHANNEL.search(str(value))
    if not channel:
        return str(value)
    task, _, output = channel.group(1).rpartition("-")  # task names have dashes, parameter and output names none
    return f"{task}.{output}" if task else output


def usage(compiled: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """function name -> one entry per task running it in the compiled pipelines
    ({pipeline: (spec, kubernetes executors)}): pipeline, task, GPUs, requests, Secrets, caching, retries."""
    found: dict[str, list[dict[str, Any]]] = {}
    for pipeline, (spec, k8s) in compiled.items():
        for task_name, task in _tasks(spec):
            label = spec["components"][task["componentRef"]["name"]].get("executorLabel")
            if label is None:
                continue  # a DAG (ExitHandler, If, ParallelFor)
            resources = spec["deploymentSpec"]["executors"][label]["container"].get("resources", {})
            accelerator = resources.get("accelerator", {})
            found.setdefault(_function(spec, label), []).append({
                "pipeline": pipeline, "task": task_name,
                "gpu": bool(accelerator), "gpu_count": _source(accelerator.get("resourceCount", "")),
                "cpu": _source(resources.get("resourceCpuRequest", "")),
                "memory": _source(resources.get("resourceMemoryRequest", "")),
                "memory_limit": _source(resources.get("resourceMemoryLimit", "")),
                "secrets": sorted({s["secretName"] for s in k8s.get(label, {}).get("secretAsEnv", [])}),
                "cache": bool(task.get("cachingOptions", {}).get("enableCache")),
                "retries": int(task.get("retryPolicy", {}).get("maxRetryCount", 0)),
            })
    return found


def check_cards(compiled: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    """Where a card's GPU or Secret needs disagree with what the compiled pipelines give its tasks."""
    problems = []
    tasks = usage(compiled)
    for name, (_, card) in CATALOG.items():
        for use in tasks.get(name, []):
            where = f"{use['pipeline']}.yaml task {use['task']!r}: component {name}"
            if use["gpu"] != card.gpu:
                problems.append(f"{where} declares gpu={card.gpu} in components/stages.py, the pipeline gives it "
                                f"{'GPUs' if use['gpu'] else 'no GPU'}")
            given = (use["gpu_count"], use["cpu"], use["memory"], use["memory_limit"])
            wanted = tuple(f"{START_TASK}.{key}" for key in (*START_OUTPUTS, START_OUTPUTS[2]))
            if card.trainjob and given != wanted:
                problems.append(f"{where} declares trainjob=True in components/stages.py (GPUs, CPU, memory request "
                                f"and limit from {', '.join(wanted)}), the pipeline gives it {', '.join(given)}")
            if not card.trainjob and any(value.startswith(f"{START_TASK}.train_") for value in given):
                problems.append(f"{where} takes the train tasks' resources from {START_TASK} but does not declare "
                                "trainjob=True in components/stages.py")
            if set(use["secrets"]) != set(card.secrets):
                problems.append(f"{where} declares Secrets {', '.join(card.secrets)} in components/stages.py, the "
                                f"pipeline gives it {', '.join(use['secrets']) or 'none'}")
    problems += [f"{pipeline}.yaml: task of {name}, a function that is no @component of components/stages.py"
                 for name, uses in tasks.items() if name not in CATALOG for pipeline in {u['pipeline'] for u in uses}]
    return problems


# the reference ---------------------------------------------------------------------------------------


def _type(spec: Any) -> str:
    text = str(spec.type)
    return text.removeprefix("system.").split("@")[0]


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _overview(component: Any) -> list[str]:
    """The paragraphs of the component's docstring before its `Args:` / `Returns:` sections."""
    text = inspect.getdoc(component.python_func) or ""
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", text):
        if re.match(r"(Args|Arguments|Returns|Return|Raises):", paragraph.strip()):
            break
        paragraphs.append(" ".join(paragraph.split()))
    return paragraphs


def _pipelines_line(uses: list[dict[str, Any]]) -> str:
    by_pipeline: dict[str, list[str]] = {}
    for use in uses:
        by_pipeline.setdefault(use["pipeline"], []).append(f"`{use['task']}`")
    return "; ".join(f"`{p}` ({', '.join(sorted(set(t)))})" for p, t in by_pipeline.items()) or "none"


def _distinct(values: list[str]) -> str:
    return ", ".join(dict.fromkeys(v for v in values if v)) or "-"


def _gpu_counts(runs: list[dict[str, Any]]) -> str:
    counts = _distinct(["`" + r["gpu_count"] + "`" for r in runs if r["gpu_count"]])
    return f"; the count: {counts}" if runs else ""


def _quantities(values: list[str]) -> str:
    """Requests as the reference shows them: constants as they are, task outputs and parameters in backticks."""
    return _distinct([value if not value or re.fullmatch(r"[0-9.]+[A-Za-z]*", value) else f"`{value}`"
                      for value in values])


def render_reference(compiled: dict[str, tuple[dict[str, Any], dict[str, Any]]], image: str) -> str:
    """COMPONENTS.md: every component's description, card, inputs, outputs and how the compiled
    pipelines run it, from `CATALOG` and the compiled pipelines (`{name: (spec, kubernetes executors)}`)."""
    uses = usage(compiled)
    out = [
        "# Component reference",
        "",
        "<!-- Generated by `sharegpt4v pipeline compile` from components/stages.py (docstrings and the",
        "     `@component(reads=..., writes=..., gpu=..., teacher=...)` cards, components/catalog.py) and the compiled",
        "     pipelines; `sharegpt4v pipeline compile --check` fails when this file is stale. Do not edit. -->",
        "",
        "One KFP component per pipeline step (`components/stages.py`). The input and output descriptions below are",
        "the ones the compiled pipelines carry (the KFP UI shows them); the card (reads, writes, GPUs, Secrets) is",
        "also the end of each component's description. Requests, caching and retries are what the compiled",
        "pipelines give the component's tasks (`components/resources.py`).",
        "",
        f"Every component runs on the image `{image}` (`components.resources.IMAGE`, the default of the committed",
        "files under `pipelines/compiled/`); `sharegpt4v pipeline compile --image REGISTRY/IMAGE@sha256:<digest>",
        "--out DIR` compiles the pipelines for another image without editing code.",
        "",
        "Secrets (Kubernetes Secrets in the pipeline's namespace, read as environment variables, never as values):",
        "",
        "| Secret | What it holds |",
        "|---|---|",
        *[f"| `{name}` | {_cell(text)} |" for name, text in SECRETS.items()],
        "",
        "| Component | What it does | GPUs | Pipelines |",
        "|---|---|---|---|",
    ]
    for name, (component, card) in CATALOG.items():
        summary = (_overview(component) or [""])[0]
        out.append(f"| [`{name}`](#{name.replace('_', '-')}) | {_cell(summary)} | {'yes' if card.gpu else 'no'} | "
                   f"{_cell(_pipelines_line(uses.get(name, [])))} |")
    for name, (component, card) in CATALOG.items():
        spec = component.component_spec
        runs = uses.get(name, [])
        out += ["", f"## {name.replace('_', '-')}", "", f"`components.stages.{name}` (KFP component `{spec.name}`)", "",
                *[line for paragraph in _overview(component) for line in (paragraph, "")],
                "| | |", "|---|---|",
                f"| Reads | {_cell(card.reads)} |",
                f"| Writes | {_cell(card.writes)} |",
                f"| GPUs | {_cell(card.gpu_text())}{_gpu_counts(runs) if card.gpu else ''} |",
                "| Secrets | " + ", ".join(f"`{s}`" for s in card.secrets) + " |"]
        if card.needs:
            out.append(f"| Also needs | {_cell(card.needs)} |")
        out += [f"| Requests | CPU {_quantities([r['cpu'] for r in runs])}, memory "
                f"{_quantities([r['memory'] for r in runs])} |",
                f"| Caching | {_distinct(['on' if r['cache'] else 'off' for r in runs])} |",
                f"| Retries | {_distinct([str(r['retries']) for r in runs])} |",
                f"| Pipelines (tasks) | {_cell(_pipelines_line(runs))} |"]
        inputs = spec.inputs or {}
        if inputs:
            out += ["", "Inputs:", "", "| Name | Type | Description |", "|---|---|---|"]
            out += [f"| `{key}` | {_type(value)} | {_cell(value.description or '')} |" for key, value in inputs.items()]
        outputs = spec.outputs or {}
        if outputs:
            out += ["", "Outputs:", "", "| Name | Type | Description |", "|---|---|---|"]
            out += [f"| `{key}` | {_type(value)} | {_cell(value.description or '')} |"
                    for key, value in outputs.items()]
    return "\n".join(out) + "\n"

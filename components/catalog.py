"""What each component reads, writes and needs: its card, declared once, beside the component.

`components/stages.py` declares every component with `@component(reads=..., writes=..., gpu=...,
teacher=..., needs=...)`; the card lands in `CATALOG` and at the end of the component's description
(what `kfp` shows for a component). `render_reference` turns the components' docstrings (the same
`Args:` / `Returns:` text the KFP compiler puts into the IR as input and output descriptions), their
cards and what the compiled pipelines give each task (GPU requests, CPU/memory, caching, retries,
Secrets) into `components/COMPONENTS.md`; `check_cards` compares the cards' GPU and Secret needs with
the compiled pipelines. `sharegpt4v pipeline compile` writes the reference and `--check` fails when
it is stale or a card disagrees with the pipelines (`pipelines.runner.check_compiled`).
"""

from __future__ import annotations

import inspect
import re
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


@dataclass(frozen=True)
class Card:
    """What a component reads, writes and needs (free text, one sentence each; `gpu` and `teacher`
    are checked against the compiled pipelines)."""

    reads: str
    writes: str
    gpu: bool = False  # runs on A100 nodes with nvidia.com/gpu (components.resources.gpu_task)
    teacher: bool = False  # gets the teacher Secret (the OpenAI-compatible key)
    needs: str = ""  # anything else: RBAC, network

    @property
    def secrets(self) -> tuple[str, ...]:
        return (*ALWAYS, *((TEACHER_SECRET,) if self.teacher else ()))

    def gpu_text(self) -> str:
        if not self.gpu:
            return "none (CPU only)"
        return (f"`{GPU_RESOURCE}` x the pipeline's GPU-count parameter, on nodes labelled "
                f"`{GPU_PRODUCT_LABEL}` (the `gpu_product` parameter), with the GPU toleration and a memory-backed "
                "`/dev/shm`")

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


# what the compiled pipelines give each component --------------------------------------------------


def _function(spec: dict[str, Any], label: str) -> str:
    """The python function an executor runs (its `--function_to_execute` argument)."""
    args = spec["deploymentSpec"]["executors"][label]["container"].get("args", [])
    return args[args.index("--function_to_execute") + 1] if "--function_to_execute" in args else ""


def _tasks(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    graphs = [spec["root"], *spec["components"].values()]
    return [(name, task) for graph in graphs for name, task in graph.get("dag", {}).get("tasks", {}).items()]


_CHANNEL = re.compile(r"pipelinechannel--([A-Za-z0-9_]+)")


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
            count = str(accelerator.get("resourceCount", ""))
            channel = _CHANNEL.search(count)
            found.setdefault(_function(spec, label), []).append({
                "pipeline": pipeline, "task": task_name,
                "gpu": bool(accelerator), "gpu_count": channel.group(1) if channel else count,
                "cpu": resources.get("resourceCpuRequest", ""), "memory": resources.get("resourceMemoryRequest", ""),
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
        out += [f"| Requests | CPU {_distinct([r['cpu'] for r in runs])}, memory {_distinct([r['memory'] for r in runs])} |",
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

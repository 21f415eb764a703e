"""Run benchmarks against a model (or any answerer), write and log the results.

    results = evaluate("s3://bucket/models/sft", recipe, dataset_uri="s3://bucket/world/seed-0",
                       benchmark_paths={"mme": "/data/MME"}, out="s3://bucket/eval/sft")
    results["world-vqa"]["overall"], results["mme"]["perception"]

`out` receives `answers/<benchmark>.jsonl` (LLaVA's answers-JSONL; MMBench also
`answers/mmbench_upload.xlsx`, the evaluation server's format), `results.json` (the returned
dict), `results.md` (a table) and `results.png` (per-category bars). With MLflow tracking on,
one `evaluate` run (nested under an active run) gets the flat metrics (`world-vqa.overall`,
`mme.perception`, ...) in one batch and the table, chart and results as artifacts. When `model_id`
is a `models:/` reference, the metrics are also linked to that version's MLflow model (MLflow 3's
LoggedModel, the run's model input), so the registry shows the scores per version.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from typing import Any

from sharegpt4v.evaluation.benchmark import Benchmark
from sharegpt4v.evaluation.common import Answerer, BenchmarkError, EngineAnswerer, Question, dump_jsonl
from sharegpt4v.evaluation.registry import get_benchmark

BREAKDOWN_KEYS = ("categories", "category", "l2-category", "subject", "structural")


def as_answerer(model_or_answerer: Any, recipe: Any, progress: bool = False) -> tuple[Answerer, str]:
    """(answerer, model id) from an Answerer, an InferenceEngine, (model, processor) or a checkpoint URI."""
    if isinstance(model_or_answerer, Answerer):
        return model_or_answerer, getattr(model_or_answerer, "model_id", type(model_or_answerer).__name__)
    from sharegpt4v.modeling.inference import InferenceEngine

    model_id = "model"
    if isinstance(model_or_answerer, InferenceEngine):
        engine = model_or_answerer
    else:
        if isinstance(model_or_answerer, str):
            from sharegpt4v.modeling.builder import load_model

            model_id = model_or_answerer.rstrip("/").rsplit("/", 1)[-1]
            model, processor = load_model(model_or_answerer, device=recipe.compute.device)
        elif isinstance(model_or_answerer, tuple) and len(model_or_answerer) == 2:
            model, processor = model_or_answerer
        else:
            raise TypeError("evaluate: pass an Answerer, an InferenceEngine, (model, processor) or a checkpoint URI")
        # The model is the source of truth for its own sizes: no recipe.model check here.
        engine = InferenceEngine(model, processor, None, recipe.captioning, device=recipe.compute.device,
                                 aspect=recipe.sft.image_aspect)
    return EngineAnswerer.from_config(engine, recipe.eval, progress=progress), model_id


def evaluate(
    model_or_answerer: Any,
    recipe: Any,
    dataset_uri: str | None = None,
    benchmark_paths: Mapping[str, str] | None = None,
    out: str | None = None,
    *,
    model_id: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Answer and score every benchmark in `recipe.eval.benchmarks`; nested results per benchmark.

    `world-vqa` reads `recipe.eval.split` of the world dataset at `dataset_uri`; the others read
    the folder given in `benchmark_paths[name]`. Every source must be given (and a folder must
    exist) before any question is answered.
    """
    from sharegpt4v import tracking

    cfg = recipe.eval
    paths = dict(benchmark_paths or {})
    benchmarks = []
    for name in cfg.benchmarks:
        source = (dataset_uri or paths.get(name)) if name == "world-vqa" else paths.get(name)
        benchmark = get_benchmark(name, source, cfg.limit, cfg.split)
        if not source:
            raise BenchmarkError(f"{name}: needs {benchmark.source_help}")
        if name != "world-vqa":
            benchmark.folder()  # exists, or a clear error now rather than after answering the others
        benchmarks.append(benchmark)
    answerer, default_id = as_answerer(model_or_answerer, recipe, progress)
    model_id = model_id or default_id

    params = {
        "model_id": model_id, "dataset_uri": dataset_uri, "out": out,
        **{f"eval.{k}": getattr(cfg, k) for k in ("benchmarks", "split", "batch_size", "max_new_tokens", "limit")},
        **{f"benchmark.{k}": v for k, v in paths.items()},
    }
    logged_model = tracking.logged_model_id(model_id)  # a registered version: its MLflow model gets the scores
    with tracking.stage_run("evaluate", params, tags={"stage": "eval", "model_id": model_id}):
        if logged_model:
            tracking.log_model_input(logged_model)
        results: dict[str, Any] = {}
        answered: list[tuple[Benchmark, list[Question], list[dict[str, Any]]]] = []
        for benchmark in benchmarks:
            questions = benchmark.questions()
            texts = answerer.answer(questions)
            if len(texts) != len(questions):
                raise BenchmarkError(f"{benchmark.name}: the answerer returned {len(texts)} answers for {len(questions)} questions")
            errors: dict[int, str] = getattr(answerer, "errors", {}) or {}
            records = [
                benchmark.record(q, str(t), model_id, {"error": errors[i]} if i in errors else None)
                for i, (q, t) in enumerate(zip(questions, texts))
            ]
            results[benchmark.name] = benchmark.score(questions, records)
            answered.append((benchmark, questions, records))
        metrics = flat_metrics(results)
        tracking.log_metrics(metrics, model_id=logged_model)
        table = results_table(results, {b.name: b.chart(results[b.name]) for b in benchmarks}, model_id)
        chart = results_chart({b.name: b.chart(results[b.name]) for b in benchmarks})
        if out:
            _write_outputs(out, results, table, chart, answered)
        _log_artifacts(results, table, chart)
    return results


def score_answers(benchmark: str, answers_path: str, benchmark_path: str | None = None, split: str = "test") -> dict[str, Any]:
    """Score an answers file produced elsewhere (LLaVA's answers-JSONL; MMBench also its upload xlsx).

    `benchmark_path` is the benchmark's folder (MME: also a ground-truth folder; world-vqa: the
    dataset URI). MMBench's upload xlsx carries its answers and needs no TSV.
    """
    return get_benchmark(benchmark, benchmark_path, None, split).score_answers(answers_path)


# reporting -----------------------------------------------------------------------------------


def flat_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """Numeric leaves as `a.b.c` keys (what MLflow gets), characters MLflow refuses in names as `_`."""
    return {k: float(v) for k, v in _leaves(results).items()}


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for key, value in tree.items():
        name = prefix + re.sub(r"[^\w.\-/]", "_", str(key))
        if isinstance(value, Mapping):
            out.update(_leaves(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def _format(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def results_table(results: Mapping[str, Any], charts: Mapping[str, Mapping[str, Mapping[str, float]]], model_id: str) -> str:
    """Markdown: headline metrics of every benchmark, then one table per category breakdown."""
    lines = [f"# Evaluation of {model_id}", "", "| benchmark | metric | value |", "|---|---|---|"]
    for name, result in results.items():
        headline = {k: v for k, v in result.items() if k not in BREAKDOWN_KEYS}
        for key, value in _leaves(headline).items():
            if not any(f".{b}." in f".{key}." for b in BREAKDOWN_KEYS):
                lines.append(f"| {name} | {key} | {_format(value)} |")
    for name, series in charts.items():
        for title, values in series.items():
            lines += ["", f"## {title}", "", "| category | value |", "|---|---|"]
            lines += [f"| {category} | {_format(value)} |" for category, value in values.items()]
    return "\n".join(lines) + "\n"


def results_chart(charts: Mapping[str, Mapping[str, Mapping[str, float]]]) -> bytes:
    """A PNG: one horizontal bar panel per category breakdown, values in [0, 1]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(title, values) for series in charts.values() for title, values in series.items() if values]
    heights = [max(1.2, 0.28 * len(values) + 0.8) for _, values in panels] or [1.5]
    figure = Figure(figsize=(7, sum(heights)), layout="constrained")
    FigureCanvasAgg(figure)
    if not panels:
        figure.text(0.5, 0.5, "no per-category results", ha="center", va="center")
    axes = figure.subplots(len(panels), 1, height_ratios=heights, squeeze=False)[:, 0] if panels else []
    for ax, (title, values) in zip(axes, panels):
        labels = list(values)
        ax.barh(labels, [values[k] for k in labels], color="#4c72b0")
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        for y, label in enumerate(labels):
            ax.text(min(values[label], 0.9) + 0.01, y, f"{values[label]:.2f}", va="center", fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _write_outputs(out: str, results: Mapping[str, Any], table: str, chart: bytes,
                   answered: list[tuple[Benchmark, list[Question], list[dict[str, Any]]]]) -> None:
    from sharegpt4v.evaluation.mmbench import upload_table
    from sharegpt4v.storage import open_store

    store = open_store(out)
    for benchmark, questions, records in answered:
        store.put_bytes(f"answers/{benchmark.name}.jsonl", dump_jsonl(records))
        if benchmark.name == "mmbench":
            store.put_bytes("answers/mmbench_upload.xlsx", upload_table(questions, records))
    store.put_bytes("results.json", json.dumps(results, indent=2, sort_keys=True).encode())
    store.put_bytes("results.md", table.encode())
    store.put_bytes("results.png", chart)


def _log_artifacts(results: Mapping[str, Any], table: str, chart: bytes) -> None:
    from sharegpt4v import tracking

    if not tracking.tracking_enabled():
        return
    import mlflow
    from PIL import Image

    if mlflow.active_run() is None:
        return
    mlflow.log_text(table, "eval/results.md")
    tracking.log_image(Image.open(io.BytesIO(chart)), "eval/results.png")
    tracking.log_dict(dict(results), "eval/results.json")

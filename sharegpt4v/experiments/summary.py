"""The ablation's results: mean ± std over seeds per arm, the blind rows, the captioner's quality and the
paper's claims checked as targets; as JSON, a Markdown table, a chart and one MLflow run."""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

PERCEPTION = ("existence", "count", "position", "colour")
SHORT = ("colour", "count", "shape", "position", "background")
# metric -> column label, in table order. `perception` is MME-style (0-100); the others are accuracies.
METRICS: dict[str, str] = {
    "world-vqa.perception": "perception (0-100)",
    **{f"world-vqa.yesno.categories.{c}.score": f"P: {c}" for c in PERCEPTION},
    "world-vqa.mc.circular_headline": "MC circular",
    "world-vqa.short.acc": "short answers",
    **{f"world-vqa.short.categories.{c}.acc": f"short: {c}" for c in SHORT},
}
STANDARD_ERRORS = {"world-vqa.perception": "world-vqa.perception_se",
                   "world-vqa.mc.circular_headline": "world-vqa.mc.circular_headline_se",
                   "world-vqa.short.acc": "world-vqa.short.acc_se"}
BLIND_MAJORITY, BLIND_IMAGE = "blind-majority", "blind-image"
CAPTION_KINDS = ("object", "colour", "shape", "size", "position", "count", "relation", "background", "texture", "style")
TARGETS = {"B - A perception": ">= 15 points", "B above blind": "every perception category",
           "D share of B's gain": ">= 0.70", "shuffled <= A": "perception", "minutes": "<= 30",
           "captioner recall / teacher's": ">= 0.90", "captioner object recall": ">= 0.80",
           "captioner false facts / caption": "<= 0.50",
           # reported beside the targets, not targets: the headline that moves when perception cannot
           "B - A short answers": "(reported)", "D share of B's short-answer gain": "(reported)"}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(results: list[dict[str, Any]], blind: dict[str, float], chain: dict[str, Any] | None) -> dict[str, Any]:
    """Rows per arm (mean/std over seeds of every reported metric, mean standard error of the headlines),
    the blind rows, the captioner's quality and the targets."""
    from sharegpt4v.experiments.ablation import ARMS

    rows: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        runs = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
        if runs:
            rows[arm] = _row(ARMS[arm]["label"], runs, "metrics")
    blank = [r for r in results if r.get("blank_image_metrics")]
    rows[BLIND_MAJORITY] = _row("majority answer per question template (never sees the image)",
                                [{"seed": None, "metrics": blind}], "metrics")
    if blank:
        rows[BLIND_IMAGE] = _row("B's chat model asked with a blank image", blank, "blank_image_metrics")
    summary: dict[str, Any] = {"rows": rows, "captioner": _captioner(chain) if chain else None}
    summary["targets"] = targets(summary)
    return summary


def _row(label: str, runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    seeds = [r["seed"] for r in runs if r["seed"] is not None]
    values = {m: _stats([float(r[key].get(m, float("nan"))) for r in runs]) for m in METRICS}
    errors = {m: statistics.fmean(float(r[key].get(se, 0.0)) for r in runs) for m, se in STANDARD_ERRORS.items()}
    per_seed = {str(r["seed"]): float(r[key].get("world-vqa.perception", float("nan"))) for r in runs if r["seed"] is not None}
    return {"label": label, "seeds": seeds, "values": values, "se": errors, "perception_by_seed": per_seed,
            "minutes": statistics.fmean(r.get("minutes", 0.0) for r in runs) if seeds else 0.0}


def _captioner(chain: dict[str, Any]) -> dict[str, Any]:
    sets = {}
    for name, facts in chain["quality"].items():
        sets[name] = {"recall": facts["mean_recall"], "false_per_caption": facts["mean_hallucinated"],
                      "scored": facts["scored"], "recall_by_kind": facts["recall_by_kind"],
                      "false_by_kind": facts.get("false_by_kind", {})}
    return {"sets": sets, "checkpoint": chain["checkpoint"], "base": chain["base"], "report": chain["report"],
            "minutes": chain["minutes"]}


def _mean(summary: dict[str, Any], row: str, metric: str = "world-vqa.perception") -> float | None:
    entry = summary["rows"].get(row)
    return entry["values"][metric]["mean"] if entry and metric in entry["values"] else None


def _difference_se(summary: dict[str, Any], first: str, second: str, metric: str = "world-vqa.perception") -> float:
    """Standard error of the difference of two rows' means: each row's own (the test split's, or the
    spread of its seeds' means when larger)."""
    def se(row: str) -> float:
        entry = summary["rows"][row]
        spread = entry["values"][metric]["std"] / math.sqrt(len(entry.get("seeds") or [None]))
        return max(float(entry.get("se", {}).get(metric, 0.0)), spread)

    return math.hypot(se(first), se(second))


def targets(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each of the issue's targets that the run can check: its value and whether it holds."""
    out: dict[str, dict[str, Any]] = {}
    a, b, d, shuffled = (_mean(summary, arm) for arm in ("A", "B", "D", "shuffled"))
    if a is not None and b is not None:
        out["B - A perception"] = {"value": b - a, "met": b - a >= 15.0}
        blinds = [r for r in (BLIND_MAJORITY, BLIND_IMAGE) if r in summary["rows"]]
        margins = {c: _mean(summary, "B", f"world-vqa.yesno.categories.{c}.score")
                   - max(_mean(summary, r, f"world-vqa.yesno.categories.{c}.score") for r in blinds) for c in PERCEPTION}
        out["B above blind"] = {"value": margins, "met": all(m > 0 for m in margins.values())}
        if d is not None:
            # A share of noise is no share: B's gain must exceed twice the standard error of B - A first.
            share = (d - a) / (b - a) if b != a else float("nan")
            out["D share of B's gain"] = {"value": share, "met": b - a > 2 * _difference_se(summary, "A", "B")
                                          and share >= 0.7}
        if shuffled is not None:
            out["shuffled <= A"] = {"value": shuffled - a, "met": shuffled <= a}
    short_a, short_b, short_d = (_mean(summary, arm, "world-vqa.short.acc") for arm in ("A", "B", "D"))
    if short_a is not None and short_b is not None:
        out["B - A short answers"] = {"value": short_b - short_a, "met": None}
        if short_d is not None and short_b != short_a:
            out["D share of B's short-answer gain"] = {"value": (short_d - short_a) / (short_b - short_a), "met": None}
    captioner = summary.get("captioner")
    if captioner and "captioner" in captioner["sets"] and "teacher" in captioner["sets"]:
        own, teacher = captioner["sets"]["captioner"], captioner["sets"]["teacher"]
        ratio = own["recall"] / teacher["recall"] if teacher["recall"] else 0.0
        out["captioner recall / teacher's"] = {"value": ratio, "met": ratio >= 0.9}
        obj = own["recall_by_kind"].get("object", 0.0)
        out["captioner object recall"] = {"value": obj, "met": obj >= 0.8}
        out["captioner false facts / caption"] = {"value": own["false_per_caption"], "met": own["false_per_caption"] <= 0.5}
    return out


def _cell(row: dict[str, Any], metric: str) -> str:
    v = row["values"][metric]
    scale = "{:.1f}" if metric.endswith(("perception", ".score")) else "{:.3f}"
    if len(row["seeds"]) > 1:
        return f"{scale.format(v['mean'])} ± {scale.format(v['std'])}"
    return scale.format(v["mean"])


def results_table(summary: dict[str, Any]) -> str:
    """Markdown: every arm and blind row (mean ± std over seeds), then the captioner and the targets."""
    head = ["row", "seeds", *METRICS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in summary["rows"].items():
        cells = [_cell(row, m) for m in METRICS]
        lines.append(f"| {name}: {row['label']} | {len(row['seeds']) or '-'} | " + " | ".join(cells) + " |")
    se = summary["rows"].get("B", next(iter(summary["rows"].values())))["se"]
    lines.append("")
    lines.append(f"Standard error of one run on the whole test split (B): perception ± {se['world-vqa.perception']:.1f}, "
                 f"MC circular ± {se['world-vqa.mc.circular_headline']:.3f}, short answers ± {se['world-vqa.short.acc']:.3f}.")
    captioner = summary.get("captioner")
    if captioner:
        lines += ["", "| captions (test split) | fact recall | false facts / caption | "
                  + " | ".join(CAPTION_KINDS) + " |", "|" + "---|" * (3 + len(CAPTION_KINDS))]
        for name, s in captioner["sets"].items():
            kinds = " | ".join(f"{s['recall_by_kind'].get(k, float('nan')):.2f}" for k in CAPTION_KINDS)
            lines.append(f"| {name} ({s['scored']}) | {s['recall']:.3f} | {s['false_per_caption']:.2f} | {kinds} |")
    if summary.get("targets"):
        lines += ["", "| target | wanted | measured | met |", "|---|---|---|---|"]
        for name, t in summary["targets"].items():
            value = t["value"]
            shown = ", ".join(f"{k} {v:+.1f}" for k, v in value.items()) if isinstance(value, dict) else f"{value:.3f}"
            lines.append(f"| {name} | {TARGETS.get(name, '')} | {shown} | {'–' if t['met'] is None else 'yes' if t['met'] else 'no'} |")
    if "minutes" in summary:
        lines += ["", f"Whole ablation: {summary['minutes']:.1f} min."]
    return "\n".join(lines) + "\n"


def perception_chart(summary: dict[str, Any]) -> bytes:
    """PNG: MME-style score per perception category for every row (mean over seeds, std as error bars)."""
    import io

    import numpy as np
    from matplotlib.figure import Figure

    names = list(summary["rows"])
    groups = ["overall", *PERCEPTION]
    keys = ["world-vqa.perception", *(f"world-vqa.yesno.categories.{c}.score" for c in PERCEPTION)]
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = summary["rows"][name]["values"]
        ax.bar(np.arange(len(groups)) + i * width, [values[k]["mean"] for k in keys], width,
               yerr=[values[k]["std"] for k in keys], label=name, capsize=2)
    ax.set_xticks(np.arange(len(groups)) + width * (len(names) - 1) / 2, groups)
    ax.set_ylabel("MME-style score (0-100)")
    ax.set_ylim(0, 100)
    ax.set_title("Perception by arm (mean ± std over seeds)")
    fig.legend(loc="outside right upper", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _slug(name: str) -> str:
    """A row or target name as an MLflow metric name ("blind: B's model, blank image" -> "blind_B_s_model...")."""
    import re

    return re.sub(r"_+", "_", re.sub(r"[^\w.\-]", "_", name)).strip("_")


def log_summary(summary: dict[str, Any]) -> None:
    """The summary as one MLflow run of the ablation experiment: mean/std per row and metric, targets,
    the table and the chart."""
    from sharegpt4v import tracking
    from sharegpt4v.experiments.ablation import EXPERIMENT

    if not tracking.tracking_enabled():
        return
    with tracking.experiment(EXPERIMENT), tracking.stage_run("ablation-summary", {"rows": ",".join(summary["rows"])}):
        metrics: dict[str, float] = {}
        for name, row in summary["rows"].items():
            for key, value in row["values"].items():
                metrics[f"{_slug(name)}.{key}.mean"] = value["mean"]
                metrics[f"{_slug(name)}.{key}.std"] = value["std"]
        for name, t in summary.get("targets", {}).items():
            if not isinstance(t["value"], dict):
                metrics[f"target.{_slug(name)}"] = float(t["value"])
        tracking.log_metrics({k: v for k, v in metrics.items() if v == v})  # NaN: metric absent in a row
        tracking.log_dict(json.loads(json.dumps(summary)), "ablation/results.json")
        tracking.log_text(results_table(summary), "ablation/results.md")
        import io

        from PIL import Image

        tracking.log_image(Image.open(io.BytesIO(perception_chart(summary))), "ablation/perception.png")

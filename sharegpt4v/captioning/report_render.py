"""Rendering a caption quality report (`report.build_report`): PNG plots (length histograms,
part-of-speech composition, fact recall by kind) and a self-contained HTML page (tables, plots and
sample images as data URLs, no scripts)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable
from typing import Any

import numpy as np

# The comparison table's columns, in order (keys of `report["comparison"]` rows).
COMPARISON_COLUMNS = ("set", "ok", "error", "mean_chars", "mean_tokens", "noun_share", "adjective_share",
                      "distinct_2", "duplicates", "fact_recall", "hallucinated_per_caption")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def make_plots(report: dict[str, Any]) -> dict[str, bytes]:
    """PNG plots: overlaid length histograms, POS composition, fact recall by kind."""
    from matplotlib.figure import (
        Figure,  # no pyplot: no global state, Agg canvas on save
    )

    names = [n for n in report["set_order"] if report["sets"][n]["length"]]
    plots: dict[str, bytes] = {}
    if not names:
        return plots

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    for ax, unit in zip(fig.subplots(1, 2), ("chars", "tokens")):
        for name in names:
            s = report["sets"][name]
            hist = s["length"][unit]["histogram"]
            share = np.asarray(hist["counts"], dtype=float) / max(s["counts"]["ok"], 1)
            ax.stairs(share, hist["edges"], label=name, linewidth=1.8)
        ax.set_xlabel("characters" if unit == "chars" else report["token_unit"])
        ax.set_ylabel("share of captions")
        ax.set_title(f"Caption length ({unit})")
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    plots["lengths.png"] = _png(fig)

    classes = list(report["sets"][names[0]]["pos"]["share"])  # POS classes in the report's order
    plots["pos.png"] = _grouped_bars(
        classes, {n: [report["sets"][n]["pos"]["share"][c] for c in classes] for n in names},
        "Part-of-speech composition", "share of words")

    with_facts = [n for n in names if (report["sets"][n]["facts"] or {}).get("scored")]
    if with_facts:
        kinds = sorted({k for n in with_facts for k in report["sets"][n]["facts"]["recall_by_kind"]},
                       key=_fact_kind_order)
        groups = ["all", *kinds]
        values = {n: [report["sets"][n]["facts"]["mean_recall"],
                      *(report["sets"][n]["facts"]["recall_by_kind"].get(k, 0.0) for k in kinds)]
                  for n in with_facts}
        plots["fact_recall.png"] = _grouped_bars(groups, values, "Fact recall by kind (synthetic world)", "recall",
                                                 ylim=(0, 1.05))
    return plots


def _fact_kind_order(kind: str) -> int:
    from sharegpt4v.world import SCORED_KINDS

    return SCORED_KINDS.index(kind) if kind in SCORED_KINDS else len(SCORED_KINDS)


def _grouped_bars(groups: list[str], values: dict[str, list[float]], title: str, ylabel: str,
                  ylim: tuple[float, float] | None = None) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(groups))
    width = 0.8 / max(len(values), 1)
    for i, (name, ys) in enumerate(values.items()):
        ax.bar(x + (i - (len(values) - 1) / 2) * width, ys, width, label=name)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    fig.legend(loc="outside right upper", fontsize=8)
    return _png(fig)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}
th,td{border:1px solid #ccc;padding:.25em .5em;vertical-align:top;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f3f3f3}
.caption{white-space:pre-wrap;max-width:34em;font-size:.9em}
img.thumb{width:192px;image-rendering:pixelated}
img.plot{max-width:100%}
.muted{color:#777}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return _e(value)


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]], table_id: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class=n>{_fmt(v)}</td>" if isinstance(v, (int, float)) or v is None
                         else f"<td>{_e(v)}</td>" for v in row) + "</tr>"
        for row in rows)
    ident = f" id={table_id}" if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    """A self-contained page: tables, plots and sample images as data URLs, no scripts."""
    parts = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Caption quality report</title>",
             f"<style>{_CSS}</style></head><body><h1>Caption quality report</h1>"]
    dataset = report["dataset"]
    if dataset:
        where = _e(dataset["uri"]) + (f" (split {_e(dataset['split'])})" if dataset["split"] else "")
    else:
        where = "<span class=muted>none (no fact scores, no images)</span>"
    parts.append(f"<p>Dataset: {where}<br>Token counts: {_e(report['token_unit'])}"
                 f"<br>POS tagger: {_e(report['pos_tagger'])}</p>")

    parts.append("<h2>Comparison</h2>")
    parts.append(_table(COMPARISON_COLUMNS, ([row[c] for c in COMPARISON_COLUMNS] for row in report["comparison"]),
                        "comparison"))
    parts.append("<p class=muted>fact_recall: share of the scene's facts a caption states; "
                 "hallucinated_per_caption: stated facts that are false (synthetic world only).</p>")

    titles = {"lengths.png": "Length distribution", "pos.png": "Part-of-speech composition",
              "fact_recall.png": "Fact recall by kind"}
    if plots:
        parts.append("<h2>Plots</h2>")
        for name, png in plots.items():
            parts.append(f"<h3>{_e(titles.get(name, name))}</h3>"
                         f"<img class=plot alt='{_e(name)}' src='{data_url(png)}'>")

    parts.append("<h2>Caption sets</h2>")
    for name in report["set_order"]:
        parts.append(_set_section(name, report["sets"][name], report["token_unit"]))

    if report["samples"]:
        names = report["set_order"]
        parts.append("<h2>Samples</h2><table id=samples><thead><tr><th>image</th>"
                     + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr></thead><tbody>")
        for sample in report["samples"]:
            image = (f"<img class=thumb alt='{_e(sample['id'])}' src='{_e(sample['image'])}'>" if sample.get("image")
                     else "<span class=muted>no image</span>")
            parts.append(f"<tr><td>{image}<br><code>{_e(sample['id'])}</code></td>"
                         + "".join(f"<td class=caption>{_e(sample['captions'].get(n, ''))}</td>" for n in names)
                         + "</tr>")
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _set_section(name: str, s: dict[str, Any], unit: str) -> str:
    c = s["counts"]
    out = [f"<h3>{_e(name)}</h3><p class=muted>{_e(s['source'])}</p>",
           _table(("records", "ok", "error", "duplicate ids", "ids not in dataset"),
                  [(c["records"], c["ok"], c["error"], c["duplicate_ids"], c["not_in_dataset"])])]
    if c["error_reasons"]:
        out.append(_table(("error reason", "count"), c["error_reasons"].items()))
    if s["length"]:
        keys = ("mean", "median", "p10", "p90", "min", "max")
        out.append(_table(("length", *keys), [("characters", *(s["length"]["chars"][k] for k in keys)),
                                              (unit, *(s["length"]["tokens"][k] for k in keys))]))
    if s["pos"]:
        classes = list(s["pos"]["share"])
        out.append(_table(("part of speech", *classes),
                          [("share of words", *(s["pos"]["share"][k] for k in classes)),
                           ("per caption", *(s["pos"]["per_caption"][k] for k in classes))]))
    if s["diversity"]:
        d = s["diversity"]
        keys = ("distinct_1", "distinct_2", "distinct_3", "repeated_4gram_captions", "repeated_4gram_rate",
                "unique_captions", "duplicates")
        out.append(_table(keys, [tuple(d[k] for k in keys)]))
        if d["top_duplicates"]:
            out.append(_table(("most common duplicate", "count"),
                              ((t["caption"], t["count"]) for t in d["top_duplicates"])))
    if s["facts"]:
        f = s["facts"]
        keys = ("scored", "mean_recall", "median_recall", "mean_hallucinated", "captions_with_hallucination",
                "missing_in_dataset", "no_scene")
        out.append(_table(keys, [tuple(f[k] for k in keys)]))
        if f["recall_by_kind"]:
            kinds = list(f["recall_by_kind"])
            out.append(_table(("by kind", *kinds), [("recall", *f["recall_by_kind"].values()),
                                                    ("false / caption", *(f["false_by_kind"].get(k, 0.0) for k in kinds))]))
    return "\n".join(out)

"""Caption quality report: compare caption sets by length, wording, diversity and (on the
synthetic world) the facts they get right or invent.

    report = build_report({**world_caption_sets(world), "captioner": "s3://bucket/captions"}, world)
    write_report(report, "s3://bucket/reports/captioner-v3")   # report.json + report.html

Part-of-speech composition (like the paper's Table 7) uses TextBlob's bundled Pattern tagger
(`textblob.en.tag`), which needs no NLTK data and runs offline. Penn tags are folded into
eight classes, punctuation is left out, so the shares of one set sum to 1.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import statistics
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from sharegpt4v import storage, tracking
from sharegpt4v.captioning.job import iter_caption_records
from sharegpt4v.captioning.report_render import data_url, make_plots, render_html
from sharegpt4v.data.shards import open_dataset, sample_image, sample_meta

REPORT_VERSION = 1
POS_CLASSES = ("noun", "adjective", "verb", "adverb", "pronoun", "preposition", "numeral", "other")
_PENN_CLASS = {
    **dict.fromkeys(("NN", "NNS", "NNP", "NNPS"), "noun"),
    **dict.fromkeys(("JJ", "JJR", "JJS"), "adjective"),
    **dict.fromkeys(("VB", "VBD", "VBG", "VBN", "VBP", "VBZ", "MD"), "verb"),
    **dict.fromkeys(("RB", "RBR", "RBS", "WRB"), "adverb"),
    **dict.fromkeys(("PRP", "PRP$", "WP", "WP$"), "pronoun"),
    **dict.fromkeys(("IN", "TO"), "preposition"),
    "CD": "numeral",
}  # everything else (determiners, conjunctions, existential "there", particles, ...) is "other"
HIST_BINS = 20
THUMBNAIL_PX = 256
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_ALNUM = re.compile(r"[^\W_]")

CaptionSet = str | list[dict[str, Any]]


# --- inputs -------------------------------------------------------------------------------


def world_caption_sets(dataset_uri: str, split: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """The world's own brief and detailed captions as two caption sets (reference arms)."""
    sets: dict[str, list[dict[str, Any]]] = {"world:brief": [], "world:detailed": []}
    for sample in open_dataset(dataset_uri).samples(split):
        meta = sample_meta(sample)
        for name, field in (("world:brief", "brief_caption"), ("world:detailed", "detailed_caption")):
            if isinstance(meta.get(field), str):
                sets[name].append({"id": meta["id"], "source": meta.get("source", "unknown"),
                                   "caption": meta[field], "captioner": name, "status": "ok"})
    return sets


def _load(source: CaptionSet) -> list[dict[str, Any]]:
    return list(iter_caption_records(source)) if isinstance(source, str) else list(source)


# --- per-caption measurements ---------------------------------------------------------------


class _PosTagger:
    """Coarse POS counts per caption, cached per unique text (sets often share captions)."""

    def __init__(self) -> None:
        from textblob.en import (
            tag,  # the Pattern tagger: bundled lexicon, no NLTK corpora
        )

        self._tag = tag
        self._cache: dict[str, Counter] = {}

    def counts(self, text: str) -> Counter:
        found = self._cache.get(text)
        if found is None:
            found = Counter(_PENN_CLASS.get(t.split("-")[0], "other")
                            for word, t in self._tag(text, tokenize=True) if _ALNUM.search(word))
            self._cache[text] = found
        return found


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def _token_counts(texts: list[str], tokenizer: Any) -> list[int]:
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def token_unit(tokenizer: Any) -> str:
    if tokenizer is None:
        return "whitespace words"
    return f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}"


# --- statistics -------------------------------------------------------------------------------


def _length_stats(values: list[int]) -> dict[str, float | int]:
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {"mean": round(statistics.fmean(values), 2), "median": float(median), "p10": float(p10),
            "p90": float(p90), "min": min(values), "max": max(values)}


def _hist_edges(maximum: float, bins: int = HIST_BINS) -> list[float]:
    """Bins from 0 of a round width (1, 2, 5 x 10^k), at most `bins` of them, covering `maximum`."""
    raw = max(maximum, 1.0) / bins
    scale = 10 ** np.floor(np.log10(raw))
    width = float(next(m * scale for m in (1, 2, 5, 10) if m * scale >= raw))
    count = min(bins, int(maximum // width) + 1)
    return [round(i * width, 6) for i in range(count + 1)]


def _histogram(values: list[int], edges: list[float]) -> dict[str, list[float] | list[int]]:
    counts, _ = np.histogram(values, bins=edges)
    return {"edges": edges, "counts": [int(c) for c in counts]}


def _pos_stats(captions: list[str], tagger: _PosTagger) -> dict[str, Any]:
    total: Counter = Counter()
    for text in captions:
        total.update(tagger.counts(text))
    words = sum(total.values())
    return {
        "words": words,
        "share": {c: round(total[c] / words, 4) if words else 0.0 for c in POS_CLASSES},
        "per_caption": {c: round(total[c] / len(captions), 2) for c in POS_CLASSES},
    }


def diversity(captions: list[str], top: int = 5) -> dict[str, Any]:
    """distinct-n over the set (n-grams within captions, lower-cased words), repeated 4-grams
    inside captions and exact duplicate captions."""
    words = [_words(t) for t in captions]
    out: dict[str, Any] = {}
    for n in (1, 2, 3):
        grams = [g for w in words for g in _ngrams(w, n)]
        out[f"distinct_{n}"] = round(len(set(grams)) / len(grams), 4) if grams else 0.0
    rates = []
    for w in words:
        grams = _ngrams(w, 4)
        rates.append(1 - len(set(grams)) / len(grams) if grams else 0.0)
    out["repeated_4gram_captions"] = round(sum(r > 0 for r in rates) / len(rates), 4) if rates else 0.0
    out["repeated_4gram_rate"] = round(statistics.fmean(rates), 4) if rates else 0.0
    counts = Counter(captions)
    out["unique_captions"] = len(counts)
    out["duplicates"] = len(captions) - len(counts)  # captions identical to an earlier one
    out["top_duplicates"] = [{"caption": c, "count": n}
                             for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top] if n > 1]
    return out


def _fact_stats(ok: list[dict[str, Any]], scenes: dict[str, Any], dataset_ids: set[str]) -> dict[str, Any]:
    from sharegpt4v.world import SCORED_KINDS, score_caption

    recalls, hallucinated = [], []
    by_kind: dict[str, list[float]] = {k: [] for k in SCORED_KINDS}
    false_by_kind: dict[str, list[int]] = {k: [] for k in SCORED_KINDS}
    missing = no_scene = 0
    for record in ok:
        sid = str(record["id"])
        scene = scenes.get(sid)
        if scene is None:
            if sid in dataset_ids:
                no_scene += 1
            else:
                missing += 1
            continue
        score = score_caption(record.get("caption") or "", scene)
        recalls.append(score.recall)
        hallucinated.append(score.hallucinated)
        for kind, value in score.recall_by_kind.items():
            by_kind[kind].append(value)
        for kind, value in score.false_by_kind.items():
            false_by_kind[kind].append(value)
    scored = len(recalls)
    return {
        "scored": scored,
        "missing_in_dataset": missing,
        "no_scene": no_scene,
        "mean_recall": round(statistics.fmean(recalls), 4) if scored else None,
        "median_recall": round(statistics.median(recalls), 4) if scored else None,
        "mean_hallucinated": round(statistics.fmean(hallucinated), 4) if scored else None,
        "captions_with_hallucination": round(sum(h > 0 for h in hallucinated) / scored, 4) if scored else None,
        "recall_by_kind": {k: round(statistics.fmean(v), 4) for k, v in by_kind.items() if v},
        # false statements per caption, by kind (colour/shape: named but on no object of the scene)
        "false_by_kind": {k: round(statistics.fmean(v), 4) for k, v in false_by_kind.items()
                          if v and (by_kind[k] or any(v))},
    }


# --- the report ---------------------------------------------------------------------------


def build_report(
    caption_sets: dict[str, CaptionSet],
    dataset_uri: str | None = None,
    split: str | None = None,
    tokenizer: Any = None,
    samples: int = 12,
) -> dict[str, Any]:
    """Statistics per caption set, a comparison table and a few side-by-side samples.

    Each caption set is a caption-set URI or a list of records (`id`, `caption`, `status`).
    With `dataset_uri`, captions are joined by id with the dataset: fact recall and
    hallucinations where samples carry a world `scene`, and images for the samples.
    """
    if not caption_sets:
        raise ValueError("build_report: no caption sets given")
    loaded = {name: _load(source) for name, source in caption_sets.items()}
    by_id = {name: _first_by_id(records) for name, records in loaded.items()}
    sample_ids = _pick_samples(by_id, samples, oversample=4 if dataset_uri else 1)

    scenes: dict[str, Any] = {}
    dataset_ids: set[str] = set()
    images: dict[str, str] = {}
    if dataset_uri:
        wanted = set().union(*by_id.values())
        scenes, dataset_ids, images = _read_dataset(dataset_uri, split, wanted, set(sample_ids))
        sample_ids = [i for i in sample_ids if i in dataset_ids] or sample_ids
    sample_ids = sample_ids[:samples]

    tagger = _PosTagger()
    sets: dict[str, dict[str, Any]] = {}
    for name, records in loaded.items():
        ok = [r for r in records if r.get("status") == "ok"]
        reasons = Counter(str(r.get("reason") or "unknown") for r in records if r.get("status") != "ok")
        captions = [r.get("caption") or "" for r in ok]
        entry: dict[str, Any] = {
            "source": caption_sets[name] if isinstance(caption_sets[name], str) else "records",
            "counts": {"records": len(records), "ok": len(ok), "error": len(records) - len(ok),
                       "error_reasons": dict(sorted(reasons.items())),
                       "duplicate_ids": len(records) - len(by_id[name]),
                       "not_in_dataset": len(set(by_id[name]) - dataset_ids) if dataset_uri else None},
            "length": None, "pos": None, "diversity": None, "facts": None,
        }
        if captions:
            chars = [len(c) for c in captions]
            tokens = _token_counts(captions, tokenizer)
            entry["length"] = {"chars": _length_stats(chars), "tokens": _length_stats(tokens),
                               "_values": {"chars": chars, "tokens": tokens}}
            entry["pos"] = _pos_stats(captions, tagger)
            entry["diversity"] = diversity(captions)
        if scenes:
            entry["facts"] = _fact_stats(ok, scenes, dataset_ids)
        sets[name] = entry

    # One set of histogram edges for all sets, so the overlaid histograms compare.
    for unit in ("chars", "tokens"):
        top = max((max(s["length"]["_values"][unit]) for s in sets.values() if s["length"]), default=1)
        edges = _hist_edges(top)
        for s in sets.values():
            if s["length"]:
                s["length"][unit]["histogram"] = _histogram(s["length"]["_values"][unit], edges)
    for s in sets.values():
        if s["length"]:
            del s["length"]["_values"]

    return {
        "version": REPORT_VERSION,
        "dataset": {"uri": dataset_uri, "split": split} if dataset_uri else None,
        "token_unit": token_unit(tokenizer),
        "pos_tagger": "textblob.en.tag (Pattern, Penn tags folded into coarse classes)",
        "set_order": list(sets),
        "sets": sets,
        "comparison": [_comparison_row(name, s) for name, s in sets.items()],
        "samples": [_sample_entry(i, by_id, images) for i in sample_ids],
    }


def _first_by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        out.setdefault(str(r["id"]), r)
    return out


def _pick_samples(by_id: dict[str, dict[str, dict[str, Any]]], n: int, oversample: int) -> list[str]:
    """Ids present in every set, in an order fixed by a hash of the id (not by set order)."""
    if n <= 0:
        return []
    common = set.intersection(*(set(ids) for ids in by_id.values()))
    ranked = sorted(common, key=lambda i: (hashlib.sha256(i.encode()).hexdigest(), i))
    return ranked[: n * oversample]


def _read_dataset(uri: str, split: str | None, wanted: set[str],
                  image_ids: set[str]) -> tuple[dict[str, Any], set[str], dict[str, str]]:
    """One pass over the dataset: scenes of the wanted ids, all ids, thumbnails of `image_ids`."""
    from sharegpt4v.world import Scene

    scenes: dict[str, Any] = {}
    ids: set[str] = set()
    images: dict[str, str] = {}
    for sample in open_dataset(uri).samples(split):
        meta = sample_meta(sample)
        sid = str(meta["id"])
        ids.add(sid)
        if sid in wanted and isinstance(meta.get("scene"), dict):
            scenes[sid] = Scene.from_dict(meta["scene"])
        if sid in image_ids:
            images[sid] = _thumbnail(sample_image(sample)[1])
    return scenes, ids, images


def _thumbnail(image: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(image)) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return data_url(buf.getvalue())


def _sample_entry(sid: str, by_id: dict[str, dict[str, dict[str, Any]]], images: dict[str, str]) -> dict[str, Any]:
    captions = {}
    for name, records in by_id.items():
        r = records[sid]
        if r.get("status") == "ok":
            captions[name] = r.get("caption") or ""
        else:
            captions[name] = f"[error: {r.get('reason') or 'unknown'}] {r.get('detail') or ''}".strip()
    entry: dict[str, Any] = {"id": sid, "captions": captions}
    if sid in images:
        entry["image"] = images[sid]
    return entry


def _comparison_row(name: str, s: dict[str, Any]) -> dict[str, Any]:
    length, pos, div, facts = s["length"], s["pos"], s["diversity"], s["facts"]
    return {
        "set": name,
        "ok": s["counts"]["ok"],
        "error": s["counts"]["error"],
        "mean_chars": length["chars"]["mean"] if length else None,
        "mean_tokens": length["tokens"]["mean"] if length else None,
        "noun_share": pos["share"]["noun"] if pos else None,
        "adjective_share": pos["share"]["adjective"] if pos else None,
        "distinct_2": div["distinct_2"] if div else None,
        "duplicates": div["duplicates"] if div else None,
        "fact_recall": facts["mean_recall"] if facts else None,
        "hallucinated_per_caption": facts["mean_hallucinated"] if facts else None,
    }


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat numeric metrics per set: `{set}.fact_recall`, `{set}.mean_chars`, ..."""
    out: dict[str, float] = {}
    for name, s in report["sets"].items():
        prefix = _metric_name(name)
        values: dict[str, Any] = {k: v for k, v in _comparison_row(name, s).items() if k != "set"}
        values["records"] = s["counts"]["records"]
        values.update({f"error.{r}": n for r, n in s["counts"]["error_reasons"].items()})
        if s["length"]:
            values.update(median_chars=s["length"]["chars"]["median"], median_tokens=s["length"]["tokens"]["median"])
        if s["pos"]:
            values.update({f"pos.{c}": v for c, v in s["pos"]["share"].items()})
        if s["diversity"]:
            values.update({k: s["diversity"][k] for k in ("distinct_1", "distinct_3", "repeated_4gram_captions",
                                                          "repeated_4gram_rate")})
        if s["facts"]:
            values["missing_in_dataset"] = s["facts"]["missing_in_dataset"]
            values.update({f"recall.{k}": v for k, v in s["facts"]["recall_by_kind"].items()})
            values.update({f"false.{k}": v for k, v in s["facts"]["false_by_kind"].items()})
        out.update({f"{prefix}.{_metric_name(k)}": float(v) for k, v in values.items() if v is not None})
    return out


def _metric_name(name: str) -> str:
    return re.sub(r"[^\w.\-/ :]", "_", name)


# --- outputs --------------------------------------------------------------------------------


def report_json(report: dict[str, Any]) -> bytes:
    """Canonical JSON (sorted keys). Sample images live only in the HTML, to keep it small."""
    lean = {**report, "samples": [{k: v for k, v in s.items() if k != "image"} for s in report["samples"]]}
    return storage.json_bytes(lean)


def _with_images(report: dict[str, Any], dataset_uri: str | None) -> dict[str, Any]:
    """Fill in sample images from `dataset_uri` (e.g. for a report read back from report.json)."""
    uri = dataset_uri or (report.get("dataset") or {}).get("uri")
    missing = {s["id"] for s in report["samples"] if not s.get("image")}
    if not uri or not missing:
        return report
    split = (report.get("dataset") or {}).get("split")
    _, _, images = _read_dataset(uri, split, set(), missing)
    return {**report, "samples": [{**s, "image": s.get("image") or images.get(s["id"])} for s in report["samples"]]}


def write_report(report: dict[str, Any], out: str, dataset_uri: str | None = None) -> dict[str, str]:
    """Write `report.json`, `report.html` and `plots/*.png` to a folder or `s3://` prefix."""
    uris, _, _ = _write(report, out, dataset_uri)
    return uris


def _write(report: dict[str, Any], out: str, dataset_uri: str | None) -> tuple[dict[str, str], bytes, dict[str, bytes]]:
    plots = make_plots(report)
    page = render_html(_with_images(report, dataset_uri), plots).encode()
    store = storage.open_store(out)
    store.put_bytes("report.json", report_json(report))
    for name, png in plots.items():
        store.put_bytes(f"plots/{name}", png)
    store.put_bytes("report.html", page)  # last: its presence means the report is complete
    return {"json": store.url("report.json"), "html": store.url("report.html")}, page, plots


def log_report_to_mlflow(report: dict[str, Any], html_page: str | Path | bytes,
                         plots: dict[str, bytes] | None = None, artifact_dir: str = "caption-report") -> None:
    """Metrics per set, report.json, report.html and the plots, into the active MLflow run."""
    if not tracking.tracking_enabled():
        return
    import mlflow

    if mlflow.active_run() is None:
        return
    tracking.log_metrics(report_metrics(report))
    tracking.log_dict(json.loads(report_json(report)), f"{artifact_dir}/report.json")
    if isinstance(html_page, bytes):
        page = html_page
    elif storage.is_s3(str(html_page)):
        store, key = storage.split(str(html_page))
        page = store.get_bytes(key)
    else:
        page = Path(html_page).read_bytes()
    with tempfile.TemporaryDirectory(prefix="sharegpt4v-report-") as tmp:
        (Path(tmp) / "report.html").write_bytes(page)
        for name, png in (make_plots(report) if plots is None else plots).items():
            (Path(tmp) / "plots").mkdir(exist_ok=True)
            (Path(tmp) / "plots" / name).write_bytes(png)
        mlflow.log_artifacts(tmp, artifact_dir)


def run_report(
    caption_sets: dict[str, CaptionSet],
    out: str,
    dataset_uri: str | None = None,
    split: str | None = None,
    tokenizer: Any = None,
    samples: int = 12,
) -> dict[str, Any]:
    """Build, write and (when tracking is on) log the report, in one `caption-report` run."""
    params = {
        "output": out, "dataset": dataset_uri or "none", "split": split or "all", "samples": samples,
        "tokens": token_unit(tokenizer),
        **{f"set.{_metric_name(n)}": (src if isinstance(src, str) else f"{len(src)} records")
           for n, src in caption_sets.items()},
    }
    with tracking.stage_run("caption-report", params, tags={"stage": "captioning"}):
        report = build_report(caption_sets, dataset_uri, split, tokenizer, samples)
        _, page, plots = _write(report, out, dataset_uri)
        log_report_to_mlflow(report, page, plots)
    return report

"""The synthetic world's VQA benchmark (`world-vqa`): every `vqa` item of a world dataset split.

Three kinds, scored the way their public counterparts are:

- `yesno` (MME-style pairs): MME's yes/no parsing; `acc` over questions and `acc_plus` over
  pairs (a pair counts when all its questions are right);
- `mc` (MMBench-style, 4 options): each question is asked once per rotation of its options
  (`rotate`: letters re-assigned, the answer letter moves); `circular` counts a question only
  when every rotation is right, `vanilla` is accuracy on the unrotated copy; answers are read
  with `infer_option`;
- `short`: exact match after `normalize_short` (lower case, punctuation stripped, number words
  to digits).

Each kind is also reported per category, with its number of world `questions` (the top-level
`questions` counts prompts asked: 4 per MC question). `overall` = mean of yes/no `acc`, MC `circular` and
short `acc` (over the kinds present), in [0, 1]: the champion metric by default. The headlines that
mirror the paper's benchmarks, with standard errors, are `perception` (MME-style, 0-100),
`mc.circular_headline` (MMBench-style, constant-answer categories left out) and `short.acc`
(see `score_world`). `limit` caps
the number of world questions (an MC question's rotations count once; a yes/no pair is never
split, so the cap may leave one question fewer, and `limit=1` gives a whole pair).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from sharegpt4v.evaluation.benchmark import Benchmark
from sharegpt4v.evaluation.common import (
    LETTERS,
    BenchmarkError,
    Question,
    choice_prompt,
    group_all,
    infer_option,
    mean,
    normalize_short,
    parse_yes_no,
    rotate,
    short_prompt,
)

KINDS = ("yesno", "mc", "short")
_KIND_ALIASES = {"yesno": "yesno", "mc": "mc", "choice": "mc", "short": "short"}


def item_questions(item: dict[str, Any], image: bytes | None) -> list[Question]:
    """The benchmark questions of one world `vqa` item (4 for a multiple-choice item)."""
    kind = _KIND_ALIASES.get(item["kind"])
    if kind is None:
        raise BenchmarkError(f"world-vqa: item {item.get('qid')} has unknown kind {item['kind']!r}")
    qid, category = item["qid"], item["category"]
    if kind == "yesno":
        return [Question(qid, image, short_prompt(item["question"]), item["answer"].lower(), category,
                         {"kind": kind, "pair": item.get("pair", qid)})]
    if kind == "short":
        return [Question(qid, image, short_prompt(item["question"]), item["answer"], category, {"kind": kind})]
    options = list(item["options"])
    answer = LETTERS.index(item["answer"])
    return [
        Question(f"{qid}-r{k}", image, choice_prompt(item["question"], rotate(options, k)),
                 LETTERS[(answer + k) % len(options)], category,
                 {"kind": kind, "group": qid, "round": k, "options": rotate(options, k)})
        for k in range(len(options))
    ]


def _units(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Items with yes/no pairs kept together, so that `limit` never splits a pair."""
    units: list[list[dict[str, Any]]] = []
    for item in items:
        pair = item.get("pair") if item["kind"] == "yesno" else None
        if pair is not None and units and units[-1][0].get("pair") == pair:
            units[-1].append(item)
        else:
            units.append([item])
    return units


def _per_category(rows: list[tuple[str, Any]], fn: Any) -> dict[str, float]:
    by: dict[str, list[Any]] = {}
    for category, value in rows:
        by.setdefault(category, []).append(value)
    return {c: fn(v) for c, v in sorted(by.items())}


def _se(values: Sequence[float]) -> float:
    """Standard error of a mean (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n < 2:
        return 0.0
    m = sum(values) / n
    return (sum((v - m) ** 2 for v in values) / (n - 1) / n) ** 0.5


def _pooled_se(errors: Sequence[float]) -> float:
    """Standard error of the mean of independent category scores."""
    return (sum(e * e for e in errors) ** 0.5) / len(errors) if errors else 0.0


def score_world(questions: Sequence[Question], texts: Sequence[str | None]) -> dict[str, Any]:
    """Accuracies per kind and category, and the three headlines that mirror the paper's benchmarks.

    - `perception` (0-100, MME-style): per yes/no category, (acc + acc+) / 2 over its pairs; the mean
      over categories, i.e. MME's sum divided by its maximum.
    - `mc.circular_headline`: MMBench-style circular accuracy over the categories whose answer is not
      constant (a question every image answers the same way, such as the style of a photo-only world,
      tells nothing about seeing); the constant ones are listed in `mc.constant_categories`.
    - `short.acc`: exact-match accuracy of short answers.
    Each comes with its standard error (`*_se`). `overall` = mean of yes/no acc, MC circular and short acc.
    """
    rows: dict[str, list[tuple[Question, bool]]] = {k: [] for k in KINDS}
    for q, text in zip(questions, texts):
        kind = q.meta["kind"]
        if text is None:
            right = False
        elif kind == "yesno":
            right = parse_yes_no(text) == q.answer
        elif kind == "mc":
            right = infer_option(text, dict(zip(LETTERS, q.meta["options"]))) == q.answer
        else:
            right = normalize_short(text) == normalize_short(q.answer)
        rows[kind].append((q, right))
    result: dict[str, Any] = {}
    headline = []
    if rows["yesno"]:
        pairs = group_all((q.meta["pair"], r) for q, r in rows["yesno"])
        pair_category = {q.meta["pair"]: str(q.category) for q, _ in rows["yesno"]}
        right_in_pair: dict[Any, list[bool]] = {}
        for q, r in rows["yesno"]:
            right_in_pair.setdefault(q.meta["pair"], []).append(r)
        # Per pair: (share of its questions right + all right) / 2; a category's MME score is their mean.
        pair_score = {p: (sum(rs) / len(rs) + pairs[p]) / 2 for p, rs in right_in_pair.items()}
        acc_by = _per_category([(str(q.category), r) for q, r in rows["yesno"]], mean)
        plus_by = _per_category([(pair_category[p], hit) for p, hit in pairs.items()], mean)
        score_by = _per_category([(pair_category[p], v) for p, v in pair_score.items()], list)
        categories = {c: {"acc": acc_by[c], "acc_plus": plus_by[c], "score": 100 * mean(score_by[c]),
                          "score_se": 100 * _se(score_by[c]), "pairs": len(score_by[c])} for c in acc_by}
        result["yesno"] = {
            "acc": mean(r for _, r in rows["yesno"]),
            "acc_plus": mean(pairs.values()),
            "questions": len(rows["yesno"]),
            "pairs": len(pairs),
            "categories": categories,
        }
        result["perception"] = mean(c["score"] for c in categories.values())
        result["perception_se"] = _pooled_se([c["score_se"] for c in categories.values()])
        headline.append(result["yesno"]["acc"])
    if rows["mc"]:
        groups = group_all((q.meta["group"], r) for q, r in rows["mc"])
        group_category = {q.meta["group"]: str(q.category) for q, _ in rows["mc"]}
        answers_by = _per_category([(str(q.category), q.meta["options"][LETTERS.index(q.answer)])
                                    for q, _ in rows["mc"] if q.meta["round"] == 0], set)
        constant = sorted(c for c, answers in answers_by.items() if len(answers) == 1)
        vanilla = [(str(q.category), r) for q, r in rows["mc"] if q.meta["round"] == 0]
        circular = _per_category([(group_category[g], hit) for g, hit in groups.items()], mean)
        vanilla_by = _per_category(vanilla, mean)
        informative = [float(hit) for g, hit in groups.items() if group_category[g] not in constant]
        result["mc"] = {
            "circular": mean(groups.values()),
            "vanilla": mean(r for _, r in vanilla),
            "circular_headline": mean(informative),
            "circular_headline_se": _se(informative),
            "constant_categories": constant,
            "questions": len(groups),
            "categories": {c: {"circular": circular[c], "vanilla": vanilla_by.get(c, 0.0)} for c in circular},
        }
        headline.append(result["mc"]["circular"])
    if rows["short"]:
        hits = [float(r) for _, r in rows["short"]]
        by = _per_category([(str(q.category), float(r)) for q, r in rows["short"]], list)
        result["short"] = {
            "acc": mean(hits),
            "acc_se": _se(hits),
            "questions": len(rows["short"]),
            "categories": {c: {"acc": mean(v), "acc_se": _se(v), "questions": len(v)} for c, v in by.items()},
        }
        headline.append(result["short"]["acc"])
    return {"overall": mean(headline), **result}


class WorldVQA(Benchmark):
    name = "world-vqa"
    source_help = "a world dataset URI (dataset_uri=...)"

    def items(self) -> list[tuple[dict[str, Any], bytes]]:
        from sharegpt4v.data.shards import open_dataset, sample_image, sample_meta

        if not self.source:
            raise BenchmarkError(f"world-vqa: needs {self.source_help}")
        dataset = open_dataset(self.source)
        if not dataset.shard_uris(self.split):
            splits = sorted({s["split"] for s in dataset.shards})
            raise BenchmarkError(f"world-vqa: {self.source} has no {self.split!r} split (it has {splits}; set eval.split)")
        out: list[tuple[dict[str, Any], bytes]] = []
        for sample in dataset.samples(self.split):
            meta = sample_meta(sample)
            if "vqa" not in meta:
                raise BenchmarkError(f"world-vqa: sample {meta.get('id')} has no vqa items (not a world dataset?)")
            image = sample_image(sample)[1]
            for unit in _units(meta["vqa"]):
                if self.limit is not None and out and len(out) + len(unit) > self.limit:
                    return out
                out += [(item, image) for item in unit]
        return out

    def load(self, images: bool = True) -> list[Question]:
        return [q for item, image in self.items() for q in item_questions(item, image if images else None)]

    def questions(self, images: bool = True) -> list[Question]:
        return self.load(images)  # `limit` counts world items and is applied while reading

    def key(self, question: Question) -> Hashable:
        return str(question.id)

    def score_texts(self, questions: Sequence[Question], texts: Sequence[str | None]) -> dict[str, Any]:
        return score_world(questions, texts)

    def chart(self, result: dict[str, Any]) -> dict[str, dict[str, float]]:
        series = {}
        for kind, metric, title in (("yesno", "acc", "yes/no acc"), ("mc", "circular", "MC circular"), ("short", "acc", "short acc")):
            if kind in result:
                series[f"world-vqa {title}"] = {c: v[metric] for c, v in result[kind]["categories"].items()}
        return series

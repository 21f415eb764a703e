"""Probes on a finished ablation: re-run one step of its chain with other settings and measure what changes.

- `sft_probe`: SFT (the recipe's, with the caller's overrides) from each arm's pretrained checkpoint of the
  ablation at `ablation`, evaluated on its whole test split, arms in parallel lanes. The README's SFT table
  (learning rates, steps; how often yes/no is learnt at all) comes from it.
- `reason_check`: for an SFT run with `sft.yes_no_reasons` (yes/no answered "no, it is blue." or "it is blue,
  so no."), the test split's yes/no questions answered at length: per category, is the answer word right,
  is the stated reason the world's, does the answer agree with the model's own reason, and the MME-style
  score of the answer words wherever they stand? (`sft_probe` runs it.)
- `vision_probe`: a vision tower trained as the recipe's foundations say (e.g. another alt text) beside the
  ablation's own tower, both read by linear probes of what a caption states about the whole image
  (background colour, texture): does the tower see it at all?
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from sharegpt4v import storage
from sharegpt4v.config import RecipeConfig, recipe_from_dict, with_overrides
from sharegpt4v.experiments.ablation import lane_threads, run_dir
from sharegpt4v.experiments.summary import METRICS

# the columns of the SFT probe's table: the ablation's headlines and perception categories, as its table labels them
SFT_PROBE_COLUMNS = {k: v for k, v in METRICS.items() if "short.categories" not in k}


def _ablation_recipe(ablation: str, recipe: RecipeConfig) -> RecipeConfig:
    from sharegpt4v.training.foundations import foundation_overrides

    foundations = storage.join(ablation, "foundations")
    if not storage.open_store(foundations).is_complete():
        raise ValueError(f"{ablation}: no finished ablation there (no complete foundations/)")
    return with_overrides(recipe, foundation_overrides(foundations))


def _pretrained(ablation: str, arm: str, seed: int) -> str | None:
    """The arm's pretrained checkpoint in the ablation (None: the arm has no pretraining)."""
    if arm == "none":
        return None
    final = run_dir(ablation.rstrip("/"), arm, seed) + "/pretrain/final"
    if not storage.open_store(final).is_complete():
        raise ValueError(f"{ablation}: arm {arm} seed {seed} has no finished pretraining ({final})")
    return final


def _sft_lane(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from sharegpt4v.evaluation import evaluate, flat_metrics
    from sharegpt4v.training.data import StageInputs
    from sharegpt4v.training.run import launch

    torch.set_num_threads(job["threads"])
    recipe = recipe_from_dict(job["recipe"])
    started = time.perf_counter()
    sft = launch("sft", recipe, StageInputs([job["world"]], split="val"), f"{job['out']}/sft", init=job["init"])
    metrics = flat_metrics(evaluate(sft.checkpoint_uri, recipe, dataset_uri=job["world"], out=f"{job['out']}/eval"))
    result = {"arm": job["arm"], "metrics": metrics}
    if recipe.sft.yes_no_reasons != "none":
        result["reasons"] = reason_check(sft.checkpoint_uri, recipe, job["world"])
    return {**result, "minutes": (time.perf_counter() - started) / 60}


def reason_check(checkpoint: str, recipe: RecipeConfig, world: str, max_new_tokens: int = 32) -> dict[str, Any]:
    """The model at `checkpoint` answers the test split's yes/no questions at length: {"categories":
    `score_reasons` with each category's MME-style "score" of the answer words, "perception": their mean}."""
    from sharegpt4v.evaluation.run import as_answerer
    from sharegpt4v.evaluation.world_vqa import WorldVQA, item_questions

    pairs = [(item, image) for item, image in WorldVQA(world, split="test").items()
             if item["kind"] == "yesno" and item.get("reason")]
    answerer, _ = as_answerer(checkpoint, recipe)
    answerer.max_new_tokens = max_new_tokens
    questions = [item_questions(item, image)[0] for item, image in pairs]
    texts = answerer.answer(questions)
    scores = score_reasons([item for item, _ in pairs], texts)
    words = score_answer_words(questions, texts)
    for category, row in scores.items():
        row["score"] = words["yesno"]["categories"][category]["score"]
    return {"perception": words["perception"], "categories": scores}


def score_answer_words(questions: list[Any], texts: list[str]) -> dict[str, Any]:
    """`score_world` of the answer words wherever they stand in reasoned answers (MME's parser reads only
    the first word: 0 for "it is blue, so no.")."""
    from sharegpt4v.evaluation.world_vqa import score_world

    return score_world(questions, [split_reasoned(t)[0] for t in texts])


def split_reasoned(text: str) -> tuple[str, str]:
    """(answer word, stated reason) of "no, it is blue." or "it is blue, so no."."""
    if ", so " in text:  # the reason first
        stated, _, word = text.strip().rpartition(", so ")
    else:
        word, _, stated = text.strip().partition(",")
    return word.strip(), stated.strip()


def score_reasons(items: list[dict[str, Any]], texts: list[str]) -> dict[str, dict[str, float]]:
    """{category: {"questions", "answer", "reason", "agrees"}} for answers like "no, it is blue." or "it is
    blue, so no.": the share whose answer word is right, whose stated reason is the item's, and whose
    answer word is the one the model's own reason implies (`reason_implies`; an answer without a
    readable reason does not agree)."""
    from collections import defaultdict

    from sharegpt4v.evaluation.common import parse_yes_no
    from sharegpt4v.world.vqa import reason_implies

    counts: dict[str, dict[str, float]] = defaultdict(lambda: {"questions": 0, "answer": 0, "reason": 0, "agrees": 0})
    for item, text in zip(items, texts, strict=True):
        word, stated = split_reasoned(text)
        row = counts[item["category"]]
        row["questions"] += 1
        row["answer"] += parse_yes_no(word) == item["answer"]
        row["reason"] += stated.rstrip(".").lower() == item["reason"].lower()
        row["agrees"] += reason_implies(stated, item["question"]) == parse_yes_no(word)
    return {c: {k: (v if k == "questions" else v / row["questions"]) for k, v in row.items()}
            for c, row in sorted(counts.items())}


def reason_table(results: list[dict[str, Any]]) -> str:
    """The reason check of each probed arm, a row per yes/no category."""
    lines = ["| arm | category | questions | answer right | reason right | answer agrees with its reason | "
             "MME-style score of the answer words |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "reasons" not in r:
            continue
        for category, row in r["reasons"]["categories"].items():
            lines.append(f"| {r['arm']} | {category} | {row['questions']:.0f} | {row['answer']:.3f} | "
                         f"{row['reason']:.3f} | {row['agrees']:.3f} | {row.get('score', float('nan')):.1f} |")
        lines.append(f"| {r['arm']} | perception (0-100) | | | | | {r['reasons']['perception']:.1f} |")
    return "\n".join(lines) + "\n"


def sft_probe(ablation: str, recipe: RecipeConfig, arms: tuple[str, ...], out: str, seed: int = 0,
              lanes: int = 2) -> list[dict[str, Any]]:
    """SFT + evaluation from each arm's pretrained model of `ablation` with `recipe`'s SFT; one result per arm.
    The SFT runs with the training seed `seed`, as the ablation's own SFT of those models did."""
    recipe = recipe_from_dict({**_ablation_recipe(ablation, recipe).to_dict(), "seed": seed})
    world = storage.join(ablation, "world")
    threads = lane_threads(lanes)
    jobs = [{"arm": arm, "init": _pretrained(ablation, arm, seed), "world": world, "out": f"{out}/{arm}",
             "recipe": recipe.to_dict(), "threads": threads} for arm in arms]
    with multiprocessing.get_context("spawn").Pool(min(lanes, len(jobs)), maxtasksperchild=1) as pool:
        return pool.map(_sft_lane, jobs, chunksize=1)


def sft_probe_table(results: list[dict[str, Any]]) -> str:
    lines = ["| arm | " + " | ".join(SFT_PROBE_COLUMNS.values()) + " | minutes |",
             "|---" * (len(SFT_PROBE_COLUMNS) + 2) + "|"]
    for r in results:
        # perception scores are 0-100, the rest accuracies
        cells = [f"{r['metrics'].get(k, float('nan')):.{1 if 'perception' in k or k.endswith('.score') else 3}f}"
                 for k in SFT_PROBE_COLUMNS]
        lines.append(f"| {r['arm']} | " + " | ".join(cells) + f" | {r['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


# the vision tower ----------------------------------------------------------------------------------------------


def _features(tower: Any, pixels: Any, feature_layer: int) -> Any:
    import torch

    with torch.no_grad():
        rows = [tower(pixel_values=pixels[i:i + 256], output_hidden_states=True).hidden_states[feature_layer][:, 1:]
                for i in range(0, len(pixels), 256)]
    return torch.cat(rows).flatten(1)  # every image token, in grid order: what the projector reads


def linear_probe(train_x: Any, train_y: list[str], test_x: Any, test_y: list[str], steps: int = 300) -> float:
    """Test accuracy of a softmax-regression probe (full-batch AdamW on standardised features)."""
    import torch

    labels = sorted(set(train_y) | set(test_y))
    index = {label: i for i, label in enumerate(labels)}
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    ys = torch.tensor([index[y] for y in train_y])
    torch.manual_seed(0)
    probe = torch.nn.Linear(xs.shape[1], len(labels))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(probe(xs), ys)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = probe(xt).argmax(1).tolist()
    return sum(labels[p] == y for p, y in zip(predicted, test_y)) / len(test_y)


def vision_probe(ablation: str, recipe: RecipeConfig, train_images: int = 3000) -> dict[str, dict[str, float]]:
    """{"ablation's tower" | "recipe's tower": {"background": acc, "texture": acc}} on the test split."""
    from transformers import AutoTokenizer, CLIPVisionModel

    from sharegpt4v.modeling.builder import materialize
    from sharegpt4v.training.foundations import load_world_images, train_vision_tower

    own = _ablation_recipe(ablation, recipe).model
    world = storage.join(ablation, "world")
    size, layer = recipe.model.vision.image_size, recipe.model.vision.feature_layer
    train = load_world_images(world, recipe.foundations.split, size)
    test = load_world_images(world, "test", size)
    load = {"use_safetensors": True, "local_files_only": True}
    towers = {"ablation's tower": CLIPVisionModel.from_pretrained(str(materialize(own.vision.path)), **load)}
    tokenizer = AutoTokenizer.from_pretrained(str(materialize(own.language.path)), local_files_only=True)
    towers["recipe's tower"], _ = train_vision_tower(recipe, train, tokenizer, seed=recipe.seed)
    results: dict[str, dict[str, float]] = {}
    for name, tower in towers.items():
        tower.eval()
        xs = _features(tower, train.pixels[:train_images], layer)
        xt = _features(tower, test.pixels, layer)
        results[name] = {kind: linear_probe(xs, [s[kind] for s in train.scenes[:train_images]],
                                            xt, [s[kind] for s in test.scenes])
                         for kind in ("background", "texture")}
    return results

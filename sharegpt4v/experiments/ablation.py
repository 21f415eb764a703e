"""The paper's central ablation in miniature: do detailed captions make a better LMM?

Arms (RECIPE.md): (A) brief captions, full pretraining; (B) detailed captions, full
pretraining; (C) detailed captions, projector-only pretraining. Every arm starts from the same
warm-started tiny model (its language model first learns the world's text, as Vicuna is already
a language model in the paper), then pretrains, is instruction-tuned on the same VQA mix and is
evaluated on held-out images with the world's VQA benchmark. Each (arm, seed) is an MLflow run
in one experiment, so the arms compare side by side; the summary is mean ± std over seeds.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import statistics
import time
from collections.abc import Iterator
from typing import Any

from sharegpt4v import storage, tracking
from sharegpt4v.config import RecipeConfig, recipe_from_dict

EXPERIMENT = "sharegpt4v-ablation"

ARMS: dict[str, dict[str, Any]] = {
    "A": {"label": "brief captions, full pretraining", "pretrain": {"caption_field": "brief_caption"}},
    "B": {"label": "detailed captions, full pretraining", "pretrain": {"caption_field": "detailed_caption"}},
    "C": {"label": "detailed captions, projector-only pretraining",
          "pretrain": {"caption_field": "detailed_caption", "train_llm": False, "vit_unfreeze_from": None}},
    "none": {"label": "no pretraining (warm start -> SFT)", "pretrain": None},
}

# The tiny profile, adjusted for the ablation (RECIPE.md's measured miniature): 32 px photo-like scenes
# of 1-3 shapes without words (unreadable at 32 px); pretraining on ~12.8K train images; SFT on a small
# VQA set drawn from other images (the val split), enough steps for every arm to fit it; the ViT is
# frozen in SFT, so what it learnt in pretraining is what the arm has to answer with.
ABLATION_OVERRIDES = (
    "world.image_size=32", "world.max_objects=3", "world.sources.text=0", "world.sources.art=0",
    "world.text_probability=0",
    "pretrain.epochs=3", "pretrain.max_steps=1000", "pretrain.learning_rate=2e-3", "pretrain.warmup_ratio=0.05",
    "sft.max_samples=6000", "sft.epochs=1", "sft.max_steps=375", "sft.learning_rate=5e-4",
    "sft.mix.conversations=0", "sft.mix.captions=0",
    "eval.split=test", "eval.limit=2000", "eval.max_new_tokens=8",
)

# What the results table reports, in this order. Short answers (exact match) are where a tiny model
# shows what its vision tower learnt; yes/no and circular multiple choice stay near chance at this scale.
METRICS = {  # metric -> column label
    "world-vqa.short.acc": "short answers", "world-vqa.short.categories.colour.acc": "short: colour",
    "world-vqa.short.categories.count.acc": "short: count", "world-vqa.overall": "overall",
    "world-vqa.yesno.acc": "yes/no acc", "world-vqa.mc.vanilla": "MC vanilla", "world-vqa.mc.circular": "MC circular",
}


@dataclasses.dataclass
class AblationPlan:
    out: str
    images: int = 16000
    sft_split: str = "val"  # SFT images are not the pretraining images (train) nor the evaluated ones (test)
    arms: tuple[str, ...] = ("A", "B", "C")
    seeds: tuple[int, ...] = (0, 1, 2)
    warmup_steps: int = 300  # text-only language-model warm start
    lanes: int = 2  # arm runs in parallel (one CPU thread each on a 2-core machine)


def ablation_recipe(base: RecipeConfig, arm: str, seed: int) -> RecipeConfig:
    data = base.to_dict()
    data["seed"] = seed
    if ARMS[arm]["pretrain"]:
        data["pretrain"].update(ARMS[arm]["pretrain"])
    return recipe_from_dict(data)


def _text_corpus(world_uri: str, split: str = "train") -> Iterator[str]:
    from sharegpt4v.data.shards import open_dataset, sample_meta

    for sample in open_dataset(world_uri).samples(split):
        meta = sample_meta(sample)
        yield meta["brief_caption"]
        yield meta["detailed_caption"]
        for item in meta["vqa"]:
            options = " ".join(item.get("options", []))
            yield f"{item['question']} {options} {item['answer']}".strip()


def warm_start(recipe: RecipeConfig, world_uri: str, out: str, steps: int) -> str:
    """A tiny LLaVA whose language model has learnt the world's text (captions and QA) first."""
    import torch

    from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
    from sharegpt4v.modeling.builder import build_tiny, save_model
    from sharegpt4v.modeling.templates import SYSTEM_PROMPT
    from sharegpt4v.modeling.tokenizer import train_tokenizer

    if storage.open_store(out).is_complete():
        return out
    texts = list(_text_corpus(world_uri))
    lm = recipe.model.language
    tokenizer = train_tokenizer([*texts, SYSTEM_PROMPT, CAPTION_INSTRUCTION], lm.vocab_size, lm.max_length)
    torch.manual_seed(recipe.seed)
    model, processor = build_tiny(recipe.model, tokenizer, seed=recipe.seed)
    language = model.model.language_model
    params = [p for n, p in model.named_parameters() if not n.startswith(("model.vision_tower", "model.multi_modal"))]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    rng = random.Random(recipe.seed)
    model.train()
    for step in range(steps):
        batch = rng.sample(texts, 32)
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=lm.max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        hidden = language(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        logits = model.lm_head(hidden)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / max(1, steps // 20)) * (0.1 + 0.9 * (1 - step / steps))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    save_model(model, processor, out, warm_start_steps=steps, final_text_loss=float(loss.detach()))
    return out


def run_arm(base: RecipeConfig, arm: str, seed: int, world_uri: str, warm_uri: str, out: str,
            sft_split: str = "val") -> dict[str, Any]:
    """Pretrain (unless the arm has none), SFT and evaluate one arm with one seed; returns its metrics."""
    from sharegpt4v.evaluation import evaluate, flat_metrics
    from sharegpt4v.training.run import launch

    recipe = ablation_recipe(base, arm, seed)
    started = time.perf_counter()
    params = {"arm": arm, "arm.label": ARMS[arm]["label"], "seed": seed, **recipe.flat()}
    with tracking.stage_run(f"arm-{arm}-seed-{seed}", params, tags={"arm": arm, "seed": str(seed)}) as run:
        init = warm_uri
        if ARMS[arm]["pretrain"]:
            init = launch("pretrain", recipe, world_uri, f"{out}/pretrain", init=warm_uri).checkpoint_uri
        sft = launch("sft", recipe, {"data": [world_uri], "split": sft_split}, f"{out}/sft", init=init)
        results = evaluate(sft.checkpoint_uri, recipe, dataset_uri=world_uri, out=f"{out}/eval")
        every = flat_metrics(results)
        metrics = {k: v for k, v in every.items() if k in METRICS}
        metrics["minutes"] = (time.perf_counter() - started) / 60
        tracking.log_metrics({**every, "minutes": metrics["minutes"]})
        return {"arm": arm, "seed": seed, "metrics": metrics, "all_metrics": every,
                "run_id": run.info.run_id if run else None}


def _worker(job: tuple[dict[str, Any], str, int, str, str, str, str, int]) -> dict[str, Any]:
    recipe_dict, arm, seed, world_uri, warm_uri, out, sft_split, threads = job
    import torch

    torch.set_num_threads(threads)
    result_store = storage.open_store(out)
    if result_store.exists("result.json"):  # a rerun after a kill keeps finished arms
        return result_store.get_json("result.json")
    with tracking.experiment(EXPERIMENT):
        result = run_arm(recipe_from_dict(recipe_dict), arm, seed, world_uri, warm_uri, out, sft_split)
    result_store.put_json("result.json", result)
    return result


def run_ablation(base: RecipeConfig, plan: AblationPlan, progress: bool = True) -> dict[str, Any]:
    from sharegpt4v.world.generate import generate_world

    world_uri = f"{plan.out}/world"
    started = time.perf_counter()
    if not storage.open_store(world_uri).is_complete():
        generate_world(world_uri, plan.images, 0, base.world, progress=progress)
    warm = {seed: warm_start(dataclasses.replace(base, seed=seed), world_uri, f"{plan.out}/warm-{seed}",
                             plan.warmup_steps) for seed in plan.seeds}
    if tracking.tracking_enabled():
        tracking.ensure_experiment(EXPERIMENT)  # once, before parallel lanes would race to create it
    threads = max(1, (os.cpu_count() or 2) // plan.lanes)
    jobs = [(base.to_dict(), arm, seed, world_uri, warm[seed], f"{plan.out}/runs/{arm}-seed-{seed}",
             plan.sft_split, threads)
            for seed in plan.seeds for arm in plan.arms]
    if plan.lanes <= 1:
        results = [_worker(job) for job in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(plan.lanes, maxtasksperchild=1) as pool:
            results = pool.map(_worker, jobs, chunksize=1)
    summary = summarize(results)
    summary["minutes"] = (time.perf_counter() - started) / 60
    summary["plan"] = {**dataclasses.asdict(plan), "recipe": base.flat()}
    store = storage.open_store(plan.out)
    store.put_json("results.json", summary)
    store.put_bytes("results.md", results_table(summary).encode())
    return summary


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    arms: dict[str, dict[str, Any]] = {}
    for result in results:
        entry = arms.setdefault(result["arm"], {"label": ARMS[result["arm"]]["label"], "seeds": [], "runs": {}})
        entry["seeds"].append(result["seed"])
        for key, value in result["metrics"].items():
            entry["runs"].setdefault(key, []).append(value)
    for entry in arms.values():
        entry["mean"] = {k: statistics.fmean(v) for k, v in entry["runs"].items()}
        entry["std"] = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in entry["runs"].items()}
    return {"arms": arms}


def results_table(summary: dict[str, Any]) -> str:
    head = ["arm", "seeds", *METRICS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in summary["arms"].items():
        cells = [f"{entry['mean'][m]:.3f} ± {entry['std'][m]:.3f}" for m in METRICS]
        lines.append(f"| {name}: {entry['label']} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def log_summary(summary: dict[str, Any]) -> None:
    """The summary as one MLflow run of the ablation experiment (mean/std per arm and metric)."""
    if not tracking.tracking_enabled():
        return
    with tracking.experiment(EXPERIMENT), tracking.stage_run("ablation-summary", {"arms": ",".join(summary["arms"])}):
        metrics = {}
        for arm, entry in summary["arms"].items():
            for key, value in entry["mean"].items():
                metrics[f"{arm}.{key}.mean"] = value
                metrics[f"{arm}.{key}.std"] = entry["std"][key]
        tracking.log_metrics(metrics)
        tracking.log_dict(json.loads(json.dumps(summary)), "ablation/results.json")

"""The paper's whole chain in miniature, as an ablation: do detailed captions make a better LMM, and does
a trained captioner write them nearly as well as its teacher?

One world, one set of foundations (the CLIP and Vicuna stand-ins, `training.foundations`), then per seed:

    A         pretraining on brief captions (COCO-like; LLaVA-1.5's stage)
    B         pretraining on the teacher's detailed captions
    D         pretraining on the captioner's detailed captions of the same images (ShareGPT4V-PT)
    C         B's captions, projector-only pretraining (LLM and ViT frozen)
    shuffled  B's captions shuffled across images (words without the picture): must fall to A or below
    none      no pretraining

and every arm gets the same SFT (VQA of other images, ViT frozen) and is evaluated on the whole test
split. The captioner (once, with the first seed) is fine-tuned from A's pretrained model on the
teacher's captions of the seed split (Share-Captioner starts from a pretrained LMM), then captions
the pretraining corpus (the train split, images it never saw) for D, and is scored on the test split
beside the teacher. Two blind rows show what needs no eyes: the majority answer per question template
(learnt from the SFT items) and B's chat model asked with a blank image. Each (arm, seed) is an MLflow
run in one experiment; `results.json` / `results.md` land in `out`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from typing import Any

from sharegpt4v import storage, tracking
from sharegpt4v.config import RecipeConfig, load_recipe, recipe_from_dict, with_overrides
from sharegpt4v.experiments.summary import log_summary, results_table, summarize  # noqa: F401 (re-exported)

EXPERIMENT = "sharegpt4v-ablation"

ARMS: dict[str, dict[str, Any]] = {
    "A": {"label": "brief captions", "pretrain": {"caption_field": "brief_caption"}},
    "B": {"label": "teacher-detailed captions", "pretrain": {"caption_field": "detailed_caption"}},
    "D": {"label": "captioner-detailed captions (ShareGPT4V-PT)", "pretrain": {}, "captions": "captioner"},
    "C": {"label": "teacher-detailed, projector-only",
          "pretrain": {"caption_field": "detailed_caption", "train_llm": False, "vit_unfreeze_from": None}},
    "shuffled": {"label": "teacher-detailed, shuffled across images", "pretrain": {}, "captions": "shuffled"},
    "none": {"label": "no pretraining", "pretrain": None},
}
DEFAULT_ARMS = ("A", "B", "D", "C", "shuffled", "none")

# The tiny profile is the miniature (README, science section). The ablation sizes its splits: the train
# split gives the foundations and the pretraining corpus, the val split the captioner's seed captions and
# the SFT questions (images pretraining never saw), the test split the evaluation, whole.
# SFT as LLaVA runs it, far below the pretraining learning rate (LLaVA-1.5: 2e-5 after a 1e-3 stage 1; here
# 1e-4 after 2e-3) and until short answers stop improving (2000 x 16: about 1.2 passes over the val split's
# questions). The profile's own SFT (lr 1e-3, 400 steps) is the demo's budget: from the same pretrained
# models it left short answers 0.1-0.2 lower in every arm (README, "SFT: when do the chat models learn yes/no?").
ABLATION_OVERRIDES = (
    "world.splits.train=0.8", "world.splits.val=0.18", "world.splits.test=0.02",
    "sft.mix.conversations=0", "sft.mix.captions=0", "sft.max_samples=null", "sft.epochs=100",
    "sft.learning_rate=1e-4", "sft.max_steps=2000",
    "eval.split=test", "eval.limit=null", "eval.max_new_tokens=4", "eval.batch_size=64",
)


@dataclasses.dataclass
class AblationPlan:
    out: str
    images: int = 16000
    world_seed: int = 0
    arms: tuple[str, ...] = DEFAULT_ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    corpus_split: str = "train"  # pretraining images (and what the captioner captions for D)
    seed_split: str = "val"  # the teacher's seed captions the captioner is trained on
    sft_split: str = "val"  # SFT questions: images that pretraining never saw
    lanes: int = 2  # runs in parallel (one CPU thread each on a 2-core machine)

    def __post_init__(self) -> None:
        unknown = set(self.arms) - set(ARMS)
        if unknown:
            raise ValueError(f"arms: unknown {sorted(unknown)}; known: {', '.join(ARMS)}")
        if not self.seeds or not self.arms:
            raise ValueError("arms and seeds: name at least one of each")
        if self.images < 10:
            raise ValueError("images: a world needs at least 10 images for its three splits")
        if self.lanes < 1:
            raise ValueError("lanes: at least 1")


def ablation_recipe(base: RecipeConfig, arm: str, seed: int) -> RecipeConfig:
    data = base.to_dict()
    data["seed"] = seed
    if ARMS[arm]["pretrain"]:
        data["pretrain"].update(ARMS[arm]["pretrain"])
    return recipe_from_dict(data)


# the captioner chain -----------------------------------------------------------------------------------


def captioner_chain(recipe: RecipeConfig, plan: AblationPlan, world: str) -> dict[str, Any]:
    """A's pretraining (first seed) -> captioner on the seed split's teacher captions -> corpus captions for
    D -> the captioner scored on the test split beside the teacher, the brief captions and a blank image."""
    from sharegpt4v.captioning.engine import make_captioner
    from sharegpt4v.captioning.job import run_caption_job
    from sharegpt4v.captioning.report import report_metrics, run_report, world_caption_sets
    from sharegpt4v.training.data import StageInputs
    from sharegpt4v.training.run import launch

    seed = plan.seeds[0]
    started = time.perf_counter()
    a = ablation_recipe(recipe, "A", seed)
    base = launch("pretrain", a, StageInputs([world], split=plan.corpus_split), run_dir(plan.out, "A", seed) + "/pretrain")
    captioner = launch("captioner", a, StageInputs([world], split=plan.seed_split), f"{plan.out}/captioner/model",
                       init=base.checkpoint_uri)
    engine = make_captioner(captioner.checkpoint_uri, a, device=a.compute.device, name="share-captioner")
    corpus = f"{plan.out}/captioner/corpus"
    held_out = f"{plan.out}/captioner/test"
    try:
        for split, out in ((plan.corpus_split, corpus), ("test", held_out)):
            summary = run_caption_job(world, out, engine, batch_size=a.captioning.batch_size, split=split, progress=False)
            if not summary.complete:
                raise RuntimeError(f"captioning {split} did not finish: {summary.to_dict()}")
        blank = _blank_captions(engine, world, f"{plan.out}/captioner/blank", limit=64)
    finally:
        engine.close()
    sets = {"captioner": held_out, **world_caption_sets(world, "test"), "captioner (blank image)": blank}
    sets = {{"world:detailed": "teacher", "world:brief": "brief"}.get(k, k): v for k, v in sets.items()}
    report = run_report(sets, f"{plan.out}/captioner/report", dataset_uri=world, split="test", samples=8)
    return {"checkpoint": captioner.checkpoint_uri, "base": base.checkpoint_uri, "corpus": corpus,
            "report": f"{plan.out}/captioner/report", "metrics": report_metrics(report),
            "quality": {name: report["sets"][name]["facts"] for name in report["sets"] if report["sets"][name]["facts"]},
            "minutes": (time.perf_counter() - started) / 60}


def _blank_captions(engine: Any, world: str, out: str, limit: int) -> list[dict[str, Any]]:
    """The captioner's captions of `limit` test images when it is shown a blank image instead."""
    from sharegpt4v.captioning.records import CaptionRequest, make_record
    from sharegpt4v.data.shards import open_dataset, sample_meta
    from sharegpt4v.evaluation.blind import blank_image

    image = blank_image()
    requests = []
    for sample in open_dataset(world).samples("test"):
        requests.append(CaptionRequest(str(sample_meta(sample)["id"]), image, "photo", ""))
        if len(requests) >= limit:
            break
    return [make_record(q, r, engine.name) for q, r in zip(requests, engine.caption_batch(requests))]


# one arm ----------------------------------------------------------------------------------------------


def run_dir(out: str, arm: str, seed: int) -> str:
    """Where an ablation at `out` keeps one (arm, seed) run: its pretraining, SFT and evaluation."""
    return f"{out}/runs/{arm}-seed-{seed}"


def lane_threads(lanes: int) -> int:
    """CPU threads per lane when `lanes` runs share the machine."""
    return max(1, (os.cpu_count() or 2) // lanes)


def run_arm(recipe: RecipeConfig, arm: str, seed: int, world: str, out: str, plan: AblationPlan,
            captions: dict[str, str]) -> dict[str, Any]:
    """Pretrain (unless the arm has none), SFT and evaluate one arm with one seed; returns its metrics."""
    from sharegpt4v.evaluation import evaluate, flat_metrics
    from sharegpt4v.training.data import StageInputs
    from sharegpt4v.training.run import launch

    r = ablation_recipe(recipe, arm, seed)
    started = time.perf_counter()
    params = {"arm": arm, "arm.label": ARMS[arm]["label"], "seed": seed, **r.flat()}
    with tracking.stage_run(f"arm-{arm}-seed-{seed}", params, tags={"arm": arm, "seed": str(seed)}) as run:
        init = None
        if ARMS[arm]["pretrain"] is not None:
            source = ARMS[arm].get("captions")
            inputs = StageInputs([world], captions=captions[source] if source else None, split=plan.corpus_split)
            init = launch("pretrain", r, inputs, f"{out}/pretrain").checkpoint_uri
        sft = launch("sft", r, StageInputs([world], split=plan.sft_split), f"{out}/sft", init=init)
        results = evaluate(sft.checkpoint_uri, r, dataset_uri=world, out=f"{out}/eval")
        metrics = flat_metrics(results)
        outcome: dict[str, Any] = {"arm": arm, "seed": seed, "metrics": metrics}
        if arm == "B" and seed == plan.seeds[0]:  # the same model without its eyes: the second blind row
            from sharegpt4v.evaluation.blind import BlankImageAnswerer
            from sharegpt4v.evaluation.run import as_answerer

            answerer, _ = as_answerer(sft.checkpoint_uri, r)
            blind = evaluate(BlankImageAnswerer(answerer), r, dataset_uri=world, out=f"{out}/eval-blank-image")
            outcome["blank_image_metrics"] = flat_metrics(blind)
        outcome["minutes"] = (time.perf_counter() - started) / 60
        tracking.log_metrics({**metrics, "minutes": outcome["minutes"]})
        outcome["run_id"] = run.info.run_id if run else None
        return outcome


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(job["threads"])
    plan = AblationPlan(**job["plan"])
    if job["kind"] == "captioner":
        store = storage.open_store(f"{plan.out}/captioner")
        if store.exists("result.json"):
            return store.get_json("result.json")
        with tracking.experiment(EXPERIMENT), tracking.stage_run("captioner-chain", {"world": job["world"]}):
            result = captioner_chain(recipe_from_dict(job["recipe"]), plan, job["world"])
            tracking.log_metrics({k: v for k, v in result["metrics"].items() if isinstance(v, float)})
        store.put_json("result.json", result)
        return result
    out = run_dir(plan.out, job["arm"], job["seed"])
    store = storage.open_store(out)
    if store.exists("result.json"):  # a rerun after a kill keeps finished arms
        return store.get_json("result.json")
    with tracking.experiment(EXPERIMENT):
        result = run_arm(recipe_from_dict(job["recipe"]), job["arm"], job["seed"], job["world"], out, plan,
                         job["captions"])
    store.put_json("result.json", result)
    return result


# the whole ablation ------------------------------------------------------------------------------------


def run_ablation(base: RecipeConfig, plan: AblationPlan, progress: bool = True) -> dict[str, Any]:
    from sharegpt4v.evaluation import evaluate, flat_metrics
    from sharegpt4v.evaluation.blind import MajorityAnswerer
    from sharegpt4v.experiments.controls import shuffled_caption_set
    from sharegpt4v.training.foundations import build_foundations
    from sharegpt4v.world.generate import generate_world

    started = time.perf_counter()
    world = f"{plan.out}/world"
    if not storage.open_store(world).is_complete():
        generate_world(world, plan.images, plan.world_seed, base.world, progress=progress)
    if tracking.tracking_enabled():
        tracking.ensure_experiment(EXPERIMENT)  # once, before parallel lanes would race to create it
    with tracking.experiment(EXPERIMENT):
        foundations = build_foundations(base, world, f"{plan.out}/foundations", seed=plan.seeds[0])
    recipe = with_overrides(base, foundations["overrides"])
    captions = {"shuffled": shuffled_caption_set(world, plan.corpus_split, f"{plan.out}/captions-shuffled",
                                                 seed=plan.world_seed)} if "shuffled" in plan.arms else {}
    with tracking.experiment(EXPERIMENT):
        majority = MajorityAnswerer(_items(world, plan.sft_split))
        blind = flat_metrics(evaluate(majority, recipe, dataset_uri=world, out=f"{plan.out}/blind-majority"))

    threads = lane_threads(plan.lanes)
    job = {"recipe": recipe.to_dict(), "world": world, "plan": dataclasses.asdict(plan), "threads": threads}
    needs_captioner = "D" in plan.arms
    first = plan.seeds[0]
    early = [{**job, "kind": "arm", "arm": a, "seed": s, "captions": captions} for s in plan.seeds for a in plan.arms
             if a != "D" and not (needs_captioner and a == "A" and s == first)]
    results: list[dict[str, Any]] = []
    chain: dict[str, Any] | None = None
    context = multiprocessing.get_context("spawn")
    with context.Pool(plan.lanes, maxtasksperchild=1) as pool:
        pending_chain = pool.apply_async(_worker, ({**job, "kind": "captioner"},)) if needs_captioner else None
        pending = pool.map_async(_worker, early, chunksize=1)
        if pending_chain is not None:
            chain = pending_chain.get()
            captions["captioner"] = chain["corpus"]
            late = [{**job, "kind": "arm", "arm": a, "seed": s, "captions": captions} for s in plan.seeds
                    for a in plan.arms if a == "D" or (a == "A" and s == first)]
            results += pool.map(_worker, late, chunksize=1)
        results += pending.get()
    summary = summarize(results, blind, chain)
    summary["minutes"] = (time.perf_counter() - started) / 60
    summary["plan"] = {**dataclasses.asdict(plan), "recipe": recipe.flat(),
                       "foundations": {k: v for k, v in foundations.items() if k != "overrides"}}
    store = storage.open_store(plan.out)
    store.put_json("results.json", summary)
    store.put_bytes("results.md", results_table(summary).encode())
    return summary


def _items(world: str, split: str) -> list[dict[str, Any]]:
    from sharegpt4v.data.shards import open_dataset, sample_meta

    return [item for sample in open_dataset(world).samples(split) for item in sample_meta(sample).get("vqa", [])]


def default_recipe(profile: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """The profile with the ablation's overrides (then the caller's)."""
    return load_recipe(profile, [*ABLATION_OVERRIDES, *overrides])

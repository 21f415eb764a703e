"""The main job on the embedded default (`sharegpt4v demo`, the README's first command).

It runs the `sharegpt4v` Kubeflow pipeline end to end with kfp.local on local stand-ins (S3 =
SeaweedFS, MLflow on sqlite, the synthetic teacher endpoint): a fresh synthetic world, seed
captions from the teacher, captioner training, corpus captioning fanned out over shard groups,
pretraining, SFT, evaluation, champion promotion, export of a Triton model repository and a
dry-run deploy. Then it serves the champion chat model and the captioner on the real Triton
server, asks each about a held-out image, and prints the answers, the evaluation table and the
registered models. Like the CLI, this is an adapter: kfp and Triton are imported where used.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sharegpt4v.config import load_recipe
from sharegpt4v.services import local_services

BUCKET = "sharegpt4v"
# The demo's world gives the captioner a seed split (val) big enough to learn from: the corpus it captions
# (train) and the test split it is judged on are images it never saw. The caller's overrides come after.
DEMO_OVERRIDES = ("world.splits.train=0.6", "world.splits.val=0.3", "world.splits.test=0.1")


def run_demo(workdir: Path, images: int = 2000, seed: int = 0, profile: str = "tiny",
             overrides: list[str] | tuple[str, ...] = (), shard_groups: int = 2) -> dict[str, Any]:
    from pipelines.runner import run_local

    overrides = [*DEMO_OVERRIDES, *overrides]
    console = Console()
    for noisy in ("mlflow", "alembic"):  # their INFO lines would drown the report
        logging.getLogger(noisy).setLevel(logging.WARNING)
    recipe = load_recipe(profile, overrides)  # a bad override fails here, before anything starts
    workdir = workdir.resolve()
    console.rule("[bold]ShareGPT4V platform: the end-to-end pipeline on the embedded default")
    with local_services(workdir, buckets=(BUCKET,)) as (s3, mlflow):
        console.print(f"S3 (SeaweedFS) at {s3.endpoint}, MLflow at {mlflow.tracking_uri}; "
                      f"pipeline `sharegpt4v` with kfp.local, profile {profile!r}, {images} images")
        log = workdir / "pipeline.log"
        console.print(f"Task logs: {log} (task progress below)")
        with log.open("w") as sink, contextlib.redirect_stdout(_TaskProgress(sink, sys.stdout)), \
                warnings.catch_warnings():
            # kfp.local prints every task's own output to stdout: it goes to the log. Its warnings that
            # cluster-only settings (GPUs, node selectors, the image) do nothing locally are expected here.
            warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
            warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
            result = run_local(workdir, images=images, seed=seed, profile=profile, overrides=overrides,
                               shard_groups=shard_groups, start_services=False)
        served = _ask_served_models(result, workdir, console, caption_tokens=recipe.serving.max_tokens_limit)
        _print_summary(result, console)
        console.print(
            f"\nPipeline finished in {result['minutes']:.1f} min. Data stays in {workdir} "
            f"(S3 data in s3/, MLflow in mlflow/, kfp.local outputs in kfp/).\n"
            f"Open the MLflow UI: .venv/bin/mlflow ui --backend-store-uri {mlflow.tracking_uri}\n"
            f"Serve the models again: .venv/bin/sharegpt4v services up --dir {workdir}, then in another shell:\n"
            f"  source {workdir}/env.sh && .venv/bin/sharegpt4v serve local --model-repo {result['model_repository']}"
        )
    return {**result, "served": served}


class _TaskProgress(io.TextIOBase):
    """Everything to the log file; kfp.local's task start/finish lines to the console too."""

    MARKERS = (" - INFO - Executing task", " finished with status ", " - INFO - Pipeline ")

    def __init__(self, sink: Any, console: Any):
        self.sink, self.console = sink, console

    def write(self, text: str) -> int:
        self.sink.write(text)
        for line in text.splitlines():
            if any(marker in line for marker in self.MARKERS):
                self.console.write(line + "\n")
                self.console.flush()
        return len(text)

    def flush(self) -> None:
        self.sink.flush()


def _held_out_sample(world_uri: str) -> dict[str, Any]:
    from sharegpt4v.data.shards import open_dataset, sample_image, sample_meta

    sample = next(open_dataset(world_uri).samples("test"))
    meta = sample_meta(sample)
    # One short question per category, plus the first yes/no pair: what a person would ask about it.
    questions, seen = [], set()
    for item in meta["vqa"]:
        key = (item["kind"], item["category"])
        if item["kind"] == "short" and key not in seen:
            seen.add(key)
            questions.append(item)
    questions += [q for q in meta["vqa"] if q["kind"] == "yesno"][:2]
    return {"id": meta["id"], "image": sample_image(sample)[1], "questions": questions, "scene": meta["scene"],
            "detailed_caption": meta["detailed_caption"]}


def _ask_served_models(result: dict[str, Any], workdir: Path, console: Console, caption_tokens: int) -> dict[str, Any]:
    """The captioner and the chat model, served on Triton, about one test image; questions are asked with the
    prompts the chat model was instruction-tuned and evaluated with (LLaVA's short-answer suffix)."""
    from sharegpt4v.evaluation.blind import blank_image
    from sharegpt4v.evaluation.common import normalize_short, parse_yes_no
    from sharegpt4v.serving import client
    from sharegpt4v.serving.triton import start_triton
    from sharegpt4v.training.conversations import vqa_prompt
    from sharegpt4v.world import Scene, score_caption

    sample = _held_out_sample(result["world"])
    scene = Scene.from_dict(sample["scene"])
    console.print(f"\nServing {result['model_repository']} on the local Triton server ...")
    with start_triton(result["model_repository"], workdir / "triton") as server:
        caption = client.caption(server.http_url, sample["image"], max_tokens=caption_tokens)
        blind_caption = client.caption(server.http_url, blank_image(), max_tokens=caption_tokens)
        answers = [client.chat(server.http_url, sample["image"], vqa_prompt(q)) for q in sample["questions"]]
    own, blind = score_caption(caption["text"], scene), score_caption(blind_caption["text"], scene)
    console.print(f"[bold]A held-out image[/bold] ({sample['id']}, test split: no model trained on it):")
    console.print(f"  captioner (Triton, model `captioner`): {caption['text']}")
    console.print(f"    facts right {own.recall:.0%}, false statements {own.hallucinated}"
                  + (f" ({', '.join(own.false[:4])})" if own.false else ""))
    console.print(f"  teacher (ground truth):                {sample['detailed_caption']}")
    console.print(f"  captioner shown a blank image:         {blind_caption['text']}")
    console.print(f"    facts right {blind.recall:.0%}, false statements {blind.hallucinated} (what it says without looking)")
    right = 0
    table = Table(title="The chat model (Triton, model `chat`) on the same image")
    for column in ("question", "answer", "truth", ""):
        table.add_column(column)
    for q, answer in zip(sample["questions"], answers):
        text = answer["text"]
        ok = (parse_yes_no(text) == q["answer"]) if q["kind"] == "yesno" else normalize_short(text) == normalize_short(q["answer"])
        right += ok
        table.add_row(q["question"], repr(text), repr(q["answer"]), "right" if ok else "wrong")
    console.print(table)
    console.print(f"  {right} of {len(answers)} answers right")
    return {"image_id": sample["id"], "caption": caption, "blind_caption": blind_caption,
            "caption_recall": own.recall, "caption_false": own.hallucinated, "answers": answers,
            "questions": sample["questions"], "right": right, "http_url": server.http_url}


def _blind_baseline(result: dict[str, Any], split: str) -> dict[str, float]:
    """The evaluation of a model that never sees the image (majority answer per question template, fitted
    on the SFT split's questions), on the same test split as the chat model."""
    from sharegpt4v.data.shards import open_dataset, sample_meta
    from sharegpt4v.evaluation import flat_metrics
    from sharegpt4v.evaluation.blind import MajorityAnswerer
    from sharegpt4v.evaluation.world_vqa import WorldVQA, score_world

    items = [i for s in open_dataset(result["world"]).samples(split) for i in sample_meta(s).get("vqa", [])]
    questions = WorldVQA(result["world"], None, "test").questions(images=False)
    return flat_metrics({"world-vqa": score_world(questions, MajorityAnswerer(items).answer(questions))})


HEADLINES = (("world-vqa.perception", "perception (MME-style, 0-100)", "{:.1f}"),
             ("world-vqa.mc.circular_headline", "multiple choice, circular (MMBench-style)", "{:.3f}"),
             ("world-vqa.short.acc", "short answers", "{:.3f}"))


def _print_summary(result: dict[str, Any], console: Console) -> None:
    metrics = result["eval"]["metrics"] or {}
    if metrics:
        blind = _blind_baseline(result, "val")
        table = Table(title="The chat model on the whole test split, beside a model that never sees the image")
        for column in ("metric", "chat model", "blind (majority answer per question)"):
            table.add_column(column)
        categories = sorted(k.split(".")[3] for k in metrics if k.startswith("world-vqa.yesno.categories.")
                            and k.endswith(".score"))
        rows = [*HEADLINES, *((f"world-vqa.yesno.categories.{c}.score", f"  perception: {c}", "{:.1f}")
                              for c in categories)]
        for key, label, fmt in rows:
            if key in metrics:
                table.add_row(label, fmt.format(metrics[key]), fmt.format(blind.get(key, float("nan"))))
        console.print(table)
    models = Table(title="Registered models (MLflow)")
    for column in ("stage", "model version", "checkpoint"):
        models.add_column(column)
    for stage, info in result["models"].items():
        models.add_row(stage, info["model_uri"], info["checkpoint_uri"])
    console.print(models)
    console.print(f"champion: {result['champion'] or 'not promoted (score below the threshold)'}; "
                  f"model repository: {result['model_repository']}; deploy: {result['deploy']}")
    console.print(f"captions: seed (teacher) {result['caption_sets']['seed']}, "
                  f"corpus (captioner) {result['caption_sets']['corpus']}")
    captions = result.get("caption_report", {}).get("metrics") or {}
    names = {"captioner": "captioner (trained on the seed split)", "world:detailed": "teacher",
             "world:brief": "brief captions (COCO-like)"}
    if any(key.endswith(".fact_recall") for key in captions):
        quality = Table(title="Caption quality on the corpus split (no seed caption of these images)")
        for column in ("captions", "fact recall", "objects", "positions", "false facts / caption", "mean chars"):
            quality.add_column(column)
        for name, label in names.items():
            if f"{name}.fact_recall" in captions:
                quality.add_row(label, *(f"{captions.get(f'{name}.{k}', float('nan')):.{d}f}"
                                         for k, d in (("fact_recall", 3), ("recall.object", 3), ("recall.position", 3),
                                                      ("hallucinated_per_caption", 2), ("mean_chars", 0))))
        console.print(quality)
        console.print(f"caption report (HTML): {result['caption_report']['report']}")

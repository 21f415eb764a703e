"""The main job on the embedded default (`sharegpt4v demo`, the README's first command).

Today it runs the platform's foundation end to end on local stand-ins: start S3 (SeaweedFS)
and MLflow (sqlite), generate a synthetic world into S3, inspect it, and show why the recipe
wants detailed captions: the fact recall of brief vs detailed captions against ground truth.
Later stages (captioning, training, evaluation, serving) extend this job.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sharegpt4v import tracking
from sharegpt4v.config import load_recipe
from sharegpt4v.data.inspect import inspect_dataset
from sharegpt4v.data.shards import open_dataset, sample_meta
from sharegpt4v.services import local_services
from sharegpt4v.world import Scene, score_caption
from sharegpt4v.world.generate import generate_world

BUCKET = "sharegpt4v"


def caption_quality(dataset_uri: str, split: str = "val") -> dict[str, dict[str, float]]:
    """Mean fact recall and hallucinated facts per caption kind, on one split."""
    scores: dict[str, dict[str, list[float]]] = {}
    for sample in open_dataset(dataset_uri).samples(split):
        meta = sample_meta(sample)
        scene = Scene.from_dict(meta["scene"])
        for kind in ("brief_caption", "detailed_caption"):
            score = score_caption(meta[kind], scene)
            entry = scores.setdefault(kind, {"recall": [], "hallucinated": [], "chars": []})
            entry["recall"].append(score.recall)
            entry["hallucinated"].append(score.hallucinated)
            entry["chars"].append(len(meta[kind]))
    return {kind: {k: statistics.fmean(v) for k, v in entry.items()} | {"n": len(entry["recall"])}
            for kind, entry in scores.items()}


def run_demo(workdir: Path, images: int = 600, seed: int = 0, profile: str = "tiny",
             overrides: list[str] | tuple[str, ...] = ()) -> dict[str, object]:
    console = Console()
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines would drown the report
    logging.getLogger("alembic").setLevel(logging.WARNING)
    recipe = load_recipe(profile, overrides)
    workdir = workdir.resolve()
    console.rule("[bold]ShareGPT4V platform demo (embedded default)")
    with local_services(workdir, buckets=(BUCKET,)) as (s3, mlflow):
        console.print(f"S3 (SeaweedFS) at {s3.endpoint}, MLflow at {mlflow.tracking_uri}")
        world_uri = f"s3://{BUCKET}/world/seed-{seed}"
        with tracking.stage_run("demo", {"profile": recipe.profile, "images": images, "seed": seed}):
            generate_world(world_uri, images=images, seed=seed, cfg=recipe.world, overwrite=True)
            report = inspect_dataset(world_uri, verify=True, progress=False)
            quality = caption_quality(world_uri)
            tracking.log_metrics({f"{kind}.{k}": v for kind, q in quality.items() for k, v in q.items()})
            tracking.log_dict(report, "world/inspect.json")

        table = Table(title=f"{world_uri}: {report['shards']} shards, {report['bytes'] / 1e6:.1f} MB")
        for column in ("ok", "error", "duplicate", "train", "val", "test", "sources"):
            table.add_column(column)
        table.add_row(
            *(str(report[k]) for k in ("ok", "error", "duplicate")),
            *(str(report["splits"].get(k, 0)) for k in ("train", "val", "test")),
            ", ".join(f"{k}={v}" for k, v in report["sources"].items()),
        )
        console.print(table)
        console.print("integrity: " + ("all shards match their sha256" if not report["integrity_problems"]
                                       else str(report["integrity_problems"])))

        sample = sample_meta(next(open_dataset(world_uri).samples("val")))
        console.print(f"\n[bold]A held-out image[/bold] ({sample['id']}, source {sample['source']}):")
        console.print(f"  brief:    {sample['brief_caption']}")
        console.print(f"  detailed: {sample['detailed_caption']}")
        for item in sample["vqa"][:4]:
            options = f" {item['options']}" if "options" in item else ""
            console.print(f"  Q ({item['kind']}/{item['category']}): {item['question']}{options} -> {item['answer']}")

        quality_table = Table(title="Caption quality vs ground truth (val split): why ShareGPT4V wants detailed captions")
        for column in ("captions", "n", "fact recall", "hallucinated facts / caption", "mean chars"):
            quality_table.add_column(column)
        for kind, q in quality.items():
            quality_table.add_row(kind, str(int(q["n"])), f"{q['recall']:.3f}", f"{q['hallucinated']:.2f}", f"{q['chars']:.0f}")
        console.print(quality_table)
        console.print(
            f"\nData stays in {workdir} (S3 data in s3/, MLflow in mlflow/).\n"
            f"Open the MLflow UI: .venv/bin/mlflow ui --backend-store-uri {mlflow.tracking_uri}\n"
            f"Browse the data again: .venv/bin/sharegpt4v services up --dir {workdir}, then in another shell:\n"
            f"  source {workdir}/env.sh && .venv/bin/sharegpt4v data inspect {world_uri}"
        )
    return {"report": report, "quality": quality}


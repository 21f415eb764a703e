"""The main job on the embedded default (`sharegpt4v demo`, the README's first command).

Today it runs the platform's first stages end to end on local stand-ins: start S3 (SeaweedFS)
and MLflow (sqlite), generate a synthetic world into S3, inspect it, write seed captions for
its train split with the teacher client against the synthetic teacher endpoint (with injected
faults), and report caption quality against the ground truth: why the recipe wants detailed
captions. Later stages (captioner training, pretraining, SFT, evaluation, serving) extend it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sharegpt4v import tracking
from sharegpt4v.captioning.job import JobSummary, run_caption_job
from sharegpt4v.captioning.report import run_report, world_caption_sets
from sharegpt4v.captioning.teacher import TeacherClient
from sharegpt4v.captioning.teacher_sim import Faults, TeacherSim
from sharegpt4v.config import RecipeConfig, load_recipe
from sharegpt4v.data.inspect import inspect_dataset
from sharegpt4v.data.shards import open_dataset, sample_meta
from sharegpt4v.services import local_services
from sharegpt4v.world.generate import generate_world

BUCKET = "sharegpt4v"


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
        seed_uri = f"s3://{BUCKET}/captions/teacher-seed-{seed}"
        with tracking.stage_run("demo", {"profile": recipe.profile, "images": images, "seed": seed}):
            generate_world(world_uri, images=images, seed=seed, cfg=recipe.world, overwrite=True)
            report = inspect_dataset(world_uri, verify=True, progress=False)
            tracking.log_dict(report, "world/inspect.json")
            seed_summary = _seed_captions(world_uri, seed_uri, recipe)
            quality = run_report(
                {"teacher": seed_uri, **world_caption_sets(world_uri, "train")},
                f"s3://{BUCKET}/reports/seed-captions-{seed}", dataset_uri=world_uri, split="train",
            )

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

        console.print(
            f"\nSeed captions from the synthetic teacher (10% injected faults): {seed_summary.ok} ok, "
            f"{seed_summary.error} error records ({dict(seed_summary.reasons) or 'none'}), "
            f"{seed_summary.captioned / max(seed_summary.seconds, 1e-9):.0f} images/s -> {seed_uri}"
        )
        quality_table = Table(title="Caption quality vs ground truth (train split)")
        for column in ("captions", "ok", "fact recall", "false facts", "chars", "nouns", "adj."):
            quality_table.add_column(column, no_wrap=column == "captions")
        for row in quality["comparison"]:
            quality_table.add_row(
                row["set"], str(row["ok"]), f"{row['fact_recall']:.3f}", f"{row['hallucinated_per_caption']:.2f}",
                f"{row['mean_chars']:.0f}", f"{row['noun_share']:.0%}", f"{row['adjective_share']:.0%}",
            )
        console.print(quality_table)
        console.print(f"Full report: s3://{BUCKET}/reports/seed-captions-{seed}/report.html (also in MLflow)")
        console.print(
            f"\nData stays in {workdir} (S3 data in s3/, MLflow in mlflow/).\n"
            f"Open the MLflow UI: .venv/bin/mlflow ui --backend-store-uri {mlflow.tracking_uri}\n"
            f"Browse the data again: .venv/bin/sharegpt4v services up --dir {workdir}, then in another shell:\n"
            f"  source {workdir}/env.sh && .venv/bin/sharegpt4v data inspect {world_uri}"
        )
    return {"report": report, "quality": quality, "seed_captions": seed_summary.to_dict()}


def _seed_captions(world_uri: str, out_uri: str, recipe: RecipeConfig) -> JobSummary:
    """Seed captions for the train split from the synthetic teacher, through the real client."""
    faults = Faults(rate=0.1, kinds=("429", "500", "503", "malformed"), retry_after_s=0.05)
    with TeacherSim(world_uri=world_uri, faults=faults) as sim:
        teacher_cfg = dataclasses.replace(recipe.teacher, backoff_base_s=0.01, backoff_max_s=0.5)
        with TeacherClient(teacher_cfg, base_url=sim.url, api_key="synthetic-teacher-key") as client:
            return run_caption_job(world_uri, out_uri, client, batch_size=4 * teacher_cfg.concurrency, split="train",
                                   progress=True)


"""The ablation in miniature, at toy size: its arms, seeds, MLflow layout and results table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sharegpt4v import storage
from sharegpt4v.config import load_recipe
from sharegpt4v.experiments.ablation import (
    ABLATION_OVERRIDES,
    EXPERIMENT,
    AblationPlan,
    ablation_recipe,
    log_summary,
    results_table,
    run_ablation,
    warm_start,
)

TOY = [*ABLATION_OVERRIDES, "pretrain.max_steps=3", "sft.max_steps=3", "eval.limit=20", "pretrain.max_samples=64",
       "sft.max_samples=64"]


def test_arms_change_only_what_they_should() -> None:
    base = load_recipe("tiny", list(ABLATION_OVERRIDES))
    a, b, c = (ablation_recipe(base, arm, 7) for arm in "ABC")
    assert (a.pretrain.caption_field, b.pretrain.caption_field) == ("brief_caption", "detailed_caption")
    assert c.pretrain.train_llm is False and c.pretrain.vit_unfreeze_from is None and c.pretrain.train_projector
    assert b.pretrain.train_llm and b.pretrain.vit_unfreeze_from == 0
    assert a.seed == b.seed == c.seed == 7
    assert a.sft == b.sft == c.sft  # every arm gets the same SFT and evaluation
    assert a.eval == c.eval


def test_warm_start_teaches_the_language_model_text(tmp_path: Path) -> None:
    from sharegpt4v.config import WorldConfig
    from sharegpt4v.world.generate import generate_world

    world = str(tmp_path / "world")
    generate_world(world, 60, 0, WorldConfig(image_size=32, max_objects=3), progress=False)
    recipe = load_recipe("tiny", list(ABLATION_OVERRIDES))
    short = storage.open_store(warm_start(recipe, world, str(tmp_path / "w1"), steps=2)).read_manifest()
    longer = storage.open_store(warm_start(recipe, world, str(tmp_path / "w2"), steps=60)).read_manifest()
    assert longer["final_text_loss"] < short["final_text_loss"] - 1.0


@pytest.mark.slow
def test_toy_ablation_end_to_end(tmp_path: Path, mlflow_sqlite: str) -> None:
    recipe = load_recipe("tiny", TOY)
    plan = AblationPlan(out=str(tmp_path / "ablation"), images=160, arms=("A", "B"), seeds=(0, 1), warmup_steps=5,
                        lanes=2)
    import os

    before = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    summary = run_ablation(recipe, plan, progress=False)
    log_summary(summary)
    assert os.environ.get("MLFLOW_EXPERIMENT_NAME") == before  # nothing leaks into later runs of this process
    assert set(summary["arms"]) == {"A", "B"}
    for entry in summary["arms"].values():
        assert sorted(entry["seeds"]) == [0, 1]
        assert 0.0 <= entry["mean"]["world-vqa.overall"] <= 1.0 and entry["std"]["world-vqa.overall"] >= 0.0
    table = (tmp_path / "ablation" / "results.md").read_text()
    assert table == results_table(summary) and "B: detailed captions, full pretraining | 2 |" in table
    assert json.loads((tmp_path / "ablation" / "results.json").read_text())["arms"]["A"]["seeds"]

    client = MlflowClient(mlflow_sqlite)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"arm-A-seed-0", "arm-A-seed-1", "arm-B-seed-0", "arm-B-seed-1", "ablation-summary"} <= names
    arm_b = next(r for r in runs if r.info.run_name == "arm-B-seed-1")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == arm_b.info.run_id]
    assert {r.info.run_name for r in children} >= {"pretrain", "sft"}
    assert arm_b.data.params["pretrain.caption_field"] == "detailed_caption"

    # a rerun keeps finished arms instead of training them again
    again = run_ablation(recipe, plan, progress=False)
    assert again["arms"]["B"]["runs"] == summary["arms"]["B"]["runs"]

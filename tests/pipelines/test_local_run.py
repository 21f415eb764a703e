"""The end-to-end pipeline, run locally with kfp.local on a tiny synthetic world (a few minutes on 2 cores)."""

from __future__ import annotations

import builtins
import logging
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.runner import PipelineError, kfp_local_globals_restored, run_local
from sharegpt4v import storage
from sharegpt4v.captioning.job import iter_caption_records
from sharegpt4v.data.shards import open_dataset, sample_meta

# Tiny steps: the point is the orchestration, not the model quality.
FAST = ["world.samples_per_shard=12", "foundations.vision_steps=5", "foundations.language_steps=5", "captioner.max_steps=12", "pretrain.max_steps=12", "sft.max_steps=12",
        "captioner.save_every_steps=0", "pretrain.save_every_steps=0", "sft.save_every_steps=0",
        "captioning.max_new_tokens=16", "eval.limit=30", "eval.max_new_tokens=4"]


@pytest.mark.slow
def test_end_to_end_pipeline_runs_locally(tmp_path: Path) -> None:
    before, print_before, handlers_before = dict(os.environ), builtins.print, logging.getLogger().handlers[:]
    result = run_local(tmp_path / "run", images=60, seed=3, overrides=FAST, shard_groups=2, champion_threshold=0.0)
    assert dict(os.environ) == before  # services and the pipeline's run id do not leak out
    assert builtins.print is print_before and logging.getLogger().handlers == handlers_before  # nor kfp's swaps
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow' / 'mlflow.db'}")
    with _services(tmp_path / "run"):
        world, seed, corpus = result["world"], result["caption_sets"]["seed"], result["caption_sets"]["corpus"]
        train_ids = {sample_meta(s)["id"] for s in open_dataset(world).samples("train")}
        val_ids = {sample_meta(s)["id"] for s in open_dataset(world).samples("val")}
        assert len(train_ids) > 20 and val_ids
        # a caption record for every image of the corpus split, from the trained captioner; the teacher
        # captioned the seed split, which is disjoint from it
        corpus_records = list(iter_caption_records(corpus))
        assert {r["id"] for r in corpus_records} == train_ids and len(corpus_records) == len(train_ids)
        assert all(r["captioner"].startswith("llava:") for r in corpus_records)
        assert {r["id"] for r in iter_caption_records(seed) if r["status"] == "ok"} == val_ids
        # the tiny recipe builds its LLaVA from the foundations trained on this world
        assert any(o.startswith("model.vision.path=") for o in result["overrides"])
        assert {g["group"] for g in result["caption_groups"]} == {0.0, 1.0}  # two shard groups, one set
        assert sum(g["shards"] for g in result["caption_groups"]) == len(open_dataset(world).shard_uris("train"))
        # model repository with both models; the deploy step printed the InferenceService (dry run)
        repo = storage.open_store(result["model_repository"])
        assert repo.is_complete() and {"chat", "captioner"} <= {f["path"].split("/")[0] for f in repo.read_manifest()["files"]}
    assert result["deploy"] == "dry-run"

    # registered versions with lineage, the chat model promoted to champion
    models = result["models"]
    base = client.get_model_version("sharegpt4v-base", models["base"]["version"])
    cap = client.get_model_version("sharegpt4v-captioner", models["captioner"]["version"])
    assert cap.tags["lineage.parent_model"] == f"sharegpt4v-base/{base.version}"  # fine-tuned from a pretrained LMM
    pre = client.get_model_version("sharegpt4v-pretrained", models["pretrain"]["version"])
    chat = client.get_model_version("sharegpt4v-chat", models["sft"]["version"])
    assert cap.tags["lineage.captions"] == seed and pre.tags["lineage.captions"] == corpus
    assert cap.tags["lineage.dataset"] == world == chat.tags["lineage.dataset"]
    assert chat.tags["lineage.parent_model"] == f"sharegpt4v-pretrained/{pre.version}"
    assert {v.tags["lineage.pipeline_run"] for v in (cap, pre, chat)} == {result["mlflow_run_id"]}
    assert chat.tags["checkpoint"] == models["sft"]["checkpoint_uri"]  # the version is an MLflow model over it
    assert client.get_model_version_by_alias("sharegpt4v-chat", "champion").version == chat.version
    assert result["champion"] == "models:/sharegpt4v-chat@champion"
    assert float(chat.tags["eval.world-vqa.overall"]) == pytest.approx(result["eval"]["score"])

    # MLflow: the pipeline's run (KFP run id, parameters) finished; every task nested under it
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["kfp.run_id"]
    assert parent.data.params["pipeline.world_images"] in ("60", "60.0")
    assert "captioner.max_steps=12" in parent.data.params["pipeline.overrides"]
    experiment = parent.info.experiment_id
    tasks = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {"synthetic-world", "foundations", "base", "seed-captions", "captioner", "caption-group-0-of-2", "caption-group-1-of-2",
            "merge-captions", "pretrain", "sft", "evaluate", "promote", "export-model-repository",
            "deploy"} <= {t.info.run_name for t in tasks}
    evaluate_task = next(t for t in tasks if t.info.run_name == "evaluate")
    [evaluation] = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{evaluate_task.info.run_id}'")
    assert evaluation.data.metrics["world-vqa.overall"] == pytest.approx(result["eval"]["score"])
    assert "world-vqa.yesno.acc" in result["eval"]["metrics"] and "world-vqa" in result["eval"]["table"]


def test_a_failed_step_marks_the_pipeline_run_failed(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="ingest"):
        run_local(tmp_path / "run", overrides=FAST, extra={"source_uri": str(tmp_path / "no-such-images")})
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow' / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("sharegpt4v").experiment_id])}
    run = runs["sharegpt4v-local"]
    assert run.info.status == "FAILED" and run.data.tags["kfp.state"] == "FAILED"
    assert runs["ingest"].info.status == "FAILED"
    assert runs["ingest"].data.tags["mlflow.parentRunId"] == run.info.run_id
    assert run.data.params["pipeline.source_uri"].endswith("no-such-images")


def _services(workdir: Path):
    """S3 of a finished run again (run_local stopped its services), to read what the run wrote."""
    from sharegpt4v.services import local_services

    return local_services(workdir, buckets=("sharegpt4v",))


def test_print_and_logging_survive_kfp_local_undoing_its_swaps_out_of_order() -> None:
    """Two ParallelFor tasks in threads: the first to finish restores the real print, the second
    restores the first one's indenting print, and kfp leaves it in place (what made later CLI output
    start with four spaces)."""
    from kfp.local import logging_utils

    original, handlers = builtins.print, logging.getLogger().handlers[:]
    with kfp_local_globals_restored():
        for swap in (logging_utils.indented_print, logging_utils.local_logger_context):
            first, second = swap(), swap()
            first.__enter__()
            second.__enter__()
            first.__exit__(None, None, None)
            second.__exit__(None, None, None)
        # the leaks this guards against are still there in kfp: an indenting print, a stdout log handler
        assert builtins.print is not original and logging.getLogger().handlers != handlers
    assert builtins.print is original and logging.getLogger().handlers == handlers

"""The training loop on CPU: schedule, a pretrain -> SFT chain, 2-process ZeRO-2, kill + resume, S3 checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sharegpt4v import storage
from sharegpt4v.config import WorldConfig, load_recipe
from sharegpt4v.modeling.builder import load_model
from sharegpt4v.provenance import OutputMismatch
from sharegpt4v.training.checkpoint import latest_checkpoint, list_checkpoints
from sharegpt4v.training.data import StageInputs, build_index, iter_examples
from sharegpt4v.training.freezing import vision_layers
from sharegpt4v.training.optimizer import lr_factor, total_steps
from sharegpt4v.training.run import launch
from sharegpt4v.training.trainer import train_stage
from sharegpt4v.world.generate import generate_world
from tests.training.conftest import trace_records

ROOT = Path(__file__).resolve().parents[2]

# Short captions and small batches: each step takes a few tens of milliseconds on one core.
# One epoch per stage (the tiny profile's own epochs let max_steps decide on small worlds).
FAST = ["pretrain.caption_field=brief_caption", "captioning.max_new_tokens=16",
        "captioner.epochs=1", "pretrain.epochs=1", "sft.epochs=1"]


def test_schedule_and_step_count() -> None:
    recipe = load_recipe("tiny", ["pretrain.epochs=1"])
    assert total_steps(recipe.pretrain, 18_000) == 562  # 1 epoch x 18K / 32 ...
    assert total_steps(recipe.sft, 100_000) == recipe.sft.max_steps == 400  # ... capped by max_steps
    warm = [lr_factor(s, 100, 5, "cosine") for s in range(100)]
    assert warm[:5] == [0.2, 0.4, 0.6, 0.8, 1.0] and warm[5] == 1.0
    assert all(a >= b for a, b in zip(warm[5:], warm[6:])) and 0 < warm[-1] < 0.01
    assert lr_factor(50, 100, 5, "constant") == 1.0


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.slow
def test_pretrain_then_sft_chain_on_cpu(world: str, tmp_path: Path, mlflow_sqlite: str) -> None:
    recipe = load_recipe("tiny", [*FAST, "pretrain.max_steps=40", "pretrain.global_batch_size=8",
                                  "pretrain.micro_batch_size=8", "pretrain.learning_rate=0.003", "pretrain.epochs=4",
                                  "pretrain.vit_unfreeze_from=0",
                                  "sft.max_steps=30", "sft.global_batch_size=8", "sft.micro_batch_size=4",
                                  "sft.learning_rate=0.001"])
    trace = tmp_path / "trace"
    pre = train_stage("pretrain", recipe, StageInputs([world]), str(tmp_path / "pretrain"), trace=str(trace))
    losses = [r["loss"] for r in trace_records(trace, "pretrain")]
    assert pre.steps == len(losses) == 40 and pre.samples_seen == 320 and pre.flagged_samples == 0
    assert _mean(losses[-5:]) < _mean(losses[:5]) - 1.0, losses

    # SFT from the pretrained model, in-process through `launch` and the DeepSpeed engine (ZeRO-0, 1 process)
    sft = launch("sft", recipe, {"data": [world]}, str(tmp_path / "sft"), init=pre.checkpoint_uri, nproc=1,
                 env={"SHAREGPT4V_TRAIN_ENGINE": "deepspeed"}, trace=str(trace))
    sft_losses = [r["loss"] for r in trace_records(trace, "sft")]
    assert sft.steps == 30 and len(sft_losses) == 30 and sft.examples == build_index(
        "sft", recipe.sft, StageInputs([world])).counts["examples.vqa"]
    assert _mean(sft_losses[-5:]) < _mean(sft_losses[:5]) - 0.5, sft_losses
    assert "RANK" not in os.environ  # launch restored the environment

    # one folder per model, the trained ViT included; SFT kept it frozen
    pre_model, processor = load_model(pre.checkpoint_uri)
    sft_model, _ = load_model(sft.checkpoint_uri)
    fresh, _ = load_model(pre.checkpoint_uri)
    from sharegpt4v.modeling.builder import build_tiny

    init_model, _ = build_tiny(recipe.model, processor.tokenizer, seed=recipe.seed)
    layer0 = lambda m: vision_layers(m)[0].mlp.fc1.weight  # noqa: E731
    assert not torch.equal(layer0(pre_model), layer0(init_model))  # pretraining trained the ViT
    assert torch.equal(layer0(sft_model), layer0(pre_model)) and torch.equal(layer0(fresh), layer0(pre_model))
    assert torch.equal(vision_layers(pre_model)[3].mlp.fc1.weight, vision_layers(init_model)[3].mlp.fc1.weight)

    # MLflow: one run per stage with the recipe, batched step metrics, dataset inputs and artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_sqlite)
    run = client.get_run(pre.run_id)
    assert run.info.run_name == "pretrain" and run.data.params["pretrain.learning_rate"] == "0.003"
    assert run.data.params["run.engine"] == "torch" and client.get_run(sft.run_id).data.params["run.engine"] == "deepspeed"
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "rss_mb", "flagged.fully_masked",
                "flagged.truncated", "final_loss", "model_tflops_per_s", "mfu"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(pre.run_id, "loss")] == [10, 20, 30, 40]
    assert [m.step for m in client.get_metric_history(pre.run_id, "mfu")] == [10, 20, 30, 40]
    assert 0 < run.data.metrics["mfu"] < 1 and run.data.params["run.peak_source"] == "measured CPU matmul"
    (dataset,) = run.inputs.dataset_inputs
    assert world in dataset.dataset.source and len(dataset.dataset.digest) == 36
    artifacts = {a.path for a in client.list_artifacts(pre.run_id, "pretrain")}
    assert artifacts == {"pretrain/loss_curve.png", "pretrain/sample_generations.json"}
    samples = json.loads(Path(client.download_artifacts(pre.run_id, "pretrain/sample_generations.json")).read_text())
    assert samples["held_out"] and len(samples["samples"]) == 4
    assert not {s["id"] for s in samples["samples"]} & {i for r in trace_records(trace, "pretrain") for i in r["ids"]}


def test_flagged_samples_are_reported(world: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                      mlflow_sqlite: str) -> None:
    """Detailed captions cut at 48 tokens (16 of them the image): truncated, counted and logged, not dropped.
    (With gradient checkpointing on, which the 7B profile uses.)"""
    recipe = load_recipe("tiny", ["model.language.max_length=48", "pretrain.max_steps=3", "pretrain.global_batch_size=4",
                                  "pretrain.micro_batch_size=4", "captioning.max_new_tokens=4",
                                  "pretrain.gradient_checkpointing=true"])
    with caplog.at_level("WARNING", logger="sharegpt4v.training"):
        result = train_stage("pretrain", recipe, StageInputs([world]), str(tmp_path / "out"))
    assert result.flagged["truncated"] == result.flagged_samples == 12 and result.flagged["fully_masked"] == 0
    assert any("12 flagged samples" in r.message and "12 truncated" in r.message for r in caplog.records)
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(mlflow_sqlite).get_run(result.run_id).data.metrics
    assert metrics["flagged.truncated"] == 12 and metrics["flagged_samples"] == 12


@pytest.mark.slow
def test_two_processes_zero2_see_disjoint_data(world: str, tmp_path: Path) -> None:
    """torchrun x 2, DeepSpeed ZeRO-2 on CPU (gloo): every example of the epoch trained on exactly once."""
    recipe = load_recipe("tiny", [*FAST, "compute.gpus_per_node=2", "pretrain.zero_stage=2",
                                  "pretrain.global_batch_size=16", "pretrain.micro_batch_size=4",
                                  "captioner.micro_batch_size=8", "sft.micro_batch_size=8", "pretrain.max_samples=64",
                                  "pretrain.save_every_steps=2"])
    trace = tmp_path / "trace"
    result = launch("pretrain", recipe, StageInputs([world]), str(tmp_path / "out"), nproc=2, trace=str(trace),
                    timeout=300)
    assert result.steps == 4 and result.samples_seen == 64
    seen = [[i for r in trace_records(trace, "pretrain", rank) for i in r["ids"]] for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 32  # 4 steps x 2 micro-batches x 4 per rank
    assert not set(seen[0]) & set(seen[1])
    index = build_index("pretrain", recipe.pretrain, StageInputs([world]))
    stream = iter_examples(index, recipe.pretrain, 0, 0, 1)
    assert set(seen[0]) | set(seen[1]) == {next(stream).id for _ in range(64)}
    # the same loss on both ranks (all-reduced) and a checkpoint whose optimizer state both ranks wrote
    assert [r["loss"] for r in trace_records(trace, "pretrain", 0)] == [r["loss"] for r in trace_records(trace, "pretrain", 1)]
    manifest = storage.open_store(str(tmp_path / "out")).read_manifest("checkpoint-2")
    files = {f["path"] for f in manifest["files"]}
    assert {"trainer_state/optimizer-rank-00000.safetensors", "trainer_state/optimizer-rank-00001.safetensors",
            "trainer_state/rng-rank-00001.safetensors", "model.safetensors"} <= files
    load_model(result.checkpoint_uri)


def _cli(world: str, out: Path, trace: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "sharegpt4v.training.run", "--stage", "pretrain", "--profile", "tiny",
            "--data", world, "--out", str(out), "--trace", str(trace), *overrides]


@pytest.mark.slow
def test_killed_run_resumes_with_a_continuous_loss_curve(world: str, tmp_path: Path) -> None:
    """SIGKILL after a checkpoint, rerun: same steps, same losses as an uninterrupted run (single process)."""
    overrides = [*FAST, "pretrain.max_steps=60", "pretrain.global_batch_size=4", "pretrain.micro_batch_size=2",
                 "pretrain.save_every_steps=10", "pretrain.keep_checkpoints=1", "pretrain.max_samples=100",
                 "pretrain.epochs=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(world, tmp_path / "ref", tmp_path / "ref-trace", *overrides), env=env, check=True,
                   cwd=ROOT, capture_output=True, timeout=300)
    reference = trace_records(tmp_path / "ref-trace", "pretrain")
    assert [r["step"] for r in reference] == list(range(1, 61))

    out = tmp_path / "out"
    proc = subprocess.Popen(_cli(world, out, tmp_path / "killed", *overrides), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-20" / "manifest.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final" / "manifest.json").exists()
    killed = trace_records(tmp_path / "killed", "pretrain")
    resume_step = int(latest_checkpoint(str(out)).rsplit("-", 1)[1])
    assert resume_step >= 20 and len(killed) >= resume_step

    done = subprocess.run(_cli(world, out, tmp_path / "resumed", *overrides), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    resumed = trace_records(tmp_path / "resumed", "pretrain")
    assert result["steps"] == 60 and [r["step"] for r in resumed] == list(range(resume_step + 1, 61))
    for record in killed + resumed:
        ref = reference[record["step"] - 1]
        assert record["ids"] == ref["ids"] and record["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert record["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), record["step"]
    assert [c.step for c in list_checkpoints(str(out))] == [50]  # keep_checkpoints=1, partial ones removed


def test_checkpoints_on_s3_resume_and_ignore_incomplete(world: str, s3_uri: str, tmp_path: Path) -> None:
    recipe = load_recipe("tiny", [*FAST, "pretrain.max_steps=6", "pretrain.global_batch_size=4",
                                  "pretrain.micro_batch_size=4", "pretrain.save_every_steps=2",
                                  "pretrain.keep_checkpoints=1", "pretrain.max_samples=40"])
    first = train_stage("pretrain", recipe, StageInputs([world]), s3_uri, trace=str(tmp_path / "t1"))
    assert first.checkpoint_uri == f"{s3_uri}/final"
    assert [(c.step, c.complete) for c in list_checkpoints(s3_uri)] == [(4, True)]  # checkpoint-2 pruned
    store = storage.open_store(s3_uri)
    manifest = store.read_manifest("checkpoint-4")
    files = {f["path"] for f in manifest["files"]}
    assert manifest["kind"] == "sharegpt4v.train-checkpoint" and manifest["step"] == 4
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state/state.json",
            "trainer_state/optimizer-rank-00000.safetensors", "trainer_state/rng-rank-00000.safetensors"} <= files
    assert all(f.endswith((".json", ".safetensors", ".jinja")) for f in files)  # no pickle anywhere
    local = tmp_path / "opt.safetensors"
    store.get_file("checkpoint-4/trainer_state/optimizer-rank-00000.safetensors", local)
    with safe_open(str(local), framework="pt") as f:
        assert any(k.startswith("exp_avg_sq/model.language_model.") for k in f.keys())
    state = store.get_json("checkpoint-4/trainer_state/state.json")
    assert state["step"] == 4 and state["position"] == {"epoch": 0, "index": 16} and "0" in state["rng"]
    assert state["scheduler"]["last_epoch"] == 4 and len(state["loss_history"]) == 4
    load_model(first.checkpoint_uri)  # final/ from S3, through the model builder

    # a completed stage returns at once; a killed one (no final manifest, a half-written checkpoint-5)
    # resumes from the newest complete checkpoint
    assert train_stage("pretrain", recipe, StageInputs([world]), s3_uri) == first
    store.delete("final/manifest.json")
    store.put_bytes("checkpoint-5/model.safetensors", b"half written")
    assert latest_checkpoint(s3_uri) == f"{s3_uri}/checkpoint-4"
    again = train_stage("pretrain", recipe, StageInputs([world]), s3_uri, trace=str(tmp_path / "t2"))
    before, after = trace_records(tmp_path / "t1", "pretrain"), trace_records(tmp_path / "t2", "pretrain")
    assert [r["step"] for r in after] == [5, 6]
    assert [r["loss"] for r in after] == pytest.approx([r["loss"] for r in before[4:]], rel=1e-5)
    assert again.steps == 6 and again.final_loss == pytest.approx(first.final_loss, rel=1e-5)
    assert [(c.step, c.complete) for c in list_checkpoints(s3_uri)] == [(4, True)]  # the partial one is gone


def test_an_output_made_from_other_inputs_is_refused_not_returned(world: str, tmp_path: Path) -> None:
    """A rerun into `out` returns its result only when recipe, data and init are the same; else one line."""
    base = [*FAST, "pretrain.max_steps=4", "pretrain.global_batch_size=4", "pretrain.micro_batch_size=4",
            "pretrain.max_samples=16", "pretrain.save_every_steps=2"]
    out = str(tmp_path / "out")
    first = train_stage("pretrain", load_recipe("tiny", base), StageInputs([world]), out)
    # what a resume may change (micro-batch, checkpoint cadence) is not a different result
    same = load_recipe("tiny", [*base, "pretrain.micro_batch_size=2", "pretrain.save_every_steps=0"])
    assert train_stage("pretrain", same, StageInputs([world]), out) == first

    other_lr = load_recipe("tiny", [*base, "pretrain.learning_rate=0.0005"])
    with pytest.raises(OutputMismatch, match=r"pretrain\.learning_rate: 0\.002 -> 0\.0005.*--no-resume") as err:
        train_stage("pretrain", other_lr, StageInputs([world]), out)
    assert "\n" not in str(err.value) and "final" in str(err.value)
    other_world = str(tmp_path / "other-world")
    generate_world(other_world, 40, 1, WorldConfig(samples_per_shard=16), progress=False)
    with pytest.raises(OutputMismatch, match=r"data\.0\.digest"):
        train_stage("pretrain", load_recipe("tiny", base), StageInputs([other_world]), out)
    with pytest.raises(OutputMismatch, match=r"init: none -> "):
        train_stage("pretrain", load_recipe("tiny", base), StageInputs([world]), out, init=first.checkpoint_uri)
    with pytest.raises(OutputMismatch, match=r"holds a pretrain model, not sft"):
        train_stage("sft", load_recipe("tiny", base), StageInputs([world]), out)

    # a killed run (final/ gone, a checkpoint left) does not resume under another recipe either
    storage.open_store(out).delete("final/manifest.json")
    with pytest.raises(OutputMismatch, match=r"checkpoint-2: holds a pretrain checkpoint"):
        train_stage("pretrain", other_lr, StageInputs([world]), out)
    # starting over is explicit, and then the new recipe is what `out` holds
    again = train_stage("pretrain", other_lr, StageInputs([world]), out, resume=False)
    assert storage.open_store(out).read_manifest("final")["made_from"]["recipe"]["pretrain"]["learning_rate"] == 0.0005
    assert train_stage("pretrain", other_lr, StageInputs([world]), out) == again

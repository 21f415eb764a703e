"""The per-GPU memory plan: parameter counts match the built model, the 7B figures match hand arithmetic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sharegpt4v.config import load_recipe
from sharegpt4v.training.memory import GIB, MemoryPlanError, check_memory_fit, estimate_stage_memory, parameter_counts

ROOT = Path(__file__).resolve().parents[2]


def test_parameter_counts_are_the_built_models() -> None:
    from sharegpt4v.training.freezing import apply_freezing
    from tests.modeling.fixtures import tiny_model

    model, _ = tiny_model()
    # the tiny tokenizer is trained to at most vocab_size tokens: count with the size it reached
    recipe = load_recipe("tiny", [f"model.language.vocab_size={model.config.text_config.vocab_size}"])
    for stage in ("captioner", "pretrain", "sft"):
        counts = parameter_counts(recipe, stage)
        assert counts["total"] == sum(p.numel() for p in model.parameters())
        trainable = set(apply_freezing(model, getattr(recipe, stage)))
        assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable), stage


# Hand arithmetic for the a100-7b profile (CLIP ViT-L/14-336 -> mlp2x_gelu -> Vicuna-7B, 16 GPUs, ZeRO-3, bf16):
VISION = 3 * 14 * 14 * 1024 + 1024 + 577 * 1024 + 2 * 1024 + 24 * 12_596_224 + 2 * 1024  # 303,507,456
VISION_LAYER = 4 * (1024 * 1024 + 1024) + (1024 * 4096 + 4096) + (4096 * 1024 + 1024) + 4 * 1024  # 12,596,224
PROJECTOR = 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # 20,979,712
LLM_LAYER = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # 202,383,360
LANGUAGE = 2 * 32000 * 4096 + 32 * LLM_LAYER + 4096  # 6,738,415,616: Vicuna-7B's 6.74B
TOTAL = VISION + PROJECTOR + LANGUAGE  # 7,062,902,784


def test_the_7b_plan_matches_hand_computed_figures() -> None:
    recipe = load_recipe("a100-7b")
    assert VISION_LAYER == 12_596_224 and TOTAL == 7_062_902_784
    pre = parameter_counts(recipe, "pretrain")
    # pretraining trains the LLM, the projector and ViT layers 12..22 (layer 23 feeds nothing: feature layer -2)
    assert pre["total"] == TOTAL and pre["trainable"] == LANGUAGE + PROJECTOR + 11 * VISION_LAYER
    est = estimate_stage_memory(recipe, "pretrain")
    trainable = LANGUAGE + PROJECTOR + 11 * VISION_LAYER
    assert est.parameters == TOTAL * 2 // 16  # bf16, partitioned over 16 GPUs (ZeRO-3)
    assert est.gradients == trainable * 2 // 16
    assert est.optimizer == trainable * 12 // 16  # fp32 master + Adam m + v
    assert est.gathered == 2 * LLM_LAYER * 2  # two decoder layers whole (computed + prefetched)
    # micro-batch 8 x 2048 tokens, checkpointed: 32 layer inputs (2 h bytes) + one layer recomputed (16 h + 8 I)
    llm_acts = 8 * 2048 * (32 * 2 * 4096 + 16 * 4096 + 8 * 11008)
    vit_acts = 8 * 577 * (11 * 2 * 1024 + 16 * 1024 + 4 * 4096)
    assert est.activations == llm_acts + vit_acts
    assert est.logits == 8 * 2048 * 32000 * 10
    assert est.total == pytest.approx(20.66 * GIB, rel=1e-3) and est.fits
    sft = estimate_stage_memory(recipe, "sft")  # ViT frozen: no ViT gradients, optimizer states or activations
    assert sft.optimizer == (LANGUAGE + PROJECTOR) * 12 // 16 and sft.activations == llm_acts


def test_a_plan_that_cannot_fit_is_refused_in_one_line() -> None:
    # one GPU, no ZeRO partitioning, no checkpointing: 7B of bf16 weights + fp32 Adam states alone need ~100 GiB
    recipe = load_recipe("a100-7b", ["compute.num_nodes=1", "compute.gpus_per_node=1", "sft.zero_stage=0",
                                     "sft.gradient_checkpointing=false"])
    with pytest.raises(MemoryPlanError, match=r"captioner: needs ~\d+\.\d GiB per GPU but compute.gpu_memory_gib is 80 "
                                              r"\(largest: optimizer states") as err:
        check_memory_fit(recipe)
    assert "\n" not in str(err.value)
    # ZeRO-3 with CPU offload on one GPU: optimizer states and parameters live in host memory
    offload = load_recipe("a100-7b", ["compute.num_nodes=1", "compute.gpus_per_node=1", "compute.zero_offload=true"])
    plan = check_memory_fit(offload)
    assert all(est.fits and est.optimizer == 0 and est.parameters == 0 for est in plan)
    assert plan[1].host == parameter_counts(offload, "pretrain")["trainable"] * 12 + TOTAL * 2


def test_config_show_prints_the_plan_and_refuses_what_cannot_fit() -> None:
    def show(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sharegpt4v", "config", "show", "--profile", "a100-7b", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)

    ok = show()
    assert ok.returncode == 0, ok.stderr
    rows = [line.split() for line in ok.stdout.splitlines() if line.startswith("#") and "pretrain" in line]
    assert rows and rows[-1][1] == "pretrain" and rows[-1][-1] == "yes"
    bad = show("compute.gpus_per_node=1", "compute.num_nodes=1", "compute.gpu_memory_gib=40")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "compute.gpu_memory_gib is 40" in bad.stderr


def test_the_pipeline_start_task_prints_the_plan_and_refuses_what_cannot_fit(capsys, monkeypatch) -> None:
    from sharegpt4v.stages import start_pipeline_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # no tracking: the check alone
    one_node = "compute.num_nodes=1 compute.gpu_memory_gib=24"  # a one-node recipe trains in the task's pod
    with pytest.raises(MemoryPlanError, match="compute.gpu_memory_gib is 24"):
        start_pipeline_run("sharegpt4v", "kfp-run-1", "run", {"profile": "a100-7b", "train_gpus": 1,
                                                              "overrides": one_node})
    assert "pretrain" in capsys.readouterr().out
    # the 2-node recipe trains as a TrainJob on its 16 GPUs whatever train_gpus says: fits, and the run starts
    assert start_pipeline_run("sharegpt4v", "kfp-run-2", "run", {"profile": "a100-7b", "train_gpus": 1}) == ""
    assert "yes" in capsys.readouterr().out


def test_the_gpu_training_bench_plans_the_largest_shape_that_fits() -> None:
    def plan(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "bench/gpu/bench_train_7b.py", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    assert plan("--plan", "--gpu-gib", "139", "--host-gib", "128").stdout.startswith("LLaVA-1.5-7B, ZeRO-1 on a 139")
    assert plan("--plan", "--gpu-gib", "80", "--host-gib", "256").stdout.startswith("LLaVA-1.5-7B, ZeRO-3 + CPU offload")
    assert plan("--plan", "--gpu-gib", "80", "--host-gib", "128").stdout.startswith("Llama-3B width")
    import torch

    if not torch.cuda.is_available():  # the GPU run itself is GPU-only; without one it says so in one line
        no_gpu = plan()
        assert no_gpu.returncode == 1 and "no NVIDIA GPU here" in no_gpu.stderr

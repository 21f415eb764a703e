"""Model FLOPs per sample (hand arithmetic for the 7B profile) and the peak MFU divides by."""

from __future__ import annotations

import pytest

from sharegpt4v.config import load_recipe
from sharegpt4v.training.flops import flops_per_sample, measured_cpu_peak, peak_flops
from tests.training.test_memory import LANGUAGE, LLM_LAYER, PROJECTOR, VISION_LAYER


def test_flops_of_a_7b_sample_match_hand_arithmetic() -> None:
    recipe = load_recipe("a100-7b")
    s = 1000  # tokens in the sample, 576 of them image tokens
    decoder = LANGUAGE - 32000 * 4096  # the input embedding is a lookup
    assert decoder == 32 * LLM_LAYER + 4096 + 32000 * 4096
    attention = 12 * 32 * 4096 * s * s
    # pretraining: LLM, projector and ViT layers 12..22 train; layers 0..11 run forward only; 577 patches
    pretrain = s * 6 * decoder + attention + 576 * 6 * PROJECTOR + 577 * VISION_LAYER * (2 * 12 + 6 * 11)
    assert flops_per_sample(recipe, "pretrain", s) == pytest.approx(pretrain, rel=1e-12)
    # SFT: ViT frozen, nothing before it trains: its 23 used layers run forward only
    sft = s * 6 * decoder + attention + 576 * 6 * PROJECTOR + 577 * VISION_LAYER * 2 * 23
    assert flops_per_sample(recipe, "sft", s) == pytest.approx(sft, rel=1e-12)
    # projector-only (arm C): the frozen LLM passes gradients back (4 N) but computes no weight gradients
    proj_only = load_recipe("a100-7b", ["pretrain.train_llm=false", "pretrain.vit_unfreeze_from=null"])
    c = s * 4 * decoder + attention + 576 * 6 * PROJECTOR + 577 * VISION_LAYER * 2 * 23
    assert flops_per_sample(proj_only, "pretrain", s) == pytest.approx(c, rel=1e-12)


def test_peak_comes_from_the_recipe_or_is_measured_on_cpu() -> None:
    assert peak_flops(load_recipe("tiny", ["compute.peak_tflops=2.5"]), "cpu") == (2.5e12, "recipe (compute.peak_tflops)")
    peak, source = peak_flops(load_recipe("tiny"), "cpu")
    assert source == "measured CPU matmul" and peak == measured_cpu_peak("fp32") and 1e8 < peak < 1e13

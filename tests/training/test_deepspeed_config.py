"""DeepSpeed configs built from the recipe, validated by DeepSpeed itself for the tiny and 7B profiles."""

from __future__ import annotations

import pytest

from sharegpt4v.config import load_recipe
from sharegpt4v.training.engine import deepspeed_config


def validate(config: dict, world_size: int, monkeypatch: pytest.MonkeyPatch):
    """`DeepSpeedConfig` checks batch = micro x accumulation x world size; give it the world size."""
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda *a, **k: world_size)
    return DeepSpeedConfig(config)


@pytest.mark.parametrize("stage", ["captioner", "pretrain", "sft"])
def test_tiny_profile(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe("tiny")
    config = deepspeed_config(recipe, stage)
    ds = validate(config, 1, monkeypatch)
    assert ds.zero_optimization_stage == 0 and not ds.bfloat16_config.enabled and not ds.float16_config.enabled
    assert ds.gradient_accumulation_steps == 1 and ds.gradient_clipping == 1.0


def test_tiny_zero2_on_two_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe("tiny", ["compute.gpus_per_node=2", "pretrain.zero_stage=2", "pretrain.micro_batch_size=4",
                                  "captioner.micro_batch_size=4", "sft.micro_batch_size=4"])
    ds = validate(deepspeed_config(recipe, "pretrain"), 2, monkeypatch)
    assert ds.zero_optimization_stage == 2
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (32, 4, 4)


@pytest.mark.parametrize("nodes, accumulation", [(2, 2), (1, 4)])
@pytest.mark.parametrize("stage, batch", [("pretrain", 256), ("sft", 128)])
def test_7b_profile_zero3_bf16(stage: str, batch: int, nodes: int, accumulation: int,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe("a100-7b", [f"compute.num_nodes={nodes}"])
    config = deepspeed_config(recipe, stage)
    ds = validate(config, 8 * nodes, monkeypatch)
    assert ds.zero_optimization_stage == 3 and ds.bfloat16_config.enabled and not ds.float16_config.enabled
    assert ds.train_batch_size == batch and ds.train_micro_batch_size_per_gpu == 8
    expected = batch // (8 * 8 * nodes)
    assert ds.gradient_accumulation_steps == expected == recipe.gradient_accumulation_steps(stage)
    if stage == "pretrain":
        assert expected == accumulation  # 256 = 8 x 2 x 16 GPUs = 8 x 4 x 8 GPUs
    assert ds.zero_config.gather_16bit_weights_on_model_save  # consolidated safetensors at save time
    assert ds.gradient_clipping == 1.0


def test_offload_adds_cpu_offload(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe("a100-7b")
    config = deepspeed_config(recipe, "sft", offload=True)
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    ds = validate(config, 16, monkeypatch)
    assert ds.zero_config.offload_optimizer is not None and ds.zero_config.offload_param is not None

"""Typed recipes: profiles, overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sharegpt4v.config import ConfigError, available_profiles, load_recipe


def test_profiles_exist_and_validate() -> None:
    assert {"tiny", "a100-7b"} <= set(available_profiles())
    for name in available_profiles():
        assert load_recipe(name).profile == name


def test_a100_profile_holds_the_papers_settings() -> None:
    r = load_recipe("a100-7b")
    vision, language = r.model.vision, r.model.language
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_layers) == (336, 14, 1024, 24)
    assert vision.feature_layer == -2 and r.model.image_tokens == 576
    assert r.model.projector == "mlp2x_gelu"
    assert (language.hidden_size, language.num_layers, language.max_length) == (4096, 32, 2048)
    assert "vicuna-7b-v1.5" in language.path and "clip-vit-large-patch14-336" in vision.path
    assert (r.pretrain.global_batch_size, r.sft.global_batch_size) == (256, 128)
    for stage in (r.pretrain, r.sft):
        assert stage.learning_rate == 2e-5 and stage.lr_schedule == "cosine"
        assert stage.warmup_ratio == 0.03 and stage.weight_decay == 0.0 and stage.epochs == 1
        assert stage.zero_stage == 3 and stage.gradient_checkpointing
    assert r.compute.precision == "bf16" and r.compute.world_size == 16
    assert r.pretrain.vit_unfreeze_from == 12 and r.sft.vit_unfreeze_from is None
    assert (r.pretrain.template, r.sft.template) == ("plain", "vicuna_v1")
    assert (r.pretrain.image_aspect, r.sft.image_aspect) == ("crop", "pad")
    # accumulation keeps the global batch for any GPU count
    assert r.gradient_accumulation_steps("pretrain") * r.pretrain.micro_batch_size * 16 == 256
    one_node = load_recipe("a100-7b", ["compute.num_nodes=1"])
    assert one_node.gradient_accumulation_steps("pretrain") * one_node.pretrain.micro_batch_size * 8 == 256


def test_overrides_convert_strings_to_field_types() -> None:
    r = load_recipe("tiny", ["pretrain.learning_rate=2e-5", "seed=7", "world.sources.art=0", "sft.vit_unfreeze_from=null",
                             "compute.precision=bf16"])
    assert r.pretrain.learning_rate == 2e-5 and r.seed == 7 and r.world.sources["art"] == 0
    assert r.compute.precision == "bf16"


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("pretrain.learning_rte=1e-3", "pretrain.learning_rte", "did you mean 'pretrain.learning_rate'"),
        ("model.vison.num_layers=2", "model.vison", "unknown key"),
        ("pretrain.learning_rate=fast", "pretrain.learning_rate", "valid number"),
        ("seed=1.5", "seed", "integer"),
        ("compute.precision=fp8", "compute.precision", "fp32"),
        ("pretrain.micro_batch_size=3", "pretrain.global_batch_size", "not divisible"),
        ("compute.gpus_per_node=3", "captioner.global_batch_size", "not divisible"),
        ("model.image_tokens=17", "model.image_tokens", "patch_size"),
        ("pretrain.vit_unfreeze_from=3", "pretrain.vit_unfreeze_from", "no trainable ViT layer"),
        ("world.max_objects=9", "world.max_objects", "<= 6"),
        ("pretrain.warmup_ratio=1.5", "pretrain.warmup_ratio", "[0, 1)"),
        ("pretrain=3", "pretrain", "dictionary"),
        ("seed", "seed", "key.sub=value"),
    ],
)
def test_bad_recipes_name_the_key(override: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_recipe("tiny", [override])
    message = str(err.value)
    assert key in message and words in message, message


def test_unknown_profile() -> None:
    with pytest.raises(ConfigError, match="a100-7b"):
        load_recipe("a100-70b")


def test_flat_params_for_tracking() -> None:
    flat = load_recipe("a100-7b").flat()
    assert flat["pretrain.learning_rate"] == 2e-5
    assert flat["model.vision.image_size"] == 336
    assert all(not isinstance(v, dict) for v in flat.values())


def test_cli_config_show_and_usage_errors() -> None:
    run = lambda *a: subprocess.run([sys.executable, "-m", "sharegpt4v", *a], capture_output=True, text=True)  # noqa: E731
    shown = run("config", "show", "--profile", "a100-7b", "sft.learning_rate=1e-5")
    assert shown.returncode == 0 and "learning_rate: 1.0e-05" in shown.stdout
    bad = run("config", "show", "pretrain.nope=1")
    assert bad.returncode == 2 and "pretrain.nope" in bad.stderr and bad.stderr.count("\n") == 1
    assert run("config", "frobnicate").returncode == 2

"""Which parameters train in each stage; the last ViT layer (never reached with feature layer -2) stays frozen."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sharegpt4v.config import load_recipe
from sharegpt4v.modeling.builder import build_empty
from sharegpt4v.training.conversations import caption_conversation
from sharegpt4v.training.data import Position, RawExample, encode_examples
from sharegpt4v.training.freezing import apply_freezing, used_vision_layers, vision_layers
from tests.modeling.fixtures import IMAGE_SIZE, IMAGE_TOKENS, png, tiny_model


def _groups(names: list[str]) -> set[str]:
    out = set()
    for n in names:
        if "vision_tower.encoder.layers." in n:
            out.add("vit." + n.split("encoder.layers.")[1].split(".")[0])
        elif "vision_tower" in n:
            out.add("vit.other")
        elif "multi_modal_projector" in n:
            out.add("projector")
        else:
            out.add("llm")
    return out


def test_pretrain_trains_llm_projector_and_vit_except_its_last_layer() -> None:
    recipe = load_recipe("tiny", ["pretrain.vit_unfreeze_from=0"])
    model, processor = tiny_model()
    names = apply_freezing(model, recipe.pretrain)  # 4 layers, feature layer -2
    assert used_vision_layers(model) == 3
    assert _groups(names) == {"llm", "projector", "vit.0", "vit.1", "vit.2"}
    assert not any(p.requires_grad for p in vision_layers(model)[3].parameters())
    assert not model.model.vision_tower.embeddings.patch_embedding.weight.requires_grad
    assert model.lm_head.weight.requires_grad and model.model.language_model.embed_tokens.weight.requires_grad

    # one backward pass: every trainable parameter gets a gradient (DDP/ZeRO would fail on unused ones)
    tok = processor.tokenizer
    ex = RawExample("x", caption_conversation("a red square at the top"), png((48, 32), (200, 20, 20)), Position())
    batch = encode_examples([ex, ex], tok, "plain", 64, IMAGE_TOKENS, IMAGE_SIZE, "crop", tok.pad_token_id)
    model.train()
    model(**batch.model_inputs()).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert missing == []
    assert all(p.grad is None for p in vision_layers(model)[3].parameters())


def test_sft_and_captioner_keep_the_vit_frozen() -> None:
    recipe = load_recipe("tiny")
    for stage in (recipe.sft, recipe.captioner):
        model, _ = tiny_model()
        assert _groups(apply_freezing(model, stage)) == {"llm", "projector"}


def test_projector_only_and_llm_only() -> None:
    recipe = load_recipe("tiny")
    model, _ = tiny_model()
    only_projector = dataclasses.replace(recipe.pretrain, train_llm=False, vit_unfreeze_from=None)
    assert _groups(apply_freezing(model, only_projector)) == {"projector"}
    later_half = dataclasses.replace(recipe.pretrain, vit_unfreeze_from=2)
    assert _groups(apply_freezing(model, later_half)) == {"llm", "projector", "vit.2"}


def test_7b_pretrain_unfreezes_vit_layers_12_to_22() -> None:
    recipe = load_recipe("a100-7b")
    model = build_empty(recipe.model)  # on the meta device: shapes only
    names = apply_freezing(model, recipe.pretrain)
    assert _groups(names) == {"llm", "projector", *(f"vit.{i}" for i in range(12, 23))}
    assert _groups(apply_freezing(model, recipe.sft)) == {"llm", "projector"}


def test_nothing_trainable_is_refused() -> None:
    recipe = load_recipe("tiny")
    model, _ = tiny_model()
    frozen = dataclasses.replace(recipe.sft, train_llm=False, train_projector=True)
    object.__setattr__(frozen, "train_projector", False)  # bypass the config's own check
    with pytest.raises(ValueError, match="nothing to train"):
        apply_freezing(model, frozen)
    assert torch.is_grad_enabled()


def test_the_language_models_input_embeddings_can_stay_frozen() -> None:
    model, _ = tiny_model()
    names = apply_freezing(model, load_recipe("tiny", ["pretrain.train_llm_embeddings=false"]).pretrain)
    embeddings = model.model.language_model.embed_tokens.weight
    assert not embeddings.requires_grad and not any("embed_tokens" in n for n in names)
    assert model.lm_head.weight.requires_grad and model.model.language_model.layers[0].self_attn.q_proj.weight.requires_grad
    assert "projector" in _groups(names)
    model, _ = tiny_model()
    apply_freezing(model, load_recipe("tiny").pretrain)
    assert model.model.language_model.embed_tokens.weight.requires_grad  # the default trains them


def test_the_language_model_can_learn_at_its_own_rate() -> None:
    """`llm_learning_rate`: the LLM (and lm_head) step at their rate, the projector and ViT at the stage's."""
    from sharegpt4v.training.optimizer import make_optimizer

    def moved(overrides: list[str]) -> dict[str, float]:
        torch.manual_seed(0)
        stage = load_recipe("tiny", ["pretrain.learning_rate=1e-2", "pretrain.vit_unfreeze_from=0", *overrides]).pretrain
        model, processor = tiny_model()
        named = [(n, p) for n, p in model.named_parameters() if n in set(apply_freezing(model, stage))]
        before = {n: p.detach().clone() for n, p in named}
        tok = processor.tokenizer
        ex = RawExample("x", caption_conversation("a red square at the top"), png((48, 32), (200, 20, 20)), Position())
        batch = encode_examples([ex, ex], tok, "plain", 64, IMAGE_TOKENS, IMAGE_SIZE, "crop", tok.pad_token_id)
        optimizer = make_optimizer(named, stage)
        model(**batch.model_inputs()).loss.backward()
        optimizer.step()
        out: dict[str, float] = {}
        for n, p in named:
            group = _groups([n]).pop().split(".")[0]
            out[group] = max(out.get(group, 0.0), float((p.detach() - before[n]).abs().max()))
        return out

    same = moved([])
    assert min(same.values()) > 1e-3  # Adam's first step moves every part by about the rate
    slow = moved(["pretrain.llm_learning_rate=1e-6"])
    assert slow["llm"] < 1e-5 and slow["projector"] > 1e-3 and slow["vit"] > 1e-3
    with pytest.raises(ValueError, match="llm_learning_rate"):
        load_recipe("tiny", ["pretrain.llm_learning_rate=2"])

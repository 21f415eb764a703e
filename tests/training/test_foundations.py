"""Foundations: the CLIP and Vicuna stand-ins a model built from config starts from."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sharegpt4v import storage
from sharegpt4v.config import load_recipe
from sharegpt4v.modeling.builder import build_model
from sharegpt4v.training.foundations import (
    alt_text,
    build_foundations,
    load_world_images,
    scene_statement,
    train_language_model,
    train_language_qa,
    train_vision_tower,
)
from sharegpt4v.world.generate import generate_world

OVERRIDES = ["world.image_size=48", "world.max_objects=3", "world.sources.text=0", "world.sources.art=0",
             "world.text_probability=0", "model.vision.image_size=48", "model.vision.patch_size=16",
             "model.image_tokens=9", "model.language.vocab_size=400", "model.language.initializer_range=0.08"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("foundations") / "world")
    generate_world(uri, 160, 5, load_recipe("tiny", OVERRIDES).world, progress=False)
    return uri


def test_alt_text_names_objects_and_background_only() -> None:
    scene = {"background": "white", "objects": [
        {"colour": "red", "shape": "circle", "size": "large", "row": 0, "col": 0},
        {"colour": "blue", "shape": "square", "size": "small", "row": 2, "col": 2}]}
    text = alt_text(scene, random.Random(0))
    assert set(text.split(", ")) == {"red circle", "blue square", "white background"}
    assert not any(word in text for word in ("large", "small", "top", "left", "two", "2"))


@pytest.mark.parametrize("texture", ["plain", "gradient", "stripes", "dots", "noise"])
def test_alt_text_with_texture_says_it_as_the_world_s_captions_do(texture: str) -> None:
    from sharegpt4v.world.facts import extract_facts

    scene = {"background": "beige", "texture": texture,
             "objects": [{"colour": "red", "shape": "circle", "size": "large", "row": 0, "col": 0}]}
    text = alt_text(scene, random.Random(0), "names+size+texture")
    # The world's own caption reader finds the background's colour and texture in it, and nothing else new.
    background = {f for f in extract_facts(text) if f.split("|")[0] in ("background", "texture")}
    assert background == {"background|beige", f"texture|{texture}"}, text
    assert "texture" not in alt_text(scene, random.Random(0), "names+size")


def test_scene_statement_says_every_object_where_the_questions_look_for_it() -> None:
    scene = {"background": "white", "objects": [
        {"colour": "orange", "shape": "circle", "size": "large", "row": 0, "col": 0},
        {"colour": "blue", "shape": "square", "size": "small", "row": 2, "col": 1}]}
    text = scene_statement(scene, random.Random(0))
    assert set(text.split(". ")) == {"There is an orange circle in the top left corner",
                                     "There is a blue square at the bottom center", "The background is white."}


def test_text_qa_teaches_the_language_model_to_answer_from_the_statement(world: str) -> None:
    recipe = load_recipe("tiny", [*OVERRIDES, "foundations.language_steps=20", "foundations.language_qa_steps=60"])
    images = load_world_images(world, "train", 48)
    # One conversation per question, each opening with its scene's statement and asking as the chat models are asked.
    conversations = images.text_qa()
    assert len(conversations) > 10 * len(images.scenes)
    first = conversations[0][0]["value"]
    assert first.startswith("There is ") and "Answer" in first and "<image>" not in first
    model, tokenizer, _ = train_language_model(recipe, images.texts)
    held_out = conversations[-64:]

    def answer_loss() -> float:
        from sharegpt4v.modeling.templates import encode_conversation

        total = 0.0
        for conversation in held_out:
            enc = encode_conversation(conversation, tokenizer, "vicuna_v1", 256, 9)
            with torch.no_grad():
                total += float(model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels])).loss)
        return total / len(held_out)

    before = answer_loss()
    metrics = train_language_qa(recipe, model, tokenizer, conversations[:-64])
    assert metrics["language_qa.conversations"] == len(conversations) - 64
    assert answer_loss() < 0.8 * before


def test_contrastive_training_pulls_images_and_their_alt_text_together(world: str) -> None:
    recipe = load_recipe("tiny", [*OVERRIDES, "foundations.vision_steps=60", "foundations.vision_batch_size=32"])
    images = load_world_images(world, "train", 48)
    from sharegpt4v.modeling.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([alt_text(s, random.Random(0)) for s in images.scenes], 300)
    tower, metrics = train_vision_tower(recipe, images, tokenizer)
    # log(32) ~ 3.47 is chance for a batch of 32; identical alt texts share targets, so the floor is lower.
    assert metrics["vision.final_loss"] < 0.8 * math.log(32)
    # Every image token says which grid cell it is: the position embeddings were drawn large.
    assert float(tower.embeddings.position_embedding.weight.detach().std()) > 0.3


def test_build_foundations_once_and_build_llava_from_them(world: str, tmp_path) -> None:
    recipe = load_recipe("tiny", [*OVERRIDES, "foundations.vision_steps=5", "foundations.language_steps=5",
                                  "foundations.language_qa_steps=3"])
    out = str(tmp_path / "foundations")
    result = build_foundations(recipe, world, out)
    assert storage.open_store(out).is_complete() and result["language.texts"] > 100
    assert result["language_qa.conversations"] > 100  # the text QA phase ran
    assert result["overrides"] == [f"model.vision.path={out}/vision", f"model.language.path={out}/language"]
    model, processor = build_model(load_recipe("tiny", [*OVERRIDES, *result["overrides"]]).model)
    assert model.config.image_seq_length == 9 and processor.tokenizer.convert_tokens_to_ids("<image>") == 4
    # The language model's trained weights are the LLaVA's.
    from transformers import LlamaForCausalLM

    llm = LlamaForCausalLM.from_pretrained(f"{out}/language")
    assert torch.equal(llm.lm_head.weight, model.lm_head.weight)
    # A rerun reuses the complete folder (nothing retrained: the same files).
    before = storage.open_store(f"{out}/language").read_manifest()["files"]
    again = build_foundations(recipe, world, out)
    assert again["overrides"] == result["overrides"]
    assert storage.open_store(f"{out}/language").read_manifest()["files"] == before


def test_foundations_refuse_data_without_scenes(tmp_path) -> None:
    from PIL import Image

    from sharegpt4v.data.ingest import ingest

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 60, 10, 10)).save(folder / f"{i}.png")
    recipe = load_recipe("tiny")
    ingest(str(folder), str(tmp_path / "shards"), recipe.ingest, progress=False)
    with pytest.raises(ValueError, match="no scene"):
        load_world_images(str(tmp_path / "shards"), "data", 32)

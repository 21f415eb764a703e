"""Blind baselines: a majority-per-template answerer and a model asked with a blank image."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from sharegpt4v.config import WorldConfig
from sharegpt4v.evaluation.blind import BlankImageAnswerer, MajorityAnswerer, blank_image, question_template
from sharegpt4v.evaluation.world_vqa import item_questions, score_world
from sharegpt4v.modeling.images import to_tensor
from sharegpt4v.world.sample import make_sample

WORLD = WorldConfig(image_size=32, max_objects=3, sources={"photo": 1.0, "text": 0.0, "art": 0.0}, text_probability=0.0)


@pytest.fixture(scope="module")
def items() -> list[dict]:
    return [item for i in range(400) for item in make_sample(11, i, WORLD).metadata["vqa"]]


def test_templates_mask_the_objects_but_keep_numbers() -> None:
    assert question_template("yesno", "existence", "Is there a red circle in the image?\nAnswer ...") == \
        question_template("yesno", "existence", "Is there a blue star in the image?")
    assert question_template("yesno", "count", "Are there exactly 4 squares in the image?")[2] == \
        "Are there exactly 4 _ in the image?"


def test_majority_baseline_is_the_floor_a_blind_model_reaches(items: list[dict]) -> None:
    train, test = items[: len(items) // 2], items[len(items) // 2:]
    questions = [q for item in test for q in item_questions(item, None)]
    blind = score_world(questions, MajorityAnswerer(train).answer(questions))
    # It cannot tell a pair's two questions apart where they share a template (MME's floor: 25): colour
    # and count pairs differ only in a masked word; existence pairs too, but for the article ("an orange").
    categories = blind["yesno"]["categories"]
    assert categories["colour"]["score"] == 25.0 and categories["count"]["score"] == 25.0
    assert categories["existence"]["score"] < 30.0
    # The style of a photo-only world is constant: the prior answers it in every rotation.
    assert blind["mc"]["categories"]["style"]["circular"] == 1.0 and blind["mc"]["constant_categories"] == ["style"]
    # "How many <shape>s are there?" is usually "0" for a shape the image lacks: a prior, not sight.
    assert blind["short"]["categories"]["count"]["acc"] > 0.3
    # Colour of a named object: no better than the most common colour.
    assert blind["short"]["categories"]["colour"]["acc"] < 0.25
    # Scrambling which answers it learnt from breaks it: it is the data that it uses.
    shuffled = [dict(item, answer=random.Random(i).choice(["yes", "no"])) if item["kind"] == "yesno" else item
                for i, item in enumerate(train)]
    assert score_world(questions, MajorityAnswerer(shuffled).answer(questions))["short"] == blind["short"]


def test_blank_image_answerer_replaces_every_image() -> None:
    seen: list[bytes] = []

    class Recorder:
        model_id = "m"

        def answer(self, questions):
            seen.extend(q.image for q in questions)
            return ["yes"] * len(questions)

    sample = make_sample(11, 0, WORLD)
    questions = [q for item in sample.metadata["vqa"] for q in item_questions(item, sample.image)]
    texts = BlankImageAnswerer(Recorder()).answer(questions)
    assert texts == ["yes"] * len(questions) and set(seen) == {blank_image()}
    # The blank image normalises to (almost) zero: no signal reaches the vision tower.
    assert float(to_tensor(blank_image(), 32).abs().max()) < 0.01
    assert Image.open(io.BytesIO(blank_image())).size == (64, 64)

"""The local LLaVA captioner behind the `Captioner` interface (tiny model, random weights)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from sharegpt4v.captioning.engine import (
    PROMPT_ID,
    LlavaCaptioner,
    caption_prompt,
    make_captioner,
)
from sharegpt4v.captioning.records import (
    CAPTION_INSTRUCTION,
    CaptionRequest,
    make_record,
)
from sharegpt4v.config import load_recipe
from sharegpt4v.modeling.builder import save_model
from sharegpt4v.modeling.inference import InferenceEngine
from tests.modeling.fixtures import recipe, tiny_model, world


def _requests(n: int) -> list[CaptionRequest]:
    return [CaptionRequest(s.id, s.image, s.source, hashlib.sha256(s.image).hexdigest()) for s in world(n)]


def _captioner(max_new_tokens: int = 8, batch_size: int = 4) -> LlavaCaptioner:
    model, processor = tiny_model()
    cfg = dataclasses.replace(recipe().captioning, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return LlavaCaptioner(InferenceEngine(model, processor, recipe().model, cfg), name="tiny-captioner")


def test_caption_batch_in_order_with_a_corrupt_image() -> None:
    captioner = _captioner()
    requests = _requests(6)
    requests[2] = dataclasses.replace(requests[2], image=b"\x00corrupt")
    results = captioner.caption_batch(requests)
    assert [r.id for r in results] == [r.id for r in requests]
    bad = results[2]
    assert bad.status == "error" and bad.reason == "bad_image" and "not a decodable image" in (bad.detail or "")
    good = [r for i, r in enumerate(results) if i != 2]
    assert all(r.status == "ok" and r.caption and r.prompt_id == PROMPT_ID for r in good)
    assert all(r.prompt_tokens == results[0].prompt_tokens > 16 and 0 < r.completion_tokens <= 8 for r in good)
    assert all(r.seconds > 0 for r in good)
    # Random weights rarely emit </s>: captions that hit max_new_tokens are ok but marked.
    truncated = [r for r in good if r.completion_tokens == 8]
    assert truncated and all(r.reason == "truncated" and r.detail == "truncated at max_new_tokens=8" for r in truncated)
    record = make_record(requests[0], results[0], captioner.name)
    assert record["captioner"] == "tiny-captioner" and record["status"] == "ok"


def test_prompt_is_the_fixed_instruction_in_vicuna_v1() -> None:
    assert caption_prompt().endswith(f"USER: <image>\n{CAPTION_INSTRUCTION} ASSISTANT:")
    assert caption_prompt().startswith("A chat between a curious user")


def test_same_captions_as_one_at_a_time() -> None:
    captioner = _captioner(batch_size=3)
    requests = _requests(5)
    batched = captioner.caption_batch(requests)
    alone = [captioner.caption_batch([r])[0] for r in requests]
    assert [r.caption for r in batched] == [r.caption for r in alone]


def test_empty_caption_is_an_error() -> None:
    captioner = _captioner()
    model = captioner.engine.model
    head = torch.nn.Linear(model.config.text_config.hidden_size, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[captioner.engine.eos_id] = 1.0
    model.lm_head = head
    result = captioner.caption_batch(_requests(1))[0]
    assert result.status == "error" and result.reason == "empty" and result.completion_tokens == 1


def test_make_captioner_from_a_saved_checkpoint(tmp_path: Path) -> None:
    model, processor = tiny_model(seed=4)
    save_model(model, processor, str(tmp_path / "captioner"))
    rec = load_recipe("tiny", ["captioning.max_new_tokens=5", "captioning.batch_size=2"])
    captioner = make_captioner(str(tmp_path / "captioner"), rec)
    assert isinstance(captioner, LlavaCaptioner)
    assert captioner.name.startswith(f"llava:{tmp_path / 'captioner'}@") and len(captioner.name.rsplit("@", 1)[1]) == 12
    assert captioner.engine.aspect == rec.captioner.image_aspect == "pad"
    results = captioner.caption_batch(_requests(3))
    assert all(r.status == "ok" and r.completion_tokens <= 5 for r in results)
    same = make_captioner(str(tmp_path / "captioner"), (rec.model, rec.captioning), name="mine")
    assert same.name == "mine"
    assert [r.caption for r in same.caption_batch(_requests(3))] == [r.caption for r in results]

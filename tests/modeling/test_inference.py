"""Batched generation: left padding, request order, per-item errors, decoding options."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sharegpt4v.modeling.inference import InferenceEngine
from sharegpt4v.modeling.templates import generation_prompt
from tests.modeling.fixtures import recipe, tiny_model, world


def _engine(seed: int = 0, **kw: Any) -> InferenceEngine:
    model, processor = tiny_model(seed)
    return InferenceEngine(model, processor, recipe().model, recipe().captioning, **kw)


def _requests(n: int) -> tuple[list[bytes], list[str]]:
    samples = world(n)
    # Questions of different lengths: the batch needs real left padding.
    prompts = [generation_prompt("vicuna_v1", s.metadata["vqa"][i % 3]["question"] + " Why?" * (i % 4)) for i, s in enumerate(samples)]
    return [s.image for s in samples], prompts


def test_batched_greedy_equals_one_at_a_time_in_request_order() -> None:
    engine = _engine()
    images, prompts = _requests(10)
    assert len({len(engine.encode_prompt(p)) for p in prompts}) > 2
    batch_lengths: list[list[int]] = []
    original = engine._generate_batch

    def spy(batch: list[list[int]], pixels: torch.Tensor, options: dict[str, Any]) -> Any:
        batch_lengths.append([len(ids) for ids in batch])
        return original(batch, pixels, options)

    engine._generate_batch = spy  # type: ignore[method-assign]
    batched = engine.generate(images, prompts, max_new_tokens=12, batch_size=4)
    assert [len(b) for b in batch_lengths] == [4, 4, 2]
    flat = [n for b in batch_lengths for n in b]
    assert flat == sorted(flat)  # length-aware: micro-batches hold neighbouring lengths
    single = [engine.generate([im], [p], max_new_tokens=12)[0] for im, p in zip(images, prompts)]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.prompt_tokens for g in batched] == [len(engine.encode_prompt(p)) for p in prompts]
    assert [g.completion_tokens for g in batched] == [g.completion_tokens for g in single]
    assert all(g.finish_reason in ("stop", "length") and g.seconds > 0 for g in batched)
    assert all(g.completion_tokens <= 12 for g in batched)
    assert any(g.text for g in batched)


def test_bad_image_and_bad_prompt_are_per_item_errors() -> None:
    engine = _engine()
    images, prompts = _requests(5)
    images[1] = b"definitely not a png"
    prompts[3] = "no image placeholder here"
    out = engine.generate(images, prompts, max_new_tokens=6, batch_size=2)
    assert [g.finish_reason == "error" for g in out] == [False, True, False, True, False]
    assert out[1].error == "bad_image" and "not a decodable image" in (out[1].detail or "")
    assert out[3].error == "bad_prompt" and "exactly one <image>" in (out[3].detail or "")
    alone = [engine.generate([images[i]], [prompts[i]], max_new_tokens=6)[0].text for i in (0, 2, 4)]
    assert [out[i].text for i in (0, 2, 4)] == alone
    assert engine.generate([images[1]], [prompts[1]])[0].error == "bad_image"  # a batch of only bad images
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        engine.generate(images[:2], prompts[:1])


def test_stop_at_eos_and_finish_reasons() -> None:
    engine = _engine()
    images, prompts = _requests(3)
    hidden = engine.model.config.text_config.hidden_size
    head = torch.nn.Linear(hidden, engine.model.lm_head.out_features, bias=True)
    with torch.no_grad():  # a head that always says </s>
        head.weight.zero_()
        head.bias.zero_()
        head.bias[engine.eos_id] = 1.0
    engine.model.lm_head = head
    out = engine.generate(images, prompts, max_new_tokens=8)
    assert all(g.finish_reason == "stop" and g.completion_tokens == 1 and g.text == "" for g in out)
    forced = engine.generate(images, prompts, max_new_tokens=5, min_new_tokens=5)
    assert all(g.finish_reason == "length" and g.completion_tokens == 5 for g in forced)


def test_beam_search_sampling_and_repetition_penalty_run() -> None:
    engine = _engine()
    images, prompts = _requests(3)
    beams = engine.generate(images, prompts, max_new_tokens=6, num_beams=3)
    assert len(beams) == 3 and all(g.finish_reason != "error" for g in beams)
    torch.manual_seed(0)
    a = engine.generate(images, prompts, max_new_tokens=6, do_sample=True, temperature=1.5)
    torch.manual_seed(0)
    b = engine.generate(images, prompts, max_new_tokens=6, do_sample=True, temperature=1.5)
    assert [g.text for g in a] == [g.text for g in b]
    penalised = engine.generate(images, prompts, max_new_tokens=6, repetition_penalty=1.3)
    assert all(g.completion_tokens > 0 for g in penalised)


def test_engine_checks_the_model_against_the_config() -> None:
    model, processor = tiny_model()
    cfg = recipe().model
    wrong = type(cfg)(vision=type(cfg.vision)(image_size=64, patch_size=8), image_tokens=64)
    with pytest.raises(ValueError, match="image_tokens"):
        InferenceEngine(model, processor, wrong, recipe().captioning)


def test_streamed_text_waits_for_whole_characters_and_flushes_a_cut_one_at_the_end() -> None:
    from sharegpt4v.modeling.inference import _RowStreamer
    from tests.modeling.fixtures import tokenizer

    tok = tokenizer()
    ids = tok("red é", add_special_tokens=False)["input_ids"]  # "é" is two byte tokens here
    assert tok.decode(ids[:-1]).endswith("\ufffd")
    for cut, whole in ((len(ids), "red é"), (len(ids) - 1, tok.decode(ids[:-1]).strip())):
        pieces: list[str] = []
        streamer = _RowStreamer(tok, [0], eos_id=-1, on_text=lambda row, text: pieces.append(text))
        streamer.put(torch.tensor([[1]]))  # the prompt
        for token in ids[:cut]:
            streamer.put(torch.tensor([[token]]))
        assert "\ufffd" not in "".join(pieces)  # half a character is never sent mid-stream
        streamer.end()
        assert "".join(pieces) == whole  # what the whole answer says, cut character included

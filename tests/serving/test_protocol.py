"""Request checks of the served models, without Triton or a model: each bad input names its problem."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from sharegpt4v.serving.protocol import (
    RequestError,
    ServingOptions,
    check_max_tokens,
    check_temperature,
    decode_image,
    parse_messages,
    prepare_rows,
)
from tests.modeling.fixtures import png

IMAGE = png((20, 12), (200, 30, 30))
CAPTION = ServingOptions(task="caption", default_prompt="Describe this image.", max_tokens_limit=64, max_new_tokens=16,
                         max_prompt_chars=100, max_image_bytes=10_000)
CHAT = ServingOptions(task="chat", max_tokens_limit=64, max_new_tokens=16, max_prompt_chars=100, max_image_bytes=10_000)


def col(*values: object, dtype: object = object) -> np.ndarray:
    return np.array(values, dtype=dtype).reshape(-1, 1)


def test_image_raw_bytes_base64_and_data_url_decode_to_the_same_picture() -> None:
    b64 = base64.b64encode(IMAGE)
    for data in (IMAGE, b64, b"data:image/png;base64," + b64, base64.urlsafe_b64encode(IMAGE), b64 + b"\n"):
        image = decode_image(data, 10_000)
        assert image.size == (20, 12) and image.getpixel((0, 0)) == (200, 30, 30)
    plain_ppm = b"P3\n2 1\n255\n200 30 30  0 0 255\n"  # an image format that is text itself
    assert decode_image(plain_ppm, 10_000).getpixel((1, 0)) == (0, 0, 255)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "image: empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00garbage", "image: bytes are not a decodable image"),
        (b"\xff\xd8\xff\xe0 truncated jpeg", "image: bytes are not a decodable image"),
        (b"hello world!", "not image bytes, and not base64 either"),
        (b"aGVsbG8", "not image bytes, and not valid base64 either (Incorrect padding)"),
        (base64.b64encode(b"a text file, not a picture"), "image: base64 text decodes to bytes that are not a decodable image"),
        (b"\x89PNG" + b"\x00" * 20_000, "image: 20004 bytes is over the limit of 10000 bytes"),
    ],
)
def test_bad_images_are_refused_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(RequestError, match="^image: ") as err:
        decode_image(data, 10_000)
    assert message in str(err.value)
    assert "0x" not in str(err.value)  # no object addresses in what a client reads


def test_messages_accept_a_question_or_alternating_turns() -> None:
    assert parse_messages(json.dumps("What is red?").encode(), 100) == [("user", "What is red?")]
    turns = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": " c? "}]
    assert parse_messages(json.dumps(turns).encode(), 100) == [("user", "a?"), ("assistant", "b"), ("user", "c?")]
    assert parse_messages(json.dumps({"messages": turns[:1]}).encode(), 100) == [("user", "a?")]


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "messages: empty"),
        (b"[]", "messages: empty list"),
        (b"{not json", "messages: not valid JSON"),
        (b"\xff\xfe", "messages: not UTF-8 text"),
        (b"42", "messages: expected a list"),
        (json.dumps([{"role": "user", "content": "  "}]).encode(), "messages[0].content: empty"),
        (json.dumps([{"role": "assistant", "content": "hi"}]).encode(), "messages[0].role: expected 'user'"),
        (json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]).encode(),
         "messages[1].role: expected 'assistant'"),
        (json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]).encode(),
         "the last message must be the user's"),
        (json.dumps([{"role": "user", "content": "<image> what?"}]).encode(), "must not contain <image>"),
        (json.dumps([{"role": "user"}]).encode(), "messages[0]: expected an object with a string 'content'"),
        (json.dumps("x" * 101).encode(), "messages: 101 characters in total is over the limit of 100"),
    ],
)
def test_bad_messages_are_refused_with_the_reason(raw: bytes, message: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_messages(raw, 100)
    assert message in str(err.value)


def test_generation_settings_out_of_range() -> None:
    assert check_max_tokens(np.int32(64), 64) == 64 and check_temperature(np.float32(0.5)) == 0.5
    for value in (0, -3, 65):
        with pytest.raises(RequestError, match=rf"max_tokens: {value} is out of range \(1\.\.64\)"):
            check_max_tokens(value, 64)
    for value in (-0.1, 2.5, float("nan"), float("inf")):
        with pytest.raises(RequestError, match="temperature: .* is out of range"):
            check_temperature(value)
    # a near-zero temperature overflows the logits (NaN probabilities, a failed batch): it samples greedily
    assert check_temperature(np.float32(1e-45)) == 0.0 and check_temperature(1e-5) == 1e-5


def test_prepare_rows_defaults_and_overrides() -> None:
    rows = prepare_rows({"image": col(IMAGE), "prompt": None, "max_tokens": None, "temperature": None}, CAPTION)
    assert len(rows) == 1 and rows[0].turns == [("user", "Describe this image.")]
    assert (rows[0].max_tokens, rows[0].temperature) == (16, 0.0)
    rows = prepare_rows({"image": col(IMAGE, IMAGE), "prompt": col(b"Name the shapes.", b"Count them."),
                         "max_tokens": col(4, 9, dtype=np.int32), "temperature": col(0.0, 0.7, dtype=np.float32)}, CAPTION)
    assert [r.turns[0][1] for r in rows] == ["Name the shapes.", "Count them."]
    assert [r.max_tokens for r in rows] == [4, 9] and rows[1].temperature == pytest.approx(0.7)


@pytest.mark.parametrize(
    "inputs, options, message",
    [
        ({"image": col(IMAGE, IMAGE).reshape(1, 2)}, CAPTION, "image: wrong shape [1, 2]; expected [batch, 1]"),
        ({"image": np.array([[[IMAGE]]], dtype=object)}, CAPTION, "image: wrong shape [1, 1, 1]"),
        ({"image": np.zeros((0, 1), dtype=object)}, CAPTION, "image: wrong shape [0, 1]; no value"),
        ({"image": col(IMAGE), "max_tokens": col(4, 5, dtype=np.int32)}, CAPTION,
         "max_tokens: wrong shape [2, 1]; the request's image input has 1 rows"),
        ({"image": col(IMAGE)}, CHAT, "messages: missing"),
        ({"image": None, "messages": col(b'"hi"')}, CHAT, "image: missing"),
        ({"image": col(IMAGE), "prompt": col(b"")}, CAPTION, "prompt: empty"),
        ({"image": col(IMAGE), "prompt": col(b"x" * 101)}, CAPTION, "prompt: 101 characters is over the limit of 100"),
        ({"image": col(IMAGE), "prompt": col(b"two <image> here")}, CAPTION, "prompt: must not contain <image>"),
        ({"image": col(IMAGE), "messages": col(b'"hi"')}, CAPTION, "messages: not an input of this model"),
        ({"image": col(IMAGE, b"junk\x00"), "prompt": None}, CAPTION, "row 1: image: bytes are not a decodable image"),
        ({"image": col(IMAGE), "max_tokens": col(0, dtype=np.int32)}, CAPTION, "max_tokens: 0 is out of range"),
    ],
)
def test_prepare_rows_refuses_bad_requests(inputs: dict, options: ServingOptions, message: str) -> None:
    with pytest.raises(RequestError) as err:
        prepare_rows(inputs, options)
    assert message in str(err.value)


def test_options_round_trip_through_config_parameters() -> None:
    params = {k: {"string_value": v} for k, v in CAPTION.to_parameters().items()}
    params["lineage.version"] = {"string_value": "3"}  # other parameters are ignored
    assert ServingOptions.from_parameters(params) == CAPTION
    with pytest.raises(ValueError, match="parameter max_new_tokens: 'many' is not a int"):
        ServingOptions.from_parameters({"task": "chat", "max_new_tokens": "many"})
    with pytest.raises(ValueError, match="task: unknown 'translate'"):
        ServingOptions.from_parameters({"task": "translate"})

"""What a served model accepts and answers, and the checks every request goes through.

Pure Python + numpy + Pillow: no Triton, no torch. The Triton adapter (`triton_model`)
hand each request's input arrays to :func:`prepare_rows`; a request that fails a check gets
its own error response (the message names the input and the problem), the rest of the batch
is served.

Tensors (every input is `[batch, 1]` in a request; `batch` rows per request, usually 1):
- `image` BYTES: an encoded image (PNG, JPEG, ...) as raw bytes, or base64 text (a
  `data:image/...;base64,` URL too).
- captioner: `prompt` BYTES, optional: the instruction as UTF-8 text (default: the fixed
  captioning instruction the captioner was trained with).
- chat: `messages` BYTES: JSON, a list of `{"role": "user"|"assistant", "content": "..."}`
  alternating and ending with a user turn, or a JSON string (one user question).
- `max_tokens` INT32, optional: 1..`max_tokens_limit`; `temperature` FP32, optional: 0..2
  (0 = greedy; below 1e-5 counts as 0).
Outputs, `[batch, 1]` each: `text` BYTES, `finish_reason` BYTES (stop / length),
`prompt_tokens` INT32, `completion_tokens` INT32. The decoupled `chat_stream` model sends
`text` pieces as they are generated, then a last response with `finish_reason` and the counts.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
Task = Literal["caption", "chat"]
TASKS: tuple[str, ...] = ("caption", "chat")
MAX_TEMPERATURE = 2.0
# Below this a temperature samples greedily, as vLLM does (its _SAMPLING_EPS): logits divided by a
# near-zero temperature overflow to inf and sampling fails on NaN probabilities (a 500 for the batch).
MIN_SAMPLING_TEMPERATURE = 1e-5


class RequestError(ValueError):
    """One request cannot be served; the message names the input and what is wrong with it."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: Literal["TYPE_STRING", "TYPE_INT32", "TYPE_FP32"]
    optional: bool = False

    @property
    def client_dtype(self) -> str:
        """The datatype name the V2 protocol and tritonclient use."""
        return {"TYPE_STRING": "BYTES", "TYPE_INT32": "INT32", "TYPE_FP32": "FP32"}[self.dtype]


_COMMON_TAIL = (TensorSpec("max_tokens", "TYPE_INT32", True), TensorSpec("temperature", "TYPE_FP32", True))
INPUTS: dict[str, tuple[TensorSpec, ...]] = {
    "caption": (TensorSpec("image", "TYPE_STRING"), TensorSpec("prompt", "TYPE_STRING", True), *_COMMON_TAIL),
    "chat": (TensorSpec("image", "TYPE_STRING"), TensorSpec("messages", "TYPE_STRING"), *_COMMON_TAIL),
}
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text", "TYPE_STRING"),
    TensorSpec("finish_reason", "TYPE_STRING"),
    TensorSpec("prompt_tokens", "TYPE_INT32"),
    TensorSpec("completion_tokens", "TYPE_INT32"),
)


@dataclass(frozen=True)
class ServingOptions:
    """A served model's settings: `parameters` in its config.pbtxt (strings there), parsed once at load."""

    task: Task
    weights: str = "weights"  # the checkpoint folder, relative to the model's version folder
    template: str = "vicuna_v1"
    image_aspect: Literal["pad", "crop"] = "pad"
    default_prompt: str = ""  # captioner: the instruction used when a request sends no prompt
    max_new_tokens: int = 64
    max_tokens_limit: int = 256
    temperature: float = 0.0
    repetition_penalty: float = 1.0
    max_prompt_chars: int = 4000
    max_image_bytes: int = 20_000_000
    batch_size: int = 8  # rows per generate call (the model's max_batch_size)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: unknown {self.task!r} (known: {', '.join(TASKS)})")
        if not 1 <= self.max_new_tokens <= self.max_tokens_limit:
            raise ValueError(f"max_new_tokens: {self.max_new_tokens} is not within 1..max_tokens_limit={self.max_tokens_limit}")
        if self.task == "caption" and not self.default_prompt:
            raise ValueError("default_prompt: the captioner needs its instruction")

    def to_parameters(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> "ServingOptions":
        """From config.pbtxt `parameters` (plain strings, or Triton's `{"string_value": ...}` form); unknown keys are ignored."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in parameters:
                continue
            raw = parameters[f.name]
            raw = raw.get("string_value", "") if isinstance(raw, dict) else str(raw)
            kind = type(f.default) if f.default is not dataclasses.MISSING else str
            try:
                values[f.name] = kind(raw)
            except ValueError:
                raise ValueError(f"parameter {f.name}: {raw!r} is not a {kind.__name__}") from None
        if "task" not in values:
            raise ValueError("parameter task: missing (caption or chat)")
        return cls(**values)


@dataclass
class Row:
    """One validated request row, ready for the engine."""

    image: Any  # PIL.Image.Image
    turns: list[tuple[str, str]]  # (role, text); the last one is the user's
    max_tokens: int
    temperature: float


# images ---------------------------------------------------------------------------------------

_B64_TEXT = re.compile(rb"[A-Za-z0-9+/=_\-\s]*")
_DATA_URL = re.compile(rb"^data:[\w/+.-]*;base64,")


def _looks_like_text(data: bytes) -> bool:
    """Base64 is printable ASCII; encoded images start with binary signatures (PNG, JPEG, GIF, WebP...)."""
    return all(32 <= b < 127 or b in (9, 10, 13) for b in data[:4096])


def _base64(data: bytes) -> bytes:
    text = _DATA_URL.sub(b"", data.strip(), count=1)
    if not _B64_TEXT.fullmatch(text):
        raise RequestError("image: not image bytes, and not base64 either (characters outside the base64 alphabet)")
    text = re.sub(rb"\s", b"", text)
    try:
        decoded = base64.b64decode(text, altchars=b"-_" if b"-" in text or b"_" in text else None, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"image: not image bytes, and not valid base64 either ({exc})") from None
    if not decoded:
        raise RequestError("image: base64 text decodes to no bytes")
    return decoded


def decode_image(data: bytes, max_bytes: int) -> Any:
    """Raw image bytes or base64 -> an RGB PIL image; RequestError naming what is wrong otherwise."""
    from sharegpt4v.modeling.images import load_image

    if not data:
        raise RequestError("image: empty")
    if len(data) > max_bytes * 4 // 3 + 4:
        raise RequestError(f"image: {len(data)} bytes is over the limit of {max_bytes} bytes")
    source = "bytes are"
    if _looks_like_text(data):
        try:
            data, source = _base64(data), "base64 text decodes to bytes that are"
        except RequestError as not_base64:
            if len(data) > max_bytes:
                raise RequestError(f"image: {len(data)} bytes is over the limit of {max_bytes} bytes") from None
            try:  # a few image formats are text themselves (plain PPM/PGM)
                return load_image(data)
            except ValueError:
                raise not_base64 from None
    if len(data) > max_bytes:
        raise RequestError(f"image: {len(data)} bytes is over the limit of {max_bytes} bytes")
    try:
        return load_image(data)
    except ValueError as exc:
        detail = re.sub(r"cannot identify image file <[^>]*>", "unknown image format", str(exc).removeprefix("not a decodable image "))
        raise RequestError(f"image: {source} not a decodable image {detail}") from None


# text -----------------------------------------------------------------------------------------


def _utf8(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _check_text(name: str, text: str) -> str:
    if not text.strip():
        raise RequestError(f"{name}: empty")
    if IMAGE_PLACEHOLDER in text:
        raise RequestError(f"{name}: must not contain {IMAGE_PLACEHOLDER}; the image goes in the image input")
    return text.strip()


def parse_prompt(data: bytes, max_chars: int) -> str:
    text = _check_text("prompt", _utf8("prompt", data))
    if len(text) > max_chars:
        raise RequestError(f"prompt: {len(text)} characters is over the limit of {max_chars}")
    return text


def parse_messages(data: bytes, max_chars: int) -> list[tuple[str, str]]:
    """JSON chat messages -> (role, text) turns, user/assistant alternating, ending with the user."""
    text = _utf8("messages", data)
    if not text.strip():
        raise RequestError("messages: empty")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"messages: not valid JSON ({exc.msg} at character {exc.pos})") from None
    if isinstance(value, dict) and "messages" in value:
        value = value["messages"]
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise RequestError(f"messages: expected a list of {{role, content}} objects, got {type(value).__name__}")
    if not value:
        raise RequestError("messages: empty list; send at least one user message")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RequestError(f"messages[{i}]: expected an object with a string 'content'")
        role = message.get("role")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise RequestError(f"messages[{i}].role: expected {expected!r} (user and assistant alternate), got {role!r}")
        turns.append((role, _check_text(f"messages[{i}].content", message["content"])))
    if turns[-1][0] != "user":
        raise RequestError("messages: the last message must be the user's")
    total = sum(len(t) for _, t in turns)
    if total > max_chars:
        raise RequestError(f"messages: {total} characters in total is over the limit of {max_chars}")
    return turns


# numbers --------------------------------------------------------------------------------------


def check_max_tokens(value: Any, limit: int) -> int:
    number = int(value)
    if not 1 <= number <= limit:
        raise RequestError(f"max_tokens: {number} is out of range (1..{limit})")
    return number


def check_temperature(value: Any) -> float:
    number = float(value)
    if not (math.isfinite(number) and 0.0 <= number <= MAX_TEMPERATURE):
        raise RequestError(f"temperature: {number} is out of range (0..{MAX_TEMPERATURE:g}; 0 = greedy)")
    return number if number >= MIN_SAMPLING_TEMPERATURE else 0.0


# requests -------------------------------------------------------------------------------------


def _column(name: str, array: Any, rows: int | None) -> np.ndarray:
    """A request input as a 1-D array of `rows` values; it must be [rows, 1] (or [rows])."""
    array = np.asarray(array)
    shape = tuple(array.shape)
    if array.ndim == 2 and shape[1] == 1:
        array = array[:, 0]
    elif array.ndim != 1:
        raise RequestError(f"{name}: wrong shape {list(shape)}; expected [batch, 1]: one value per row")
    if array.shape[0] == 0:
        raise RequestError(f"{name}: wrong shape {list(shape)}; no value")
    if rows is not None and array.shape[0] != rows:
        raise RequestError(f"{name}: wrong shape {list(shape)}; the request's image input has {rows} rows")
    return array


def _as_bytes(name: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise RequestError(f"{name}: expected BYTES, got {type(value).__name__}")


def prepare_rows(inputs: dict[str, Any], options: ServingOptions) -> list[Row]:
    """Check one request's inputs (name -> array, None when not sent); RequestError on the first problem.

    A request with several rows fails as a whole; the message names the row.
    """
    known = {spec.name for spec in INPUTS[options.task]}
    unknown = sorted(k for k, v in inputs.items() if v is not None and k not in known)
    if unknown:
        raise RequestError(f"{', '.join(unknown)}: not an input of this model (inputs: {', '.join(sorted(known))})")
    for spec in INPUTS[options.task]:
        if not spec.optional and inputs.get(spec.name) is None:
            raise RequestError(f"{spec.name}: missing (a required input)")
    images = _column("image", inputs["image"], None)
    n = images.shape[0]
    columns = {name: _column(name, inputs[name], n) for name in known if inputs.get(name) is not None and name != "image"}
    rows = []
    for i in range(n):
        try:
            rows.append(_row(i, images, columns, options))
        except RequestError as exc:
            raise RequestError(f"row {i}: {exc}" if n > 1 else str(exc)) from None
    return rows


def _row(i: int, images: np.ndarray, columns: dict[str, np.ndarray], options: ServingOptions) -> Row:
    if options.task == "chat":
        turns = parse_messages(_as_bytes("messages", columns["messages"][i]), options.max_prompt_chars)
    elif "prompt" in columns:
        turns = [("user", parse_prompt(_as_bytes("prompt", columns["prompt"][i]), options.max_prompt_chars))]
    else:
        turns = [("user", options.default_prompt)]
    max_tokens = options.max_new_tokens
    if "max_tokens" in columns:
        max_tokens = check_max_tokens(columns["max_tokens"][i], options.max_tokens_limit)
    temperature = options.temperature
    if "temperature" in columns:
        temperature = check_temperature(columns["temperature"][i])
    image = decode_image(_as_bytes("image", images[i]), options.max_image_bytes)
    return Row(image, turns, max_tokens, temperature)

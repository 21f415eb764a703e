"""The serving core behind the Triton models: validated requests in, outputs or one error per request out.

It wraps the same batched `InferenceEngine` the captioning jobs use (no generation code of
its own): the rows of every request Triton batched together are grouped by their generation
settings and generated together; a request that fails a check gets its error, the others
their answers. Streaming (the decoupled `chat_stream` model) uses the engine's `on_text` hook.

Two kinds of failure: a bad request (a `RequestError`: the client's fault) becomes that request's
`Reply.error`, which the adapter sends as Triton's INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT)
with the message; anything else raises out of `infer`/`stream` and is an internal failure of the
batch: the adapter logs it with each request's id (`request_ids`, `internal_failure`) and answers
INTERNAL (HTTP 500) with a message that carries the id and nothing of the exception.
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sharegpt4v.serving.protocol import INPUTS, RequestError, Row, ServingOptions, prepare_rows

Inputs = dict[str, Any]  # input name -> array as Triton gives it ([batch, 1]); None when not sent
Outputs = dict[str, np.ndarray]


@dataclass
class Reply:
    """The answer to one request: `outputs` ([rows, 1] arrays by output name), or an `error` message.

    `error` is always a bad request (the client's fault, named in the message); failures of the
    server raise instead.
    """

    outputs: Outputs | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _column(values: list[Any], dtype: Any) -> np.ndarray:
    if dtype is object:
        return np.array([v.encode("utf-8") for v in values], dtype=object).reshape(-1, 1)
    return np.array(values, dtype=dtype).reshape(-1, 1)


def outputs_of(texts: list[str], finish: list[str], prompt_tokens: list[int], completion_tokens: list[int]) -> Outputs:
    return {
        "text": _column(texts, object),
        "finish_reason": _column(finish, object),
        "prompt_tokens": _column(prompt_tokens, np.int32),
        "completion_tokens": _column(completion_tokens, np.int32),
    }


def request_ids(given: Iterable[str | None]) -> list[str]:
    """Each request's id for the server log and its error message: the client's own (`id` in an HTTP
    request, `request_id` in tritonclient) when it is short printable text, else a new short one."""
    return [g if g and len(g) <= 128 and g.isprintable() else uuid.uuid4().hex[:12] for g in given]


def internal_failure(exc: BaseException, ids: list[str]) -> tuple[str, list[str]]:
    """An exception that failed a batch -> (the server log entry: the requests' ids and the traceback,
    one message per request for its client: its id, no exception text)."""
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    log = f"internal error (request id {', '.join(ids)}): {type(exc).__name__}: {exc}\n{trace}"
    return log, [f"internal error (request id {i}); see the server log" for i in ids]


def device_for(instance_kind: str, device_id: int | str = 0) -> str:
    """Triton's instance kind (GPU/CPU, from `model_instance_kind`) -> a torch device."""
    if str(instance_kind).upper().endswith("GPU"):
        return f"cuda:{int(device_id)}"
    return "cpu"


class ServingEngine:
    """Requests -> replies for one served model (`options.task`: caption or chat)."""

    def __init__(self, engine: Any, options: ServingOptions):
        self.engine = engine
        self.options = options
        text_config = engine.model.config.text_config
        self.context = int(getattr(text_config, "max_position_embeddings", 0) or 0)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in INPUTS[self.options.task])

    @classmethod
    def load(cls, version_dir: str | Path, parameters: dict[str, Any], device: str = "cpu") -> "ServingEngine":
        """Load the checkpoint named by the `weights` parameter (relative to the model's version folder)."""
        from sharegpt4v.config import CaptioningConfig
        from sharegpt4v.modeling.builder import load_model
        from sharegpt4v.modeling.inference import InferenceEngine

        options = ServingOptions.from_parameters(parameters)
        weights = (Path(version_dir) / options.weights).resolve()
        model, processor = load_model(str(weights), device=device)
        generation = CaptioningConfig(
            batch_size=options.batch_size,
            max_new_tokens=options.max_new_tokens,
            do_sample=options.temperature > 0,
            temperature=options.temperature if options.temperature > 0 else 1.0,
            repetition_penalty=options.repetition_penalty,
        )
        engine = InferenceEngine(model, processor, None, generation, device=device, aspect=options.image_aspect)
        return cls(engine, options)

    # requests -> prompts ------------------------------------------------------------------------

    def prompt(self, row: Row) -> str:
        from sharegpt4v.modeling.templates import chat_generation_prompt

        return chat_generation_prompt(self.options.template, row.turns)

    def prepare(self, inputs: Inputs) -> list[tuple[Row, str]]:
        """Check a request and build its prompts; RequestError names the problem."""
        rows = prepare_rows(inputs, self.options)
        out = []
        for i, row in enumerate(rows):
            prompt = self.prompt(row)
            try:
                tokens = len(self.engine.encode_prompt(prompt))
            except ValueError as exc:
                raise RequestError(f"prompt: {exc}") from None
            if self.context and tokens + row.max_tokens > self.context:
                where = f"row {i}: " if len(rows) > 1 else ""
                name = "messages" if self.options.task == "chat" else "prompt"
                raise RequestError(
                    f"{where}{name}: too long: {tokens} prompt tokens (image included) + max_tokens {row.max_tokens} "
                    f"exceed the model's context of {self.context} tokens"
                )
            out.append((row, prompt))
        return out

    # batched inference -----------------------------------------------------------------------

    def _generate(self, items: list[tuple[int, Row, str]], on_text: Callable[[int, str], None] | None = None) -> dict[int, Any]:
        """Generations for (key, row, prompt) items, keyed back; rows with equal settings share calls."""
        groups: dict[tuple[int, float], list[tuple[int, Row, str]]] = {}
        for item in items:
            groups.setdefault((item[1].max_tokens, item[1].temperature), []).append(item)
        results: dict[int, Any] = {}
        for (max_tokens, temperature), group in groups.items():
            keys = [key for key, _, _ in group]
            relay = None
            if on_text is not None:
                relay = lambda index, text, keys=keys: on_text(keys[index], text)  # noqa: E731
            generations = self.engine.generate(
                [row.image for _, row, _ in group],
                [prompt for _, _, prompt in group],
                max_new_tokens=max_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                batch_size=self.options.batch_size,
                on_text=relay,
            )
            results.update(zip(keys, generations))
        return results

    def infer(self, requests: list[Inputs]) -> list[Reply]:
        """One Reply per request, in order: outputs with one row per request row, or an error."""
        replies: list[Reply] = [Reply() for _ in requests]
        items: list[tuple[int, Row, str]] = []
        owner: dict[int, tuple[int, int]] = {}  # item key -> (request, row)
        for r, inputs in enumerate(requests):
            try:
                prepared = self.prepare(inputs)
            except RequestError as exc:
                replies[r].error = str(exc)
                continue
            for i, (row, prompt) in enumerate(prepared):
                owner[len(items)] = (r, i)
                items.append((len(items), row, prompt))
        generations = self._generate(items) if items else {}
        per_request: dict[int, list[Any]] = {}
        for key, (r, _) in owner.items():
            per_request.setdefault(r, []).append(generations[key])
        for r, gens in per_request.items():
            failed = next((g for g in gens if g.finish_reason == "error"), None)
            if failed is not None:  # checked before generating; kept for images the engine still refuses
                replies[r].error = f"{failed.error}: {failed.detail}"
                continue
            replies[r].outputs = outputs_of(
                [g.text for g in gens], [g.finish_reason for g in gens],
                [g.prompt_tokens for g in gens], [g.completion_tokens for g in gens],
            )
        return replies

    def stream(self, requests: list[Inputs], send: Callable[[int, Outputs], None]) -> list[Reply]:
        """Like `infer`, but each request's text is also sent in pieces as it is generated:
        `send(request_index, outputs)` with `text` the new piece and an empty `finish_reason`.
        The returned replies are the last responses: empty `text`, the finish reason and counts.
        One row per request (a stream is one conversation)."""
        replies: list[Reply] = [Reply() for _ in requests]
        items: list[tuple[int, Row, str]] = []
        for r, inputs in enumerate(requests):
            try:
                prepared = self.prepare(inputs)
                if len(prepared) != 1:
                    raise RequestError(f"image: {len(prepared)} rows; a streaming request carries one conversation")
            except RequestError as exc:
                replies[r].error = str(exc)
                continue
            items.append((r, *prepared[0]))

        def piece(r: int, text: str) -> None:
            send(r, outputs_of([text], [""], [0], [0]))

        generations = self._generate(items, on_text=piece) if items else {}
        for r, gen in generations.items():
            if gen.finish_reason == "error":
                replies[r].error = f"{gen.error}: {gen.detail}"
            else:
                replies[r].outputs = outputs_of([""], [gen.finish_reason], [gen.prompt_tokens], [gen.completion_tokens])
        return replies


def options_for(task: str, recipe: Any, weights: str = "weights", **overrides: Any) -> ServingOptions:
    """A served model's options from the recipe (`serving`, the stage's template and image aspect)."""
    from sharegpt4v.captioning.records import CAPTION_INSTRUCTION

    serving = recipe.serving
    stage = recipe.captioner if task == "caption" else recipe.sft
    values = dict(
        task=task,
        weights=weights,
        template=stage.template,
        image_aspect=stage.image_aspect,
        default_prompt=CAPTION_INSTRUCTION if task == "caption" else "",
        max_new_tokens=serving.max_new_tokens,
        max_tokens_limit=serving.max_tokens_limit,
        temperature=serving.temperature,
        repetition_penalty=recipe.captioning.repetition_penalty if task == "caption" else 1.0,
        max_prompt_chars=serving.max_prompt_chars,
        max_image_bytes=serving.max_image_bytes,
        batch_size=serving.max_batch_size,
    )
    values.update(overrides)
    return ServingOptions(**values)

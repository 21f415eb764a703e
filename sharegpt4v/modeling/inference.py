"""Batched LLaVA generation: the core shared by captioning and serving.

Requests are sorted by prompt length and cut into micro-batches of similar length (less
padding), left-padded, generated together, and returned in request order. A request whose
image does not decode gets an error result; the rest of its micro-batch still runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from sharegpt4v.modeling.builder import tokenizer_of
from sharegpt4v.modeling.images import Aspect, to_tensor
from sharegpt4v.modeling.templates import expand_image_tokens, image_token_id

# Streaming hook: called with (request index, new text) as tokens are generated.
OnText = Callable[[int, str], None]


class _RowStreamer(BaseStreamer):
    """Hands each row's new text to `on_text` while `model.generate` runs a micro-batch.

    `generate` puts the prompt ids first, then one token per row per step; a row that has
    finished gets padding. Text is decoded from all of a row's tokens so far and only the part
    not yet handed out is passed on (a token can be half of a character or join a word).
    """

    def __init__(self, tokenizer: Any, rows: list[int], eos_id: int, on_text: OnText):
        self.tokenizer, self.rows, self.eos_id, self.on_text = tokenizer, rows, eos_id, on_text
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.sent = [""] * len(rows)
        self.done = [False] * len(rows)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.rows), -1)[:, -1].tolist()):
            if self.done[row]:
                continue
            if token == self.eos_id:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                continue
            self._send(row, text)

    def end(self) -> None:
        """Flush what was held back: an answer cut inside a character (the token limit) ends with
        U+FFFD, as the whole answer does, so the pieces add up to it."""
        for row, tokens in enumerate(self.tokens):
            self._send(row, self.tokenizer.decode(tokens, skip_special_tokens=True))

    def _send(self, row: int, text: str) -> None:
        text = text.lstrip()
        if len(text) > len(self.sent[row]) and text.startswith(self.sent[row]):
            self.on_text(self.rows[row], text[len(self.sent[row]) :])
            self.sent[row] = text


@dataclass
class Generation:
    text: str
    prompt_tokens: int  # image positions included
    completion_tokens: int  # generated tokens, the final </s> included
    finish_reason: Literal["stop", "length", "error"]
    error: str | None = None  # short code when finish_reason == "error": bad_image, bad_prompt
    detail: str | None = None
    seconds: float = 0.0  # this request's share of its micro-batch's wall time


class InferenceEngine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_cfg: Any,
        captioning_cfg: Any,
        device: str | torch.device = "cpu",
        aspect: Aspect = "pad",
        dtype: torch.dtype | None = None,
    ):
        self.tokenizer = tokenizer_of(tokenizer)
        self.cfg = captioning_cfg
        self.aspect = aspect
        self.device = torch.device(device)
        if dtype is None and self.device.type == "cuda" and next(model.parameters()).dtype == torch.float32:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.model = model.to(self.device, dtype) if dtype is not None else model.to(self.device)
        self.model.eval()
        self.dtype = next(self.model.parameters()).dtype
        vision = self.model.config.vision_config
        # The loaded model is the source of truth; the config only has to agree.
        self.image_size = int(vision.image_size)
        self.image_tokens = (vision.image_size // vision.patch_size) ** 2
        if model_cfg is not None and model_cfg.image_tokens != self.image_tokens:
            raise ValueError(f"model.image_tokens: config says {model_cfg.image_tokens}, the model uses {self.image_tokens}")
        self.image_id = image_token_id(self.tokenizer)
        if self.image_id != self.model.config.image_token_id:
            raise ValueError(
                f"tokenizer's <image> id {self.image_id} != model's image_token_id {self.model.config.image_token_id}"
            )
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.eos_id = self.tokenizer.eos_token_id

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt ids with `<s>` and the image placeholder expanded; exactly one `<image>` required."""
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        count = ids.count(self.image_id)
        if count != 1:
            raise ValueError(f"prompt must contain exactly one <image> placeholder, found {count}")
        return expand_image_tokens(ids, self.image_id, self.image_tokens)

    @torch.inference_mode()
    def generate(
        self,
        images: list[bytes | Image.Image],
        prompts: list[str],
        max_new_tokens: int | None = None,
        *,
        min_new_tokens: int = 0,
        batch_size: int | None = None,
        num_beams: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        repetition_penalty: float | None = None,
        on_text: OnText | None = None,
    ) -> list[Generation]:
        """One Generation per (image, prompt), in request order. Unset options come from captioning_cfg.

        `on_text(index, text)` streams: it gets each request's new text while its micro-batch
        generates (greedy or sampling; not with beam search). The returned texts are complete.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        cfg = self.cfg
        batch_size = batch_size or cfg.batch_size
        options: dict[str, Any] = {
            "max_new_tokens": max_new_tokens or cfg.max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "num_beams": num_beams or cfg.num_beams,
            "do_sample": cfg.do_sample if do_sample is None else do_sample,
            "repetition_penalty": repetition_penalty or cfg.repetition_penalty,
            "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_id,
        }
        if options["do_sample"]:
            options["temperature"] = temperature or cfg.temperature
        else:  # greedy/beam: unset sampling knobs a checkpoint's generation_config may carry
            options.update(temperature=None, top_p=None, top_k=None)

        results: list[Generation | None] = [None] * len(prompts)
        encoded: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            try:
                encoded[i] = self.encode_prompt(prompt)
            except ValueError as exc:
                results[i] = Generation("", 0, 0, "error", "bad_prompt", str(exc))
        # Length-aware batching: similar prompt lengths share a micro-batch.
        order = sorted(encoded, key=lambda i: (len(encoded[i]), i))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            began = time.perf_counter()
            pixels, ready = [], []
            for i in chunk:
                try:
                    pixels.append(to_tensor(images[i], self.image_size, self.aspect))
                    ready.append(i)
                except ValueError as exc:
                    results[i] = Generation("", len(encoded[i]), 0, "error", "bad_image", str(exc))
            if not ready:
                continue
            batch_options = options
            if on_text is not None:  # model.generate hands each step's tokens to the streamer
                batch_options = {**options, "streamer": _RowStreamer(self.tokenizer, ready, self.eos_id, on_text)}
            outputs = self._generate_batch([encoded[i] for i in ready], torch.stack(pixels), batch_options)
            share = (time.perf_counter() - began) / len(ready)
            for i, generation in zip(ready, outputs):
                generation.seconds = share
                results[i] = generation
        return [r for r in results if r is not None]

    def _generate_batch(self, prompts: list[list[int]], pixels: torch.Tensor, options: dict[str, Any]) -> list[Generation]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends at the same column
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            pixel_values=pixels.to(self.device, self.dtype),
            **options,
        )
        generations = []
        for row, ids in enumerate(prompts):
            new = out[row, width:].tolist()
            finish: Literal["stop", "length"] = "length"
            if self.eos_id in new:  # what follows a row's </s> is padding
                new = new[: new.index(self.eos_id) + 1]
                finish = "stop"
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            generations.append(Generation(text, len(ids), len(new), finish))
        return generations

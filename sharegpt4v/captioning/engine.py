"""The local captioner (Share-Captioner): a LLaVA model behind the `Captioner` interface.

Backends: `transformers` (the batched `InferenceEngine`) or `vllm` (when the package is
installed). Both use the fixed `CAPTION_INSTRUCTION` in the `vicuna_v1` generation prompt.
A caption that hit `max_new_tokens` is still `ok` but carries `reason="truncated"` and a
`detail` line; an undecodable image is an error result with reason `bad_image`.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from sharegpt4v.captioning.records import (
    CAPTION_INSTRUCTION,
    CaptionRequest,
    CaptionResult,
)
from sharegpt4v.errors import PlatformError
from sharegpt4v.modeling.images import CLIP_MEAN, expand2square, load_image
from sharegpt4v.modeling.inference import Generation, InferenceEngine
from sharegpt4v.modeling.templates import generation_prompt

PROMPT_ID = "captioner-v1"
CAPTION_TEMPLATE = "vicuna_v1"


class BackendUnavailable(PlatformError):
    """The configured captioning backend cannot run here (e.g. its package is not installed)."""


def caption_prompt() -> str:
    return generation_prompt(CAPTION_TEMPLATE, CAPTION_INSTRUCTION)


def _result(request: CaptionRequest, gen: Generation, max_new_tokens: int) -> CaptionResult:
    counts = {"prompt_id": PROMPT_ID, "prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
              "seconds": gen.seconds}
    if gen.finish_reason == "error":
        return CaptionResult.error(request.id, gen.error or "error", gen.detail or "generation failed", **counts)
    if not gen.text:
        return CaptionResult.error(request.id, "empty", "the model produced no caption text", **counts)
    result = CaptionResult(id=request.id, status="ok", caption=gen.text, **counts)
    if gen.finish_reason == "length":
        result.reason = "truncated"
        result.detail = f"truncated at max_new_tokens={max_new_tokens}"
    return result


class LlavaCaptioner:
    """`Captioner` over the batched transformers engine."""

    def __init__(self, engine: InferenceEngine, name: str):
        self.engine = engine
        self.name = name
        self.prompt = caption_prompt()

    def caption_batch(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        generations = self.engine.generate([r.image for r in requests], [self.prompt] * len(requests))
        return [_result(r, g, self.engine.cfg.max_new_tokens) for r, g in zip(requests, generations)]


class VllmCaptioner:
    """`Captioner` over vLLM (continuous batching, paged KV cache). Not exercised by the tests here:
    vLLM is not installed on the development machines."""

    def __init__(self, model_dir: str, captioning_cfg: Any, name: str, aspect: str = "pad", dtype: str = "auto"):
        if captioning_cfg.num_beams > 1:
            raise ValueError("captioning.num_beams: the vllm backend runs greedy or sampling only; set num_beams=1")
        from vllm import LLM, SamplingParams

        self.name = name
        self.cfg = captioning_cfg
        self.aspect = aspect
        self.prompt = caption_prompt()  # vLLM expands the single <image> placeholder itself
        self.llm = LLM(model=model_dir, dtype=dtype, limit_mm_per_prompt={"image": 1})
        self.params = SamplingParams(
            max_tokens=captioning_cfg.max_new_tokens,
            temperature=captioning_cfg.temperature if captioning_cfg.do_sample else 0.0,
            repetition_penalty=captioning_cfg.repetition_penalty,
        )

    def caption_batch(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        results: list[CaptionResult | None] = [None] * len(requests)
        inputs, index = [], []
        for i, request in enumerate(requests):
            try:
                image = load_image(request.image)
            except ValueError as exc:
                results[i] = CaptionResult.error(request.id, "bad_image", str(exc), prompt_id=PROMPT_ID)
                continue
            if self.aspect == "pad":  # vLLM's HF processor crops; LLaVA-1.5 pads to a square
                image = expand2square(image, tuple(int(m * 255) for m in CLIP_MEAN))  # type: ignore[arg-type]
            inputs.append({"prompt": self.prompt, "multi_modal_data": {"image": image}})
            index.append(i)
        began = time.perf_counter()
        outputs = self.llm.generate(inputs, self.params, use_tqdm=False) if inputs else []
        share = (time.perf_counter() - began) / max(1, len(inputs))
        for i, out in zip(index, outputs):
            completion = out.outputs[0]
            gen = Generation(
                text=completion.text.strip(),
                prompt_tokens=len(out.prompt_token_ids or []),
                completion_tokens=len(completion.token_ids),
                finish_reason="length" if completion.finish_reason == "length" else "stop",
                seconds=share,
            )
            results[i] = _result(requests[i], gen, self.cfg.max_new_tokens)
        return [r for r in results if r is not None]


def _configs(recipe_or_cfgs: Any) -> tuple[Any, Any, str]:
    """(model_cfg, captioning_cfg, image_aspect) from a RecipeConfig or a (model_cfg, captioning_cfg) pair."""
    if isinstance(recipe_or_cfgs, tuple):
        model_cfg, captioning_cfg = recipe_or_cfgs
        return model_cfg, captioning_cfg, "pad"
    return recipe_or_cfgs.model, recipe_or_cfgs.captioning, recipe_or_cfgs.captioner.image_aspect


def make_captioner(model_uri: str, recipe_or_cfgs: Any, device: str = "cpu", name: str | None = None) -> Any:
    """A captioner for a checkpoint written by `save_model` (local folder or s3 prefix).

    The backend comes from `captioning.backend`; the default name pins the checkpoint's
    content (`llava:<uri>@<manifest digest>`), so records say exactly which model wrote them.
    """
    from sharegpt4v.modeling.builder import checkpoint_digest, load_model, materialize

    model_cfg, captioning_cfg, aspect = _configs(recipe_or_cfgs)
    if captioning_cfg.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise BackendUnavailable(
            "captioning.backend=vllm needs the 'vllm' package, which is not installed "
            "(install vllm on the GPU image, or set captioning.backend=transformers)"
        )
    name = name or f"llava:{model_uri}@{checkpoint_digest(model_uri)}"
    if captioning_cfg.backend == "vllm":
        folder = materialize(model_uri, require_manifest=True)
        return VllmCaptioner(str(folder), captioning_cfg, name, aspect)
    model, processor = load_model(model_uri, device=device)
    engine = InferenceEngine(model, processor, model_cfg, captioning_cfg, device=device, aspect=aspect)
    return LlavaCaptioner(engine, name)

"""The local captioner (Share-Captioner): a LLaVA model behind the `Captioner` interface.

Backends: `transformers` (the batched `InferenceEngine`, the portable fallback) or `vllm`
(`engines.vllm_client`, in the engine environment made by scripts/setup_engine.sh). Both use
the fixed `CAPTION_INSTRUCTION` in the `vicuna_v1` generation prompt.
A caption that hit `max_new_tokens` is still `ok` but carries `reason="truncated"` and a
`detail` line; an undecodable image is an error result with reason `bad_image`.
"""

from __future__ import annotations

import json
from typing import Any

from sharegpt4v.captioning.records import (
    CAPTION_INSTRUCTION,
    CaptionRequest,
    CaptionResult,
)
from sharegpt4v.modeling.images import square_image
from sharegpt4v.modeling.inference import Generation, InferenceEngine
from sharegpt4v.modeling.templates import generation_prompt

PROMPT_ID = "captioner-v1"
CAPTION_TEMPLATE = "vicuna_v1"


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
        self.min_new_tokens = 0  # benchmarks set it to max_new_tokens: equal work whatever the weights

    def caption_batch(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        generations = self.engine.generate(
            [r.image for r in requests], [self.prompt] * len(requests), min_new_tokens=self.min_new_tokens
        )
        return [_result(r, g, self.engine.cfg.max_new_tokens) for r, g in zip(requests, generations)]

    def close(self) -> None:
        """Nothing to stop: the model lives in this process (the vLLM captioner stops its engine)."""


class VllmCaptioner:
    """`Captioner` over vLLM (paged KV cache, continuous batching) in the engine environment.

    Same prompt and pixels as `LlavaCaptioner`: images are padded (or cropped) and resized here,
    the checkpoint's own dtype is used, and results carry the same reasons and token counts.
    """

    def __init__(self, engine: Any, captioning_cfg: Any, name: str, image_size: int, aspect: str = "pad"):
        if captioning_cfg.num_beams > 1:
            raise ValueError("captioning.num_beams: the vllm backend runs greedy or sampling only; set num_beams=1")
        self.engine, self.cfg, self.name = engine, captioning_cfg, name
        self.image_size, self.aspect = image_size, aspect
        self.prompt = caption_prompt()  # no BOS: vLLM adds it, as the platform's tokenizer does
        self.min_new_tokens = 0  # benchmarks set it to max_new_tokens: equal work whatever the weights

    def caption_batch(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        results: list[CaptionResult | None] = [None] * len(requests)
        images, index = [], []
        for i, request in enumerate(requests):
            try:
                images.append(square_image(request.image, self.image_size, self.aspect))  # type: ignore[arg-type]
            except ValueError as exc:
                results[i] = CaptionResult.error(request.id, "bad_image", str(exc), prompt_id=PROMPT_ID)
                continue
            index.append(i)
        cfg = self.cfg
        outputs, seconds = self.engine.generate(
            images, [self.prompt] * len(images), max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature if cfg.do_sample else 0.0, repetition_penalty=cfg.repetition_penalty,
            min_tokens=self.min_new_tokens,
        )
        share = seconds / max(1, len(images))
        for i, out in zip(index, outputs):
            gen = Generation(
                text=out["text"].strip(),
                prompt_tokens=out["prompt_tokens"],
                completion_tokens=out["completion_tokens"],
                finish_reason="length" if out["finish_reason"] == "length" else "stop",
                seconds=share,
            )
            results[i] = _result(requests[i], gen, cfg.max_new_tokens)
        return [r for r in results if r is not None]

    def close(self) -> None:
        self.engine.close()


def _configs(recipe_or_cfgs: Any) -> tuple[Any, Any, str]:
    """(model_cfg, captioning_cfg, image_aspect) from a RecipeConfig or a (model_cfg, captioning_cfg) pair."""
    if isinstance(recipe_or_cfgs, tuple):
        model_cfg, captioning_cfg = recipe_or_cfgs
        return model_cfg, captioning_cfg, "pad"
    return recipe_or_cfgs.model, recipe_or_cfgs.captioning, recipe_or_cfgs.captioner.image_aspect


def captioner_identity(checkpoint_digest: str, captioning_cfg: Any) -> dict[str, Any]:
    """What decides a model captioner's captions (a caption set records it): the weights, prompt and
    decoding; not the checkpoint's location, nor the backend that runs it."""
    return {"model": checkpoint_digest, "prompt": PROMPT_ID, "max_new_tokens": captioning_cfg.max_new_tokens,
            "num_beams": captioning_cfg.num_beams, "do_sample": captioning_cfg.do_sample,
            "temperature": captioning_cfg.temperature, "repetition_penalty": captioning_cfg.repetition_penalty}


def make_captioner(model_uri: str, recipe_or_cfgs: Any, device: str = "cpu", name: str | None = None) -> Any:
    """A captioner for a checkpoint written by `save_model` (local folder or s3 prefix).

    The backend comes from `captioning.backend`; the default name pins the checkpoint's
    content (`llava:<uri>@<manifest digest>`), so records say exactly which model wrote them.
    """
    from sharegpt4v.modeling.builder import checkpoint_digest, load_model, materialize

    model_cfg, captioning_cfg, aspect = _configs(recipe_or_cfgs)
    digest = checkpoint_digest(model_uri)
    name = name or f"llava:{model_uri}@{digest}"
    identity = captioner_identity(digest, captioning_cfg)
    if captioning_cfg.backend == "vllm":
        from sharegpt4v.engines.vllm_client import VllmEngine, engine_python
        from sharegpt4v.modeling.hf_layout import llava_hf_folder

        engine_python()  # a missing engine environment fails here, before anything is downloaded
        folder = llava_hf_folder(materialize(model_uri, require_manifest=True))
        image_size = json.loads((folder / "config.json").read_text())["vision_config"]["image_size"]
        captioner: Any = VllmCaptioner(VllmEngine(folder), captioning_cfg, name, int(image_size), aspect)
    else:
        model, processor = load_model(model_uri, device=device)
        engine = InferenceEngine(model, processor, model_cfg, captioning_cfg, device=device, aspect=aspect)
        captioner = LlavaCaptioner(engine, name)
    captioner.identity = identity
    return captioner

"""Registered model versions as MLflow models: a `pyfunc` over the stage's HF checkpoint.

Each registered version is an MLflow model (MLflow 3 `LoggedModel`) whose files are only its
description: the `MLmodel` file (signature: `image` + `prompt` in, text out; an input example),
the requirements and `pyfunc_model.py` ("models from code": no pickle). The weights stay where
training wrote them: `model_config["checkpoint"]` names the checkpoint folder or s3:// prefix, and
`load_context` loads it with the platform's loader (S3 credentials from the environment, the
download cached by `materialize`), so

    mlflow.pyfunc.load_model("models:/sharegpt4v-chat@champion").predict(
        pd.DataFrame([{"image": base64_png, "prompt": "What colour is the circle?"}]))

answers with the platform's own batched `InferenceEngine`, greedily, the prompt written in the
stage's template (`vicuna_v1`; `plain` for pretraining). An empty or missing prompt is the stage's
default instruction: the captioning instruction (`plain` models: no text, they continue after the
image). `mlflow models serve -m models:/sharegpt4v-chat@champion --env-manager local` serves it.

`model_config` keys can be overridden at load time (`load_model(uri, model_config={"device": "cpu"})`
or `$MLFLOW_PYFUNC_INFERENCE_CONFIG`): checkpoint, device ("auto": CUDA when there is one),
image_aspect ("auto": the checkpoint's own `do_pad`), max_new_tokens, batch_size.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

CODE_FILE = Path(__file__).with_name("pyfunc_model.py")  # the models-from-code entry MLflow copies
EXAMPLE_PROMPT = "What colour is the circle?"
# Registered model stage -> the recipe section that trained it ("base" is pretraining on brief captions).
STAGE_SECTION = {"base": "pretrain", "captioner": "captioner", "pretrain": "pretrain", "sft": "sft"}


def stage_model_config(stage: str, checkpoint: str) -> dict[str, Any]:
    """The `model_config` of a stage's MLflow model: where its weights are and how it is prompted."""
    from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
    from sharegpt4v.config import CaptioningConfig, RecipeConfig

    template = getattr(RecipeConfig(), STAGE_SECTION[stage]).template
    generation = CaptioningConfig()
    return {
        "checkpoint": checkpoint,
        "stage": stage,
        "template": template,
        # what the trainer's sample generations ask: `plain` models continue after the image
        "default_prompt": "" if template == "plain" else CAPTION_INSTRUCTION,
        "max_new_tokens": generation.max_new_tokens,
        "batch_size": generation.batch_size,
        "image_aspect": "auto",
        "device": "auto",
    }


def signature() -> Any:
    """`image` (base64 of PNG/JPEG bytes; raw bytes from Python) and optional `prompt` in, one text per row out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "prompt", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", None)]),  # None: model_config's
    )


def example_png(size: int = 64) -> bytes:
    """A small real PNG drawn here (no download): a red circle on white."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 30, 30))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def input_example() -> pd.DataFrame:
    return pd.DataFrame([{"image": base64.b64encode(example_png()).decode(), "prompt": EXAMPLE_PROMPT}])


def pip_requirements() -> list[str]:
    """The platform (which pins torch, transformers, ...) and the MLflow that wrote the model."""
    return [f"sharegpt4v=={metadata.version('sharegpt4v')}", f"mlflow=={mlflow.__version__}"]


def _bad_input(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # HTTP 400 from `mlflow models serve`


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def image_bytes(value: Any, row: int) -> Any:
    """A row's image: base64 text (a `data:` URL too), raw bytes, or a PIL image."""
    from PIL import Image

    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str) and value.strip():
        text = value.strip()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_input(f"row {row}: image: not base64 (send the PNG/JPEG file's bytes, base64-encoded)") from None
    raise _bad_input(f"row {row}: image: missing (base64 of a PNG/JPEG file)")


def rows_of(model_input: Any) -> list[dict[str, Any]]:
    """A DataFrame, a list of {"image", "prompt"} dicts or one such dict -> row dicts."""
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise _bad_input("input: needs an 'image' column (and optionally 'prompt')")
        return model_input.to_dict("records")
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return model_input
    raise _bad_input(f"input: expected a DataFrame or dicts with 'image' and 'prompt', got {type(model_input).__name__}")


class ShareGPT4VModel(PythonModel):
    """The pyfunc: loads the checkpoint named in `model_config` and answers rows of (image, prompt)."""

    def load_context(self, context: Any) -> None:
        import torch

        from sharegpt4v.config import CaptioningConfig
        from sharegpt4v.modeling.builder import load_model
        from sharegpt4v.modeling.inference import InferenceEngine

        config = dict(context.model_config or {})
        if not config.get("checkpoint"):
            raise _bad_input("model_config: no 'checkpoint' (the checkpoint folder or s3:// prefix)")
        device = str(config.get("device") or "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, processor = load_model(str(config["checkpoint"]), device=device)
        aspect = str(config.get("image_aspect") or "auto")
        if aspect == "auto":  # the processor the stage wrote: pad (SFT, captioner) or crop (pretraining)
            do_pad = getattr(getattr(processor, "image_processor", None), "do_pad", True)
            aspect = "crop" if do_pad is False else "pad"
        self.template = str(config.get("template") or "vicuna_v1")
        self.default_prompt = str(config.get("default_prompt") or "")
        self.max_new_tokens = int(config.get("max_new_tokens") or CaptioningConfig().max_new_tokens)
        generation = CaptioningConfig(batch_size=int(config.get("batch_size") or CaptioningConfig().batch_size),
                                      max_new_tokens=self.max_new_tokens, do_sample=False)
        self.engine = InferenceEngine(model, processor, None, generation, device=device, aspect=aspect)

    def prompt(self, text: Any) -> str:
        from sharegpt4v.modeling.templates import generation_prompt

        text = "" if _missing(text) else str(text).strip()
        return generation_prompt(self.template, text or self.default_prompt)

    # pd.DataFrame: a hint MLflow infers no signature from (ours is explicit); it hands list/dict input over as one
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """Rows of (image, prompt) -> one text per row, in order; a bad row fails the call naming it (HTTP 400)."""
        rows = rows_of(model_input)
        max_new_tokens = (params or {}).get("max_new_tokens") or self.max_new_tokens
        if int(max_new_tokens) < 1:
            raise _bad_input(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        images = [image_bytes(row.get("image"), i) for i, row in enumerate(rows)]
        prompts = [self.prompt(row.get("prompt")) for row in rows]
        generations = self.engine.generate(images, prompts, max_new_tokens=int(max_new_tokens), do_sample=False)
        for i, generation in enumerate(generations):
            if generation.finish_reason == "error":
                raise _bad_input(f"row {i}: {generation.error}: {generation.detail}")
        return [generation.text for generation in generations]


def log_checkpoint_model(client: Any, name: str, stage: str, checkpoint: str, run_id: str | None,
                         tags: dict[str, str], experiment_id: str) -> Any:
    """An MLflow 3 `LoggedModel` for the checkpoint, output of `run_id` when given: its files are the
    pyfunc's description only (see the module docstring); the weights stay at `checkpoint`.

    The input example is not run at logging time (MLflow's `log_model` would load the weights for
    it: minutes for a 7B model on a training node); the tests load and run registered versions.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags=tags,
                                        model_type="llava")
    try:
        with tempfile.TemporaryDirectory(prefix="sharegpt4v-pyfunc-") as tmp:
            path = Path(tmp) / "model"
            description = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                                model_id=logged.model_id)
            mlflow.pyfunc.save_model(
                path, python_model=str(CODE_FILE), model_config=stage_model_config(stage, checkpoint),
                signature=signature(), input_example=input_example(), pip_requirements=pip_requirements(),
                mlflow_model=description,
            )
            client.log_model_artifacts(logged.model_id, str(path))
        if run_id:
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)

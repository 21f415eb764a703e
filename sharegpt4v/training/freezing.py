"""What a stage trains: `requires_grad` per the stage's `train_llm` (`train_llm_embeddings`) / `train_projector` /
`vit_unfreeze_from`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sharegpt4v.config import StageConfig


LLM_PREFIXES = ("model.language_model.", "lm_head.")  # the language model's parameter names in HF's LLaVA


def vision_layers(model: Any) -> Any:
    tower = model.model.vision_tower
    encoder = tower.encoder if hasattr(tower, "encoder") else tower.vision_model.encoder
    return encoder.layers


def used_vision_layers(model: Any) -> int:
    """How many ViT layers feed the projector: with `vision_feature_layer = -2` all but the last."""
    n = len(vision_layers(model))
    layer = model.config.vision_feature_layer
    layer = layer[-1] if isinstance(layer, (list, tuple)) else layer  # several layers: the deepest counts
    return n + layer + 1 if layer < 0 else layer


def apply_freezing(model: Any, stage: "StageConfig") -> list[str]:
    """Set `requires_grad` per the stage; returns the trainable parameter names.

    LLM (+ lm_head) if `train_llm`, its input embeddings only if also `train_llm_embeddings`;
    projector if `train_projector`; ViT layers from `vit_unfreeze_from` up to the last one that feeds the projector (with feature layer -2 the
    last layer never gets a gradient and stays frozen: DDP/DeepSpeed fail on unused parameters).
    Embeddings and norms of the ViT stay frozen.
    """
    model.requires_grad_(False)
    if stage.train_llm:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        if not stage.train_llm_embeddings:
            model.get_input_embeddings().requires_grad_(False)
    if stage.train_projector:
        model.model.multi_modal_projector.requires_grad_(True)
    if stage.vit_unfreeze_from is not None:
        layers = vision_layers(model)
        for i in range(stage.vit_unfreeze_from, min(len(layers), used_vision_layers(model))):
            layers[i].requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("nothing to train: every parameter is frozen for this stage")
    return names

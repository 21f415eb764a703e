"""The three builds (tiny from config, pretrained parts, full HF checkpoint) and a 7B meta build."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from sharegpt4v.config import ModelConfig, load_recipe
from sharegpt4v.modeling.builder import (
    CheckpointError,
    build_empty,
    build_model,
    build_tiny,
    count_parameters,
    load_projector_weights,
    save_model,
)
from sharegpt4v.modeling.images import preprocess
from sharegpt4v.modeling.inference import InferenceEngine
from sharegpt4v.modeling.templates import generation_prompt
from tests.modeling.fixtures import IMAGE_SIZE, IMAGE_TOKENS, corpus, recipe, tiny_model, tokenizer, world


def _logits(model: Any, processor: Any) -> torch.Tensor:
    engine_ids = InferenceEngine(model, processor, recipe().model, recipe().captioning).encode_prompt(
        generation_prompt("vicuna_v1", "What is in the image?")
    )
    with torch.no_grad():
        return model(input_ids=torch.tensor([engine_ids]), pixel_values=preprocess([world(1)[0].image], IMAGE_SIZE, "pad")).logits


def test_tiny_build_is_deterministic_and_sized_from_config() -> None:
    (a, processor), (b, _) = tiny_model(seed=1), tiny_model(seed=1)
    c, _ = tiny_model(seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    cfg = recipe().model
    assert isinstance(processor, LlavaProcessor)
    assert a.config.image_seq_length == cfg.image_tokens == (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    assert a.config.vision_feature_layer == -2 and a.config.vision_feature_select_strategy == "default"
    assert len(a.model.vision_tower.encoder.layers) == cfg.vision.num_layers
    assert len(a.model.language_model.layers) == cfg.language.num_layers
    assert a.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert 0.5e6 < count_parameters(a) < 2e6
    small = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_layers=3, feature_layer=-2))
    with pytest.raises(ValueError, match="num_layers"):
        build_tiny(small, tokenizer())


def test_7b_profile_builds_on_meta_without_memory() -> None:
    cfg = load_recipe("a100-7b").model
    model = build_empty(cfg)
    params = count_parameters(model)
    assert 6.9e9 < params < 7.2e9, params  # Vicuna-7B 6.74B + CLIP-L 0.30B + projector 21M
    assert all(p.is_meta for p in model.parameters())
    assert model.config.image_seq_length == cfg.image_tokens == 576
    assert model.config.vision_config.hidden_size == 1024 and model.config.text_config.hidden_size == 4096
    projector = model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features) == (1024, 4096)


def _llama_tokenizer_without_image_or_pad() -> PreTrainedTokenizerFast:
    """Like Vicuna's: <unk>/<s>/</s>, no pad token and no <image> token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus(), trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _write_parts(root: Path) -> tuple[Path, Path, Path, dict[str, torch.Tensor]]:
    """A tiny CLIP (full CLIPModel, as openai/clip-vit-* ships), a tiny Llama + tokenizer, a stage-1 projector."""
    v = recipe().model.vision
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        vision_config={"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                       "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size},
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100, "max_position_embeddings": 16},
        projection_dim=32,
    ))
    clip.save_pretrained(root / "clip")
    tok = _llama_tokenizer_without_image_or_pad()
    lang = recipe().model.language
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=lang.hidden_size, intermediate_size=lang.intermediate_size,
                                         num_hidden_layers=lang.num_layers, num_attention_heads=lang.num_heads,
                                         max_position_embeddings=lang.max_length, bos_token_id=1, eos_token_id=2))
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    projector = {
        "model.mm_projector.0.weight": torch.randn(lang.hidden_size, v.hidden_size),
        "model.mm_projector.0.bias": torch.randn(lang.hidden_size),
        "model.mm_projector.2.weight": torch.randn(lang.hidden_size, lang.hidden_size),
        "model.mm_projector.2.bias": torch.randn(lang.hidden_size),
    }
    save_file(projector, str(root / "mm_projector.safetensors"))
    return root / "clip", root / "llama", root / "mm_projector.safetensors", projector


def _parts_cfg(vision: str, language: str, projector: str | None) -> ModelConfig:
    cfg = recipe().model
    return dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, path=vision),
        language=dataclasses.replace(cfg.language, path=language),
        projector_path=projector,
    )


def _check_parts_build(model: Any, processor: Any, clip_dir: Path, llama_dir: Path, projector: dict[str, torch.Tensor]) -> None:
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == len(tok) - 1 == model.config.image_token_id  # appended to the vocabulary
    assert tok.pad_token == "<unk>" and tok.padding_side == "left"
    assert model.get_input_embeddings().num_embeddings == len(tok) == model.lm_head.out_features
    proj = model.model.multi_modal_projector
    assert torch.equal(proj.linear_1.weight, projector["model.mm_projector.0.weight"])
    assert torch.equal(proj.linear_2.bias, projector["model.mm_projector.2.bias"])
    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True)
    assert torch.equal(model.model.vision_tower.encoder.layers[1].mlp.fc1.weight,
                       clip.vision_model.encoder.layers[1].mlp.fc1.weight)
    llama = LlamaForCausalLM.from_pretrained(llama_dir, local_files_only=True)
    assert torch.equal(model.model.language_model.layers[2].mlp.up_proj.weight, llama.model.layers[2].mlp.up_proj.weight)
    assert not any(p.is_meta for p in model.parameters())


def test_build_from_parts_then_from_the_saved_checkpoint(tmp_path: Path) -> None:
    clip_dir, llama_dir, projector_file, projector = _write_parts(tmp_path)
    model, processor = build_model(_parts_cfg(str(clip_dir), str(llama_dir), str(projector_file)))
    _check_parts_build(model, processor, clip_dir, llama_dir, projector)
    engine = InferenceEngine(model, processor, recipe().model, recipe().captioning)
    out = engine.generate([world(1)[0].image], [generation_prompt("vicuna_v1", "Describe it.")], max_new_tokens=5)
    assert out[0].finish_reason != "error" and out[0].completion_tokens > 0

    # (c): the complete HF LLaVA folder that save_model writes (llava-1.5-7b-hf layout).
    save_model(model, processor, str(tmp_path / "llava"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= {p.name for p in (tmp_path / "llava").iterdir()}
    full, full_processor = build_model(dataclasses.replace(recipe().model, checkpoint=str(tmp_path / "llava")))
    assert torch.equal(_logits(model, processor), _logits(full, full_processor))


def test_build_from_parts_in_s3(tmp_path: Path, s3_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from sharegpt4v.storage import open_store

    monkeypatch.setenv("SHAREGPT4V_CACHE", str(tmp_path / "cache"))
    clip_dir, llama_dir, projector_file, projector = _write_parts(tmp_path / "parts")
    store = open_store(s3_uri)
    for folder in (clip_dir, llama_dir):  # user-mirrored folders: no manifest
        for path in folder.iterdir():
            store.put_file(f"{folder.name}/{path.name}", path)
    store.put_file("pretrain/mm_projector.safetensors", projector_file)
    store.commit_folder("pretrain")
    cfg = _parts_cfg(f"{s3_uri}/clip", f"{s3_uri}/llama", f"{s3_uri}/pretrain/mm_projector.safetensors")
    model, processor = build_model(cfg)
    _check_parts_build(model, processor, clip_dir, llama_dir, projector)
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2  # downloaded once each
    build_model(cfg)
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2

    store.put_bytes("pretrain/mm_projector.safetensors", b"tampered")  # no longer matches the manifest
    monkeypatch.setenv("SHAREGPT4V_CACHE", str(tmp_path / "fresh-cache"))
    with pytest.raises(CheckpointError, match="does not match"):
        build_model(cfg)


def test_projector_weights_keys_and_format(tmp_path: Path) -> None:
    save_file({"model.mm_projector.0.weight": torch.ones(2, 2), "multi_modal_projector.linear_2.bias": torch.ones(2)},
              str(tmp_path / "p.safetensors"))
    assert set(load_projector_weights(tmp_path / "p.safetensors")) == {"linear_1.weight", "linear_2.bias"}
    save_file({"model.embed_tokens.weight": torch.ones(2, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_projector_weights(tmp_path / "bad.safetensors")
    (tmp_path / "mm_projector.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_projector_weights(tmp_path / "mm_projector.bin")


def test_build_model_dispatch_errors(tmp_path: Path) -> None:
    cfg = recipe().model
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_model(cfg)
    with pytest.raises(ValueError, match="language.path"):
        build_model(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, path=str(tmp_path))))
    with pytest.raises(CheckpointError, match="no such folder"):
        build_model(dataclasses.replace(cfg, checkpoint=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="projector"):
        build_model(dataclasses.replace(cfg, projector="linear"), tokenizer())
    model, _ = build_model(cfg, tokenizer(), seed=3)
    assert model.config.image_seq_length == IMAGE_TOKENS

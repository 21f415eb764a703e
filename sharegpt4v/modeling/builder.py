"""Build, save and load LLaVA-1.5 models (HF `LlavaForConditionalGeneration`).

Three ways to build from a `ModelConfig` (`build_model` picks one):
  (a) `model.checkpoint`: a complete HF LLaVA checkpoint (llava-1.5-7b-hf layout);
  (b) `vision.path` + `language.path` (+ `projector_path`): CLIP tower + Llama/Vicuna + projector;
  (c) otherwise a tiny model from the config's sizes, random weights (needs a tokenizer).
Sources are local folders or `s3://` prefixes; an S3 prefix is downloaded once into a cache
(`SHAREGPT4V_CACHE`, default `~/.cache/sharegpt4v`), checked against its manifest when it has one.
Weights load from safetensors only: pickle files are never opened.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from sharegpt4v.errors import PlatformError
from sharegpt4v.modeling.images import CLIP_MEAN, CLIP_STD
from sharegpt4v.modeling.templates import IMAGE_PLACEHOLDER

MANIFEST = "manifest.json"
_SOURCE_MARK = ".sharegpt4v-source.json"  # what a cache folder was downloaded from


class CheckpointError(PlatformError):
    """A model source that cannot be used: missing, incomplete, tampered or not safetensors."""


def tokenizer_of(processor_or_tokenizer: Any) -> Any:
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# sources: local folders and s3 prefixes ----------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("SHAREGPT4V_CACHE") or Path.home() / ".cache" / "sharegpt4v")


def _cache_name(uri: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:60]
    return f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{tail}"


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser()


def _check_local(folder: Path, require_manifest: bool, verify: bool) -> None:
    from sharegpt4v.storage import open_store

    if not (folder / MANIFEST).is_file():
        if require_manifest:
            raise CheckpointError(f"{folder}: no {MANIFEST}; the checkpoint is incomplete or was not written by save_model")
        return
    if not verify:
        return
    problems = open_store(str(folder)).verify_folder()
    if problems:
        raise CheckpointError(f"{folder}: does not match its manifest: {'; '.join(problems[:5])}")


def materialize(uri: str, require_manifest: bool = False, verify: bool = True) -> Path:
    """A local folder holding the model files at `uri`.

    Local folders are used in place (re-hashed against their manifest unless `verify=False`);
    an S3 prefix is downloaded into the cache once (again only when the remote manifest, or
    the listing when there is none, changes), every file checked against the manifest's
    sha256 while downloading when there is one.
    """
    from sharegpt4v.storage import (
        IncompleteFolder,
        is_s3,
        json_bytes,
        open_store,
        sha256_stream,
    )

    if not is_s3(uri):
        folder = _local_path(uri)
        if not folder.is_dir():
            raise CheckpointError(f"{uri}: no such folder")
        _check_local(folder, require_manifest, verify)
        return folder

    store = open_store(uri)
    try:
        manifest: dict[str, Any] | None = store.read_manifest()
    except IncompleteFolder:
        if require_manifest:
            raise CheckpointError(f"{uri}: no {MANIFEST}; the checkpoint is incomplete or was not written by save_model") from None
        manifest = None
    if manifest is not None:
        files = [(f["path"], int(f["bytes"]), f["sha256"]) for f in manifest.get("files", [])]
        source = {"uri": uri, "manifest": manifest}
    else:
        files = [(o.key, o.size, None) for o in store.list() if not o.key.endswith("/")]
        source = {"uri": uri, "listing": [[k, s] for k, s, _ in files]}
    if not files:
        raise CheckpointError(f"{uri}: no files there")

    target = cache_root() / "models" / _cache_name(uri)
    marker = json_bytes(source)
    if (target / _SOURCE_MARK).is_file() and (target / _SOURCE_MARK).read_bytes() == marker:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        for key, size, digest in files:
            dest = tmp / key
            store.get_file(key, dest)
            if digest is not None:
                with open(dest, "rb") as stream:
                    got, got_size = sha256_stream(stream)
                if (got, got_size) != (digest, size):
                    raise CheckpointError(f"{store.url(key)}: sha256/size does not match {MANIFEST}; the checkpoint was modified")
        if manifest is not None:
            (tmp / MANIFEST).write_bytes(json_bytes(manifest))
        (tmp / _SOURCE_MARK).write_bytes(marker)
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same download first
            if not ((target / _SOURCE_MARK).is_file() and (target / _SOURCE_MARK).read_bytes() == marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_file(uri: str) -> Path:
    """A local copy of one file (local path or s3 URI), checked against its folder's manifest if any."""
    from sharegpt4v.storage import IncompleteFolder, is_s3, sha256_stream, split

    if not is_s3(uri):
        path = _local_path(uri)
        if not path.is_file():
            raise CheckpointError(f"{uri}: no such file")
        return path
    store, name = split(uri)
    try:
        expected = {f["path"]: f for f in store.read_manifest().get("files", [])}.get(name)
    except IncompleteFolder:
        expected = None
    dest = cache_root() / "files" / _cache_name(uri) / name

    def matches() -> bool:
        if expected is None:
            return True
        with open(dest, "rb") as stream:
            return sha256_stream(stream) == (expected["sha256"], int(expected["bytes"]))

    if dest.is_file() and (expected is not None or dest.stat().st_size == store.size(name)) and matches():
        return dest
    store.get_file(name, dest)
    if not matches():
        dest.unlink()
        raise CheckpointError(f"{uri}: sha256/size does not match {MANIFEST}; the file was modified")
    return dest


# configs and processors --------------------------------------------------------------------------


def _image_token_id(tokenizer: Any, add: bool) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if token_id is None or token_id == tokenizer.unk_token_id:
        if not add:
            raise ValueError(f"tokenizer has no {IMAGE_PLACEHOLDER} token")
        tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    return int(token_id)


def _prepare_tokenizer(tokenizer: Any, add_image_token: bool = False) -> int:
    """Left padding, a pad token (LLaVA uses <unk> when there is none); returns the <image> id."""
    image_id = _image_token_id(tokenizer, add_image_token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = "left"
    return image_id


def llava_config(
    model_cfg: Any,
    vocab_size: int,
    image_token_id: int,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    pad_token_id: int | None = None,
    vision_config: Any = None,
    text_config: Any = None,
) -> LlavaConfig:
    """LlavaConfig from a `ModelConfig`; pass the sub-configs of loaded checkpoints to use theirs."""
    if model_cfg.projector != "mlp2x_gelu":
        raise ValueError(
            f"model.projector: {model_cfg.projector!r} is not supported by HF LlavaForConditionalGeneration "
            "(its projector is Linear-GELU-Linear); use mlp2x_gelu"
        )
    v, lang = model_cfg.vision, model_cfg.language
    if vision_config is None:
        vision_config = CLIPVisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            projection_dim=v.hidden_size,
        )
    if text_config is None:
        text_config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=lang.hidden_size,
            intermediate_size=lang.intermediate_size,
            num_hidden_layers=lang.num_layers,
            num_attention_heads=lang.num_heads,
            num_key_value_heads=lang.num_heads,
            max_position_embeddings=lang.max_length,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=False,
            initializer_range=lang.initializer_range,  # LLaVA inits its projector with the text config's too
        )
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    if tokens != model_cfg.image_tokens:
        raise ValueError(
            f"model.image_tokens: {model_cfg.image_tokens} but the vision tower gives {tokens} "
            f"({vision_config.image_size}px / patch {vision_config.patch_size}, CLS dropped)"
        )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=v.feature_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def make_processor(tokenizer: Any, image_size: int, patch_size: int) -> LlavaProcessor:
    """A standard HF LlavaProcessor (PIL image backend: no torchvision), padding images to square."""
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_pad=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, dropped by the "default" strategy
    )


def _set_generation_config(model: PreTrainedModel, tokenizer: Any) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


# the three builds ----------------------------------------------------------------------------


def build_tiny(model_cfg: Any, tokenizer: Any, seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA sized from the config with random weights (deterministic for a seed)."""
    if model_cfg.vision.num_layers < 4:
        raise ValueError("model.vision.num_layers: a tiny tower needs >= 4 layers (the last one never trains)")
    image_id = _prepare_tokenizer(tokenizer)
    config = llava_config(
        model_cfg, len(tokenizer), image_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    _set_generation_config(model, tokenizer)
    return model.eval(), make_processor(tokenizer, model_cfg.vision.image_size, model_cfg.vision.patch_size)


def build_empty(model_cfg: Any, vocab_size: int | None = None) -> LlavaForConditionalGeneration:
    """The architecture on the `meta` device: shapes and parameter count, no memory, no weights."""
    vocab = vocab_size if vocab_size is not None else model_cfg.language.vocab_size + 1  # + <image>
    config = llava_config(model_cfg, vocab, image_token_id=vocab - 1, pad_token_id=0)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def load_projector_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Projector weights from safetensors, keys mapped to HF names (`linear_1`, `linear_2`).

    Accepts LLaVA-1.5's stage-1 keys (`model.mm_projector.0.weight`, `.2.weight`, ...) and HF keys.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path.name}: projector weights must be a .safetensors file (pickle files such as "
            "mm_projector.bin are never loaded; convert them once with safetensors.torch.save_file)"
        )
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(path)).items():
        match = re.search(r"(?:mm_projector|multi_modal_projector)\.(0|2|linear_1|linear_2)\.(weight|bias)$", key) or re.fullmatch(
            r"(0|2|linear_1|linear_2)\.(weight|bias)", key
        )
        if not match:
            raise CheckpointError(f"{path.name}: unexpected key {key!r} in projector weights")
        layer = {"0": "linear_1", "2": "linear_2"}.get(match.group(1), match.group(1))
        mapped[f"{layer}.{match.group(2)}"] = tensor
    return mapped


def build_from_parts(
    model_cfg: Any, tokenizer: Any = None, seed: int = 0, dtype: torch.dtype | None = None
) -> tuple[LlavaForConditionalGeneration, Any]:
    """CLIP vision checkpoint + Llama/Vicuna checkpoint (+ tokenizer) + optional projector weights."""
    vision_dir = materialize(model_cfg.vision.path)
    language_dir = materialize(model_cfg.language.path)
    load = {"use_safetensors": True, "local_files_only": True, **({"dtype": dtype} if dtype is not None else {})}
    try:
        vision = CLIPVisionModel.from_pretrained(str(vision_dir), **load)
        llm = AutoModelForCausalLM.from_pretrained(str(language_dir), **load)
    except OSError as exc:
        raise CheckpointError(f"cannot load safetensors weights: {exc}") from None
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(language_dir), local_files_only=True)
    image_id = _prepare_tokenizer(tokenizer, add_image_token=True)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    config = llava_config(
        model_cfg,
        llm.config.vocab_size,
        image_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        vision_config=vision.config,
        text_config=llm.config,
    )
    # Skeleton on meta (no memory), then the loaded parts are put in place.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = LlavaMultiModalProjector(config)
    if model_cfg.projector_path:
        weights_path = fetch_file(model_cfg.projector_path)
        try:
            projector.load_state_dict(load_projector_weights(weights_path), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{model_cfg.projector_path}: projector weights do not fit: {exc}") from None
    model.model.multi_modal_projector = projector
    model.to(dtype or llm.dtype)
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointError(f"parameters left without weights: {leftover[:5]}")
    _set_generation_config(model, tokenizer)
    image_size, patch = vision.config.image_size, vision.config.patch_size
    return model.eval(), make_processor(tokenizer, image_size, patch)


def build_from_checkpoint(
    uri: str, dtype: torch.dtype | None = None, require_manifest: bool = False
) -> tuple[LlavaForConditionalGeneration, Any]:
    """A complete HF LLaVA folder (config.json, safetensors, tokenizer/processor files)."""
    folder = materialize(uri, require_manifest=require_manifest)
    check_weight_names(folder, uri)
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            str(folder), use_safetensors=True, local_files_only=True, output_loading_info=True,
            **({"dtype": dtype} if dtype is not None else {}),
        )
    except OSError as exc:
        raise CheckpointError(f"{uri}: cannot load safetensors weights: {exc}") from None
    left = sorted(info.get("missing_keys") or []) + sorted(info.get("unexpected_keys") or [])
    if left:  # never run a model with weights left random
        raise CheckpointError(f"{uri}: weights did not load by name ({len(left)} missing or unexpected, e.g. {left[0]!r})")
    processor: Any
    try:
        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        if not hasattr(processor, "tokenizer"):
            raise TypeError("not a multimodal processor")
    except (OSError, ValueError, TypeError, KeyError, ImportError):  # e.g. no processor files: the tokenizer will do
        processor = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    _prepare_tokenizer(tokenizer_of(processor))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer_of(processor).pad_token_id
    return model.eval(), processor


def check_weight_names(folder: Path, uri: str) -> None:
    """Refuse a LLaVA checkpoint whose weight names are not exactly the ones its config needs.

    Names in any layout the platform has written are mapped to llava-hf's first (convert on read).
    """
    from sharegpt4v.modeling.hf_layout import llava_hf_name, weight_names

    saved = {llava_hf_name(n) for n in weight_names(folder)}
    if not saved:
        raise CheckpointError(f"{uri}: no model.safetensors (weights load from safetensors only)")
    try:
        config = LlavaConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{uri}: no usable LLaVA config.json ({str(exc).splitlines()[0]})") from None
    with torch.device("meta"):
        wanted = {llava_hf_name(n) for n in LlavaForConditionalGeneration(config).state_dict()}
    missing, unexpected = sorted(wanted - saved), sorted(saved - wanted)
    if missing or unexpected:
        example = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise CheckpointError(
            f"{uri}: weight names do not fit the LLaVA config ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"e.g. {example})"
        )


def build_model(
    model_cfg: Any, tokenizer: Any = None, seed: int = 0, dtype: torch.dtype | None = None
) -> tuple[LlavaForConditionalGeneration, Any]:
    """Pick the build from the config: checkpoint, pretrained parts, or tiny from config."""
    if model_cfg.checkpoint:
        return build_from_checkpoint(model_cfg.checkpoint, dtype)
    if model_cfg.vision.path or model_cfg.language.path:
        if not (model_cfg.vision.path and model_cfg.language.path):
            raise ValueError("model.vision.path: set both vision.path and language.path (or model.checkpoint)")
        return build_from_parts(model_cfg, tokenizer, seed, dtype)
    if tokenizer is None:
        raise ValueError("build_model: a model built from config needs a tokenizer (train one with train_tokenizer)")
    model, processor = build_tiny(model_cfg, tokenizer, seed)
    return (model.to(dtype) if dtype is not None else model), processor


# save / load ---------------------------------------------------------------------------------


def save_model(
    model: PreTrainedModel, processor_or_tokenizer: Any, uri: str, image_aspect: str | None = None, **meta: Any
) -> dict[str, Any]:
    """Write an HF checkpoint (safetensors) to a local folder or s3 prefix; the manifest goes last.

    A LLaVA model is written in the llava-hf layout (`hf_layout`), its processor padding images
    to square when `image_aspect` is "pad" (cropping when "crop"). An existing manifest is
    removed first, so a reader never takes a half-overwritten folder for a complete one.
    """
    from sharegpt4v.modeling.hf_layout import write_layout
    from sharegpt4v.storage import MANIFEST_NAME, FileEntry, open_store, sha256_stream

    store = open_store(uri)
    if store.exists(MANIFEST_NAME):
        store.delete(MANIFEST_NAME)
    with tempfile.TemporaryDirectory(prefix="sharegpt4v-save-") as tmp:
        model.save_pretrained(tmp)
        processor_or_tokenizer.save_pretrained(tmp)
        if isinstance(model, LlavaForConditionalGeneration):
            write_layout(Path(tmp), image_aspect)
        entries = []
        for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            rel = path.relative_to(tmp).as_posix()
            with open(path, "rb") as stream:
                digest, size = sha256_stream(stream)
            store.put_file(rel, path)
            entries.append(FileEntry(rel, size, digest))
    meta = {"kind": "llava-checkpoint", "parameters": count_parameters(model), **meta}
    return store.commit_folder("", files=entries, **meta)


def load_model(
    uri: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[LlavaForConditionalGeneration, Any]:
    """(model, processor) from a folder written by `save_model`; refuses folders without a manifest."""
    model, processor = build_from_checkpoint(uri, dtype, require_manifest=True)
    return model.to(device), processor


def checkpoint_digest(uri: str) -> str:
    """A short id of a saved checkpoint's content: sha256 of its manifest's file list (nothing is downloaded)."""
    from sharegpt4v.storage import IncompleteFolder, is_s3, manifest_digest, open_store

    try:
        manifest = open_store(uri if is_s3(uri) else str(_local_path(uri))).read_manifest()
    except IncompleteFolder:
        raise CheckpointError(f"{uri}: no {MANIFEST}; the checkpoint is incomplete or was not written by save_model") from None
    return manifest_digest({"files": manifest.get("files", [])})[:12]  # files only: metadata edits keep the id

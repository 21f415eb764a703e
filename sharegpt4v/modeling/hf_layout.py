"""The llava-hf checkpoint layout: what every engine (transformers 4.5x and 5.x, vLLM) loads.

transformers 5 saves LLaVA's vision tower as `vision_tower.encoder...` and its processor in its
own files (`processor_config.json` with the image processor nested, tokenizer class
`TokenizersBackend`); transformers 4.5x and vLLM read the layout of the published
llava-1.5-7b-hf checkpoints instead: `vision_tower.vision_model.encoder...`,
`preprocessor_config.json`, a tokenizer class both know and a chat template. `write_layout`
turns a `save_pretrained` folder into that layout; `weight_names` maps any name the platform
ever wrote to the llava-hf one, so older checkpoints still load (convert on read).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sharegpt4v.modeling.templates import IMAGE_PLACEHOLDER, SYSTEM_PROMPT

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# The class name transformers 4.5x and 5.x both resolve for a tokenizer.json-backed tokenizer.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"

# Renames to the llava-hf layout, applied in order; each is a no-op on names already in it.
_RENAMES = (
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.(vision_tower|multi_modal_projector)\."), r"\1."),
    (re.compile(r"^vision_tower\.(?!vision_model\.)"), "vision_tower.vision_model."),
)

# vicuna_v1 exactly as `templates.chat_generation_prompt` writes it, BOS included:
# "<s>SYSTEM USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:". A system message replaces
# the default system prompt; images go first in their user turn, each followed by a newline.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string"
    " else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = " + json.dumps(SYSTEM_PROMPT) + " -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- system -}}"
    "{%- for message in turns -%}"
    "{%- if message['content'] is string -%}"
    "{%- set images = 0 -%}{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- (' ' if loop.first else '') + 'USER: ' + ('" + IMAGE_PLACEHOLDER + "\\n' * images) + text -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ASSISTANT: ' + text + eos_token -}}"
    "{%- else -%}{{- raise_exception('vicuna_v1: roles are system (first), user and assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
)


def llava_hf_name(name: str) -> str:
    """The llava-hf name of a weight saved under any layout the platform has written."""
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name


def weight_files(folder: Path) -> list[Path]:
    index = folder / WEIGHTS_INDEX
    if index.exists():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [folder / WEIGHTS] if (folder / WEIGHTS).exists() else []


def weight_names(folder: Path) -> set[str]:
    """Names of the saved weights, read from the safetensors headers (no tensor is loaded)."""
    names: set[str] = set()
    for path in weight_files(folder):
        with safe_open(str(path), "pt") as f:
            names.update(f.keys())
    return names


def in_layout(folder: Path) -> bool:
    """True when the weights, image processor, tokenizer class and chat template are llava-hf's."""
    names = weight_names(folder)
    if not names or any(llava_hf_name(n) != n for n in names):
        return False
    if not (folder / PREPROCESSOR_CONFIG).exists() or not (folder / CHAT_TEMPLATE_FILE).exists():
        return False
    tokenizer = folder / TOKENIZER_CONFIG
    return not tokenizer.exists() or json.loads(tokenizer.read_text()).get("tokenizer_class") == TOKENIZER_CLASS


def _rename_weights(folder: Path) -> None:
    index_path = folder / WEIGHTS_INDEX
    for path in weight_files(folder):
        tensors = load_file(str(path))
        if all(llava_hf_name(n) == n for n in tensors):
            continue
        save_file({llava_hf_name(n): t.contiguous() for n, t in tensors.items()}, str(path), metadata={"format": "pt"})
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {llava_hf_name(n): f for n, f in index["weight_map"].items()}
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _split_processor_config(folder: Path, do_pad: bool | None) -> None:
    """transformers 5 nests the image processor in processor_config.json; llava-hf keeps it in
    preprocessor_config.json, which 4.5x, 5.x and vLLM all read."""
    processor_path, preprocessor_path = folder / PROCESSOR_CONFIG, folder / PREPROCESSOR_CONFIG
    processor = json.loads(processor_path.read_text()) if processor_path.exists() else {}
    image = processor.pop("image_processor", None)
    if image is None and preprocessor_path.exists():
        image = json.loads(preprocessor_path.read_text())
    if image is None:
        return  # a tokenizer-only folder (no processor): nothing to split
    image.setdefault("processor_class", "LlavaProcessor")
    if do_pad is not None:
        image["do_pad"] = do_pad
    processor.pop("chat_template", None)  # lives in chat_template.jinja
    _write_json(preprocessor_path, image)
    if processor:
        _write_json(processor_path, processor)


def _fix_tokenizer_config(folder: Path) -> None:
    path = folder / TOKENIZER_CONFIG
    if not path.exists():
        return
    config = json.loads(path.read_text())
    config["tokenizer_class"] = TOKENIZER_CLASS
    config["model_input_names"] = ["input_ids", "attention_mask"]  # 4.5x's fast tokenizer adds token_type_ids otherwise
    # 4.5x wants named extra special tokens as a mapping; 5.x writes a list plus top-level names.
    named = {key: config[key] for key in ("image_token",) if isinstance(config.get(key), str)}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        named = {**extra, **named}
    config["extra_special_tokens"] = named
    config.pop("chat_template", None)  # lives in chat_template.jinja
    _write_json(path, config)


def write_layout(folder: Path, image_aspect: str | None = None) -> None:
    """Rewrite a transformers-5 `save_pretrained` folder (model + processor) in place into the llava-hf layout.

    `image_aspect` ("pad" or "crop") sets the image processor's `do_pad`, so stock processors
    preprocess as the stage that made the checkpoint did.
    """
    if image_aspect not in (None, "pad", "crop"):
        raise ValueError(f"image_aspect: unknown {image_aspect!r} (pad or crop)")
    _rename_weights(folder)
    _split_processor_config(folder, None if image_aspect is None else image_aspect == "pad")
    _fix_tokenizer_config(folder)
    (folder / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE)


def llava_hf_folder(folder: Path) -> Path:
    """`folder` when it is already in the llava-hf layout; otherwise a converted copy in the model
    cache (made once per folder and content), for engines that read only that layout (vLLM)."""
    from sharegpt4v.modeling.builder import cache_root

    if in_layout(folder):
        return folder
    folder = folder.resolve()
    manifest = folder / "manifest.json"
    key = hashlib.sha256(str(folder).encode() + (manifest.read_bytes() if manifest.exists() else b"")).hexdigest()[:16]
    converted = cache_root() / "llava-hf" / f"{folder.name}-{key}"
    if converted.exists() and in_layout(converted):
        return converted
    converted.parent.mkdir(parents=True, exist_ok=True)
    staging = converted.with_name(f"{converted.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(folder, staging)
    write_layout(staging)
    shutil.rmtree(converted, ignore_errors=True)
    staging.rename(converted)  # whole or not at all
    return converted

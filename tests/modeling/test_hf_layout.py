"""Checkpoints in the llava-hf layout: stock transformers 5.x and 4.5x load them, with a chat template
that writes the project's vicuna_v1 prompt; the platform's loader refuses weights it cannot place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from sharegpt4v.modeling.builder import CheckpointError, load_model, save_model
from sharegpt4v.modeling.hf_layout import in_layout, llava_hf_folder, weight_names
from sharegpt4v.modeling.images import preprocess
from sharegpt4v.modeling.templates import chat_generation_prompt, encode_conversation
from tests.modeling.fixtures import IMAGE_SIZE, IMAGE_TOKENS, tiny_model, world

REPO = Path(__file__).resolve().parents[2]
HF4_PYTHON = REPO / ".venv-hf4" / "bin" / "python"  # made by scripts/setup_hf4.sh (make test runs it)

# Messages in the transformers chat format, and the same turns as the project writes them.
ONE_TURN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]
SEVERAL_TURNS = [
    *ONE_TURN,
    {"role": "assistant", "content": [{"type": "text", "text": "It is red."}]},
    {"role": "user", "content": [{"type": "text", "text": "Where is it?"}]},
    {"role": "assistant", "content": "At the top left."},
    {"role": "user", "content": "How many objects are there?"},
]


def _turns(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    def text(content: Any) -> str:
        return content if isinstance(content, str) else " ".join(c["text"] for c in content if c["type"] == "text")

    return [(m["role"], text(m["content"])) for m in messages]


def _without_image(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**m, "content": [c for c in m["content"] if c["type"] != "image"]} if isinstance(m["content"], list) else m
            for m in messages]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    folder = tmp_path_factory.mktemp("llava-hf") / "checkpoint"
    model, processor = tiny_model(seed=3)
    save_model(model, processor, str(folder), image_aspect="pad")
    return folder, model, processor


def test_weights_processor_and_tokenizer_are_in_the_llava_hf_layout(saved: tuple[Path, Any, Any], tmp_path: Path) -> None:
    folder, model, processor = saved
    names = weight_names(folder)
    assert in_layout(folder)
    assert {n.split(".")[0] for n in names} == {"language_model", "multi_modal_projector", "vision_tower"}
    assert "language_model.lm_head.weight" in names and "language_model.model.embed_tokens.weight" in names
    assert all(n.startswith("vision_tower.vision_model.") for n in names if n.startswith("vision_tower."))
    assert "multi_modal_projector.linear_1.weight" in names
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert preprocessor["do_pad"] is True and preprocessor["crop_size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"

    save_model(model, processor, str(tmp_path / "crop"), image_aspect="crop")  # a pretraining stage crops
    assert json.loads((tmp_path / "crop" / "preprocessor_config.json").read_text())["do_pad"] is False


def test_stock_transformers_loads_every_weight_and_the_processor(saved: tuple[Path, Any, Any]) -> None:
    folder, model, _ = saved
    loaded, info = LlavaForConditionalGeneration.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(mine, theirs), name
    processor = AutoProcessor.from_pretrained(str(folder))
    assert processor.image_processor.do_pad is True and processor.tokenizer.padding_side == "left"


@pytest.mark.parametrize("messages", [ONE_TURN, SEVERAL_TURNS], ids=["one-turn", "several-turns"])
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "no-image"])
def test_chat_template_writes_the_project_prompt_bos_included(
    saved: tuple[Path, Any, Any], messages: list[dict[str, Any]], with_image: bool
) -> None:
    folder, _, project_processor = saved
    messages = messages if with_image else _without_image(messages)
    expected = chat_generation_prompt("vicuna_v1", _turns(messages), with_image=with_image)
    processor = AutoProcessor.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == "<s>" + expected
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == "<s>" + expected
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == project_processor.tokenizer(expected, add_special_tokens=True)["input_ids"]


def test_chat_template_of_a_whole_conversation_is_what_training_encodes(saved: tuple[Path, Any, Any]) -> None:
    folder, _, project_processor = saved
    messages = [*ONE_TURN, {"role": "assistant", "content": "It is red."}]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    trained = encode_conversation(
        [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "It is red."}],
        project_processor.tokenizer, "vicuna_v1", max_length=512, image_tokens=1,
    )
    assert ids == trained.input_ids


def test_transformers_4_57_loads_the_checkpoint_and_generates_the_same_tokens(saved: tuple[Path, Any, Any]) -> None:
    """The same greedy tokens from stock 4.57 (its own processor and chat template) as from the pinned 5.x."""
    folder, _, _ = saved
    assert HF4_PYTHON.exists(), f"{HF4_PYTHON} missing: run scripts/setup_hf4.sh (make test does)"
    script = REPO / "tests" / "modeling" / "stock_generate.py"
    old = subprocess.run([str(HF4_PYTHON), str(script), str(folder)], capture_output=True, text=True, timeout=300)
    assert old.returncode == 0, old.stderr[-2000:]
    new = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True, timeout=300)
    assert new.returncode == 0, new.stderr[-2000:]
    old_result, new_result = json.loads(old.stdout.splitlines()[-1]), json.loads(new.stdout.splitlines()[-1])
    assert old_result["version"].startswith("4.57") and new_result["version"].startswith("5.")
    assert old_result["loading"] == {"missing_keys": 0, "unexpected_keys": 0, "mismatched_keys": 0, "error_msgs": 0}
    assert old_result["prompt_ids"] == new_result["prompt_ids"]
    assert old_result["tokens"] == new_result["tokens"] and len(old_result["tokens"]) == 8


def _rename(folder: Path, rename: Any) -> None:
    path = folder / "model.safetensors"
    save_file({rename(k): v for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})


def _logits(model: Any, processor: Any) -> torch.Tensor:
    ids = processor.tokenizer(chat_generation_prompt("vicuna_v1", [("user", "What is it?")]))["input_ids"]
    image_id = model.config.image_token_id
    ids = [t for i in ids for t in ([i] * IMAGE_TOKENS if i == image_id else [i])]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=preprocess([world(1)[0].image], IMAGE_SIZE)).logits


def test_checkpoints_written_in_the_older_layout_still_load(
    saved: tuple[Path, Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHAREGPT4V_CACHE", str(tmp_path / "cache"))
    folder, model, processor = saved
    old = tmp_path / "old"
    save_model(model, processor, str(old))
    _rename(old, lambda k: k.replace("vision_tower.vision_model.", "vision_tower."))  # how transformers 5 saved it
    _refresh_manifest(old)
    loaded, loaded_processor = load_model(str(old))
    assert torch.equal(_logits(model, processor), _logits(loaded, loaded_processor))
    assert not in_layout(old)
    converted = llava_hf_folder(old)  # what vLLM is given: a copy in the cache, the original untouched
    assert in_layout(converted) and converted.is_relative_to(tmp_path / "cache") and not in_layout(old)
    assert llava_hf_folder(old) == converted  # made once


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda k: k.replace("multi_modal_projector.linear_1", "multi_modal_projector.linear_9"), "2 missing, 2 unexpected"),
        (lambda k: k.replace("language_model.model.norm", "language_model.model.final_norm"), "1 missing, 1 unexpected"),
    ],
    ids=["projector", "language-model"],
)
def test_the_loader_refuses_weights_it_cannot_place_in_one_line(
    saved: tuple[Path, Any, Any], tmp_path: Path, change: Any, says: str
) -> None:
    folder, model, processor = saved
    bad = tmp_path / "bad"
    save_model(model, processor, str(bad))
    _rename(bad, change)
    _refresh_manifest(bad)
    with pytest.raises(CheckpointError) as err:
        load_model(str(bad))
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_loader_refuses_a_checkpoint_with_a_weight_missing(saved: tuple[Path, Any, Any], tmp_path: Path) -> None:
    folder, model, processor = saved
    bad = tmp_path / "bad"
    save_model(model, processor, str(bad))
    path = bad / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["vision_tower.vision_model.post_layernorm.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    _refresh_manifest(bad)
    with pytest.raises(CheckpointError, match="1 missing, 0 unexpected"):
        load_model(str(bad))


def _refresh_manifest(folder: Path) -> None:
    """Re-digest the weights after an edit (a tampered file is refused on its digest otherwise)."""
    from sharegpt4v import storage

    store = storage.open_store(str(folder))
    manifest = store.read_manifest()
    files = []
    for entry in manifest["files"]:
        with open(folder / entry["path"], "rb") as stream:
            digest, size = storage.sha256_stream(stream)
        files.append(storage.FileEntry(entry["path"], size, digest))
    store.commit_folder("", files=files, **{k: v for k, v in manifest.items() if k not in ("files",)})

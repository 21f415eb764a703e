"""save_model -> load_model: identical logits (local folder and real S3), manifest last, tampering detected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sharegpt4v import storage, storage_s3
from sharegpt4v.modeling.builder import CheckpointError, load_model, save_model
from sharegpt4v.modeling.images import preprocess
from sharegpt4v.modeling.inference import InferenceEngine
from sharegpt4v.modeling.templates import generation_prompt
from tests.modeling.fixtures import IMAGE_SIZE, recipe, tiny_model, world


def _logits(model: Any, processor: Any) -> torch.Tensor:
    ids = InferenceEngine(model, processor, recipe().model, recipe().captioning).encode_prompt(
        generation_prompt("vicuna_v1", "How many objects are there?")
    )
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=preprocess([world(2)[1].image], IMAGE_SIZE, "pad")).logits


def test_round_trip_gives_identical_logits_and_writes_the_manifest_last(
    store_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHAREGPT4V_CACHE", str(tmp_path / "cache"))
    written: list[str] = []
    for cls in (storage.LocalStore, storage_s3.S3Store):
        original = cls.put_file

        def spy(self: Any, key: str, local_path: Any, _original: Any = original) -> None:
            written.append(key)
            _original(self, key, local_path)

        monkeypatch.setattr(cls, "put_file", spy)
    real_commit = storage.Store.commit_folder

    def commit_spy(self: Any, prefix: str, files: Any = None, **meta: Any) -> Any:
        written.append("<manifest>")
        return real_commit(self, prefix, files, **meta)

    monkeypatch.setattr(storage.Store, "commit_folder", commit_spy)

    model, processor = tiny_model(seed=5)
    manifest = save_model(model, processor, store_uri, run="test")
    assert written[-1] == "<manifest>" and "model.safetensors" in written
    assert manifest["kind"] == "llava-checkpoint" and manifest["run"] == "test"
    assert {f["path"] for f in manifest["files"]} == {k for k in written if k != "<manifest>"}
    assert not any(f["path"].endswith((".bin", ".pt", ".pth")) for f in manifest["files"])  # safetensors only

    loaded, loaded_processor = load_model(store_uri)
    assert torch.equal(_logits(model, processor), _logits(loaded, loaded_processor))
    assert loaded_processor.tokenizer.padding_side == "left"
    assert loaded_processor.tokenizer("a <image>")["input_ids"] == processor.tokenizer("a <image>")["input_ids"]


def test_tampered_local_file_is_detected(tmp_path: Path) -> None:
    model, processor = tiny_model()
    folder = tmp_path / "ckpt"
    save_model(model, processor, str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 0.5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: sha256/size mismatch"):
        load_model(str(folder))


def test_tampered_s3_file_is_detected(s3_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHAREGPT4V_CACHE", str(tmp_path / "cache"))
    model, processor = tiny_model()
    save_model(model, processor, s3_uri)
    store = storage.open_store(s3_uri)
    data = bytearray(store.get_bytes("model.safetensors"))
    data[-1] ^= 0xFF
    store.put_bytes("model.safetensors", bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: sha256/size does not match"):
        load_model(s3_uri)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    model, processor = tiny_model()
    save_model(model, processor, str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "manifest.json").unlink()  # e.g. the writer died before committing
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_model(str(tmp_path / "ckpt"))


def test_overwrite_removes_the_old_manifest_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ckpt"
    model, processor = tiny_model()
    save_model(model, processor, str(folder))
    seen: list[bool] = []
    original = storage.LocalStore.put_file

    def spy(self: Any, key: str, local_path: Any) -> None:
        seen.append((folder / "manifest.json").exists())
        original(self, key, local_path)

    monkeypatch.setattr(storage.LocalStore, "put_file", spy)
    save_model(tiny_model(seed=9)[0], processor, str(folder))
    assert seen and not any(seen)
    assert (folder / "manifest.json").exists()


def test_checkpoint_saved_with_a_bare_tokenizer_loads(tmp_path: Path) -> None:
    model, processor = tiny_model()
    save_model(model, processor.tokenizer, str(tmp_path / "ckpt"))
    loaded, tokenizer = load_model(str(tmp_path / "ckpt"))
    assert not hasattr(tokenizer, "image_processor")
    assert torch.equal(_logits(model, processor), _logits(loaded, tokenizer))

"""Byte-level BPE for the tiny profile: deterministic, special tokens, save/load round-trip."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from sharegpt4v.modeling.tokenizer import train_tokenizer
from tests.modeling.fixtures import corpus, tokenizer, world


def test_training_is_deterministic() -> None:
    a, b = train_tokenizer(corpus(), 1024), train_tokenizer(corpus(), 1024)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) <= 1024


def test_special_tokens_and_padding_side() -> None:
    tok = tokenizer()
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert tok.image_token == "<image>" and tok.convert_tokens_to_ids("<image>") == 4
    assert tok.padding_side == "left"
    ids = tok("USER: <image>\nhello</s>")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(4) == 1 and ids[-1] == tok.eos_token_id
    assert tok("a red circle", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id
    batch = tok(["a", "a red circle in the image"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1


def test_decode_round_trip_and_save_load(tmp_path: Path) -> None:
    tok = tokenizer()
    caption = world(5)[3].metadata["detailed_caption"]
    ids = tok(caption)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == caption
    assert tok.unk_token_id not in ids  # byte-level: every byte encodes
    assert tok.decode(tok("naïve — 中文")["input_ids"], skip_special_tokens=True) == "naïve — 中文"
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert back(caption)["input_ids"] == ids
    assert back.padding_side == "left" and back.convert_tokens_to_ids("<image>") == 4

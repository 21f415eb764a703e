"""Conversation templates: exact label masking, flags instead of silent drops, prompt consistency."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
from sharegpt4v.modeling.images import preprocess
from sharegpt4v.modeling.inference import InferenceEngine
from sharegpt4v.modeling.templates import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    encode_conversation,
    generation_prompt,
)
from tests.modeling.fixtures import IMAGE_SIZE, IMAGE_TOKENS, recipe, tiny_model, tokenizer, world


def _supervised_runs(labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def _multi_turn() -> list[dict[str, str]]:
    vqa = world(3)[2].metadata["vqa"]
    return [
        {"from": "human", "value": f"<image>\n{vqa[0]['question']}"},
        {"from": "gpt", "value": vqa[0]["answer"]},
        {"from": "human", "value": vqa[1]["question"]},
        {"from": "gpt", "value": "It is hard to say, but probably " + vqa[1]["answer"] + "."},
        {"from": "human", "value": CAPTION_INSTRUCTION},
        {"from": "gpt", "value": world(3)[2].metadata["detailed_caption"]},
    ]


def test_vicuna_supervises_exactly_the_answers_and_their_eos() -> None:
    tok = tokenizer()
    conv = _multi_turn()
    enc = encode_conversation(conv, tok, "vicuna_v1", 1024, IMAGE_TOKENS)
    assert len(enc.input_ids) == len(enc.labels) and not enc.truncated and not enc.fully_masked
    answers = [turn["value"] for turn in conv if turn["from"] == "gpt"]
    runs = _supervised_runs(enc.labels)
    assert [tok.decode(run) for run in runs] == [f" {a}</s>" for a in answers]
    # Labels equal the ids wherever supervised; everything before the first answer is masked.
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(enc.input_ids, enc.labels))
    image_id = tok.convert_tokens_to_ids("<image>")
    assert enc.input_ids.count(image_id) == IMAGE_TOKENS
    assert all(enc.labels[i] == IGNORE_INDEX for i, t in enumerate(enc.input_ids) if t == image_id)
    text = tok.decode(enc.input_ids)
    assert text.startswith(f"<s>{SYSTEM_PROMPT} USER: " + "<image>" * IMAGE_TOKENS + "\n")
    assert f"{answers[0]}</s>USER: {conv[2]['value']} ASSISTANT: " in text


def test_plain_supervises_caption_and_newline() -> None:
    tok = tokenizer()
    caption = world(1)[0].metadata["detailed_caption"]
    conv = [{"from": "human", "value": "<image>\nignored in plain"}, {"from": "gpt", "value": caption}]
    enc = encode_conversation(conv, tok, "plain", 256, IMAGE_TOKENS)
    assert enc.input_ids[: 1 + IMAGE_TOKENS] == [tok.bos_token_id] + [tok.convert_tokens_to_ids("<image>")] * IMAGE_TOKENS
    assert enc.labels[: 1 + IMAGE_TOKENS] == [IGNORE_INDEX] * (1 + IMAGE_TOKENS)
    assert [tok.decode(run) for run in _supervised_runs(enc.labels)] == [caption + "\n"]
    assert enc.supervised_tokens == len(enc.input_ids) - 1 - IMAGE_TOKENS


def test_truncation_is_flagged_not_dropped() -> None:
    tok = tokenizer()
    conv = _multi_turn()[:2]
    full = encode_conversation(conv, tok, "vicuna_v1", 1024, IMAGE_TOKENS)
    cut = encode_conversation(conv, tok, "vicuna_v1", len(full.input_ids) - 1, IMAGE_TOKENS)
    assert cut.truncated and not cut.fully_masked and cut.input_ids == full.input_ids[:-1]
    prompt_len = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    none_left = encode_conversation(conv, tok, "vicuna_v1", prompt_len, IMAGE_TOKENS)
    assert none_left.truncated and none_left.fully_masked and none_left.supervised_tokens == 0
    with pytest.raises(ValueError, match=f"cuts through the {IMAGE_TOKENS} image tokens"):
        encode_conversation(conv, tok, "vicuna_v1", full.input_ids.index(4) + 5, IMAGE_TOKENS)


def test_malformed_conversations_raise() -> None:
    tok = tokenizer()
    with pytest.raises(ValueError, match="human/gpt pairs"):
        encode_conversation([{"from": "human", "value": "hi"}], tok, "vicuna_v1", 64, IMAGE_TOKENS)
    with pytest.raises(ValueError, match="expected 'human' then 'gpt'"):
        encode_conversation([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], tok, "vicuna_v1", 64, 16)
    with pytest.raises(ValueError, match="template"):
        encode_conversation([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], tok, "chatml", 64, 16)


def test_image_placeholder_moves_to_the_start_of_the_turn() -> None:
    tok = tokenizer()
    a = encode_conversation([{"from": "human", "value": "What is it? <image>"}, {"from": "gpt", "value": "A dog."}],
                            tok, "vicuna_v1", 256, IMAGE_TOKENS)
    b = encode_conversation([{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A dog."}],
                            tok, "vicuna_v1", 256, IMAGE_TOKENS)
    assert a == b


def test_generation_prompt_tokenizes_like_the_training_prefix() -> None:
    model, processor = tiny_model()
    engine = InferenceEngine(model, processor, recipe().model, recipe().captioning)
    conv = [{"from": "human", "value": f"<image>\n{CAPTION_INSTRUCTION}"}, {"from": "gpt", "value": "A red circle."}]
    enc = encode_conversation(conv, processor.tokenizer, "vicuna_v1", 256, IMAGE_TOKENS)
    prompt_ids = engine.encode_prompt(generation_prompt("vicuna_v1", CAPTION_INSTRUCTION))
    assert enc.input_ids[: len(prompt_ids)] == prompt_ids
    assert enc.labels[len(prompt_ids)] != IGNORE_INDEX and enc.labels[len(prompt_ids) - 1] == IGNORE_INDEX
    assert generation_prompt("plain", "") == "<image>"


def test_labels_line_up_with_the_model_inputs() -> None:
    model, processor = tiny_model()
    enc = encode_conversation(_multi_turn(), processor.tokenizer, "vicuna_v1", 256, IMAGE_TOKENS)
    out = model(
        input_ids=torch.tensor([enc.input_ids]),
        labels=torch.tensor([enc.labels]),
        pixel_values=preprocess([world(3)[2].image], IMAGE_SIZE, "pad"),
    )
    assert torch.isfinite(out.loss) and out.loss.item() > 0


def _sentencepiece_style_tokenizer(legacy: bool) -> Any:
    """Llama-like tokenizers: "▁" marks word starts. legacy: llava-1.5-7b-hf's normalizer
    (Prepend "▁", Replace " " -> "▁"); otherwise a Metaspace pre-tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from tests.modeling.fixtures import corpus

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    # Trained on words (as SentencePiece does: no piece spans a space), "\n" in the alphabet.
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=["\n"], show_progress=False)
    bpe.train_from_iterator(corpus(), trainer)
    if legacy:
        bpe.pre_tokenizer = None
        bpe.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        bpe.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<image>"])


@pytest.mark.parametrize("kind", ["byte-level BPE", "metaspace", "llama-legacy"])
def test_segments_tokenize_like_the_whole_conversation(kind: str) -> None:
    tok = tokenizer() if kind == "byte-level BPE" else _sentencepiece_style_tokenizer(legacy=kind == "llama-legacy")
    answer = world(1)[0].metadata["brief_caption"]
    conv = [{"from": "human", "value": f"<image>\n{CAPTION_INSTRUCTION}"}, {"from": "gpt", "value": answer}]
    enc = encode_conversation(conv, tok, "vicuna_v1", 512, 1)  # 1 image token: ids comparable to plain tokenization
    whole = tok(generation_prompt("vicuna_v1", CAPTION_INSTRUCTION) + f" {answer}</s>")["input_ids"]
    assert enc.input_ids == whole
    assert [tok.decode(run) for run in _supervised_runs(enc.labels)][0].strip() == f"{answer}</s>"

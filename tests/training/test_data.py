"""Training examples per stage: templates, caption sources, the SFT mix, VQA prompts, flags, rank split, resume."""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from typing import Any

import pytest

from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
from sharegpt4v.config import load_recipe
from sharegpt4v.data.shards import open_dataset, sample_meta
from sharegpt4v.modeling.templates import IGNORE_INDEX, SYSTEM_PROMPT, encode_conversation
from sharegpt4v.training.conversations import CAPTIONS, CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX, VQA, vqa_conversation
from sharegpt4v.training.data import (
    Position,
    RawExample,
    StageInputs,
    build_index,
    encode_examples,
    iter_examples,
    rank_windows,
)
from tests.modeling.fixtures import IMAGE_TOKENS
from tests.training.conftest import is_error, seed_caption


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    from tests.modeling.fixtures import tokenizer as make

    return make()


# The tiny profile mixes short questions into captioner training; these tests look at the captions alone.
CAPTIONS_ONLY = ("captioner.mix.captions=1", "captioner.mix.vqa=0")


def recipe(*overrides: str) -> Any:
    return load_recipe("tiny", list(overrides))


def take(index: Any, stage: Any, n: int, start: Position | None = None, rank: int = 0, world: int = 1) -> list[RawExample]:
    stream = iter_examples(index, stage, 0, rank, world, start or Position())
    return [next(stream) for _ in range(n)]


def supervised_text(conversation: list[dict[str, str]], template: str) -> str:
    tok = tokenizer()
    enc = encode_conversation(conversation, tok, template, 512, IMAGE_TOKENS)
    # vicuna_v1 answers follow "ASSISTANT:" after a space, which byte-level BPE keeps in the answer's first token
    return tok.decode([t for t in enc.labels if t != IGNORE_INDEX]).replace("</s> ", "</s>").strip(" ")


def world_meta(world: str, split: str = "train") -> dict[str, dict[str, Any]]:
    return {sample_meta(s)["id"]: sample_meta(s) for s in open_dataset(world).samples(split)}


def test_captioner_trains_on_seed_captions_joined_by_id(world: str, seed_captions: str) -> None:
    stage = recipe(*CAPTIONS_ONLY).captioner
    index = build_index("captioner", stage, StageInputs([world], seed_captions))
    train_ids = set(world_meta(world))
    errors = {i for i in train_ids if is_error(i)}
    assert errors and index.caption_set["error"] == len(errors) and index.caption_set["ok"] == len(train_ids - errors)
    assert len(index) == len(train_ids - errors)  # error records are skipped and counted, not trained on
    examples = take(index, stage, len(index))
    assert {e.id for e in examples} == train_ids - errors
    for ex in examples[:10]:
        human, gpt = ex.conversation
        assert human["value"] == f"<image>\n{CAPTION_INSTRUCTION}"
        assert gpt["value"] == seed_caption(ex.id)
        # vicuna_v1: the answer and its </s> are supervised, system prompt and instruction are not
        assert supervised_text(ex.conversation, "vicuna_v1") == seed_caption(ex.id) + "</s>"
    enc = encode_conversation(examples[0].conversation, tokenizer(), "vicuna_v1", 512, IMAGE_TOKENS)
    assert tokenizer().decode(enc.input_ids).startswith(f"<s>{SYSTEM_PROMPT} USER: <image>")


def test_captioner_without_caption_set_uses_the_world_caption_field(world: str) -> None:
    stage = recipe(*CAPTIONS_ONLY, "captioner.caption_field=brief_caption").captioner
    index = build_index("captioner", stage, StageInputs([world]))
    meta = world_meta(world)
    assert len(index) == len(meta)
    for ex in take(index, stage, 5):
        assert ex.conversation[1]["value"] == meta[ex.id]["brief_caption"]


def test_captioner_mixes_short_questions_with_its_seed_captions(world: str, seed_captions: str) -> None:
    r = recipe("captioner.mix={captions: 3, vqa: 1, conversations: 0}")
    index = build_index("captioner", r.captioner, StageInputs([world], seed_captions))
    c = index.counts
    assert c["examples.vqa"] > 0 and abs(c["examples.captions"] - 3 * c["examples.vqa"]) <= 3  # 3 : 1, rounded
    examples = take(index, r.captioner, len(index))
    captions = [e for e in examples if e.conversation[0]["value"] == f"<image>\n{CAPTION_INSTRUCTION}"]
    assert len(captions) == c["examples.captions"] and all(e.conversation[1]["value"] == seed_caption(e.id) for e in captions)


@pytest.mark.parametrize("field", ["detailed_caption", "brief_caption"])
def test_pretrain_plain_template_with_detailed_or_brief_captions(world: str, field: str) -> None:
    stage = recipe(f"pretrain.caption_field={field}").pretrain
    assert stage.template == "plain"
    index = build_index("pretrain", stage, StageInputs([world]))
    meta = world_meta(world)
    examples = take(index, stage, 6)
    batch = encode_examples(examples, tokenizer(), stage.template, 256, IMAGE_TOKENS, 32, stage.image_aspect,
                            tokenizer().pad_token_id)
    assert batch.pixel_values.shape == (6, 3, 32, 32)
    for row, ex in enumerate(examples):
        caption = meta[ex.id][field]
        labels = [t for t in batch.labels[row].tolist() if t != IGNORE_INDEX]
        assert tokenizer().decode(labels) == caption + "\n"  # plain: caption + newline, nothing else supervised
        text = tokenizer().decode([t for t in batch.input_ids[row].tolist() if t != tokenizer().pad_token_id])
        assert CAPTION_INSTRUCTION not in text and text.startswith("<s><image>")  # plain keeps only the image


def test_vqa_prompts_use_the_paper_suffixes() -> None:
    yes_no = {"kind": "yesno", "question": "Is there a red circle in the image?", "answer": "yes"}
    choice = {"kind": "mc", "question": "What colour is the square?", "answer": "C",
              "options": ["red", "blue", "green", "white"]}
    short = {"kind": "short", "question": "How many objects are there?", "answer": "three"}
    assert vqa_conversation(yes_no) == [
        {"from": "human", "value": f"<image>\nIs there a red circle in the image?\n{SHORT_ANSWER_SUFFIX}"},
        {"from": "gpt", "value": "yes"}]
    assert vqa_conversation(choice)[0]["value"] == (
        f"<image>\nWhat colour is the square?\nA. red\nB. blue\nC. green\nD. white\n{CHOICE_SUFFIX}")
    assert vqa_conversation(choice)[1]["value"] == "C"
    assert vqa_conversation({**choice, "kind": "choice", "answer": "green"})[1]["value"] == "C"  # text -> letter
    assert vqa_conversation(short)[0]["value"].endswith(f"\n{SHORT_ANSWER_SUFFIX}")
    assert SHORT_ANSWER_SUFFIX == "Answer the question using a single word or phrase."
    assert CHOICE_SUFFIX == "Answer with the option's letter from the given choices directly."


def test_sft_vqa_labels_decode_to_the_answers(world: str) -> None:
    stage = recipe().sft
    index = build_index("sft", stage, StageInputs([world]))
    assert index.counts["examples.vqa"] == len(index) and index.counts["missing_kind.conversations"] == 1
    meta = world_meta(world)
    kinds = Counter()
    for ex in take(index, stage, 60):
        sample_id, _, q = ex.id.rpartition("-q")
        item = next(i for i in meta[sample_id]["vqa"] if i["qid"] == ex.id)
        kinds[item["kind"]] += 1
        answer = ex.conversation[1]["value"]
        assert answer == item["answer"]
        assert supervised_text(ex.conversation, "vicuna_v1") == answer + "</s>"
        suffix = CHOICE_SUFFIX if item["kind"] == "mc" else SHORT_ANSWER_SUFFIX
        assert ex.conversation[0]["value"].endswith(suffix)
    assert set(kinds) == {"yesno", "mc", "short"}


@pytest.mark.parametrize("where", ["after", "before"])
def test_yes_no_reasons_answer_with_the_deciding_fact(world: str, where: str) -> None:
    stage = recipe(f"sft.yes_no_reasons={where}").sft
    meta = world_meta(world)
    kinds = Counter()
    for ex in take(build_index("sft", stage, StageInputs([world])), stage, 60):
        item = next(i for i in meta[ex.id.rpartition("-q")[0]]["vqa"] if i["qid"] == ex.id)
        kinds[item["kind"]] += 1
        want = item["answer"]
        if item["kind"] == "yesno":
            want = f"{item['answer']}, {item['reason']}." if where == "after" else f"{item['reason']}, so {item['answer']}."
        assert supervised_text(ex.conversation, "vicuna_v1") == want + "</s>"  # the prompt is unchanged
        assert ex.conversation[0]["value"].endswith(CHOICE_SUFFIX if item["kind"] == "mc" else SHORT_ANSWER_SUFFIX)
    assert kinds["yesno"] > 0 and kinds["short"] > 0
    # an item without a reason (an ingested dataset's) keeps its plain answer
    assert vqa_conversation({"kind": "yesno", "question": "Is it red?", "answer": "yes"}, reasons=where)[1]["value"] == "yes"


def test_vqa_repeats_choose_how_often_each_question_kind_trains(world: str) -> None:
    meta = world_meta(world)
    every = build_index("sft", recipe().sft, StageInputs([world]))
    yes_no = sum(1 for m in meta.values() for i in m["vqa"] if i["kind"] == "yesno")
    only = recipe("sft.vqa_repeats={yesno: 1, short: 0, mc: 0}").sft
    index = build_index("sft", only, StageInputs([world]))
    assert index.counts["examples.vqa"] == yes_no
    assert index.counts["left_out.vqa_kind"] == every.counts["examples.vqa"] - yes_no > 0
    for ex in take(index, only, 40):
        assert next(i for i in meta[ex.id.rpartition("-q")[0]]["vqa"] if i["qid"] == ex.id)["kind"] == "yesno"
    twice = build_index("sft", recipe("sft.vqa_repeats.yesno=2").sft, StageInputs([world]))
    assert twice.counts["examples.vqa"] == every.counts["examples.vqa"] + yes_no
    assert Counter(twice.examples) == Counter(every.examples) + Counter(index.examples)
    with pytest.raises(ValueError, match="vqa_repeats"):
        recipe("sft.vqa_repeats={yesno: 0, short: 0, mc: 0}")
    with pytest.raises(ValueError, match="vqa_repeats"):
        recipe("sft.vqa_repeats.mc=-1")


def test_sft_mix_weights_are_respected(world: str, llava_json: str) -> None:
    r = recipe("sft.mix={vqa: 3, captions: 1, conversations: 1}")
    index = build_index("sft", r.sft, StageInputs([world, llava_json]))
    c = index.counts
    # 11 usable conversation records (one is malformed: counted) bound the mix: 3 : 1 : 1 of 55
    assert c["skipped.malformed_conversation"] == 1
    assert (c["examples.vqa"], c["examples.captions"], c["examples.conversations"]) == (33, 11, 11)
    assert len(index.shards) == len(open_dataset(world).shard_uris("train")) + 1  # the JSON dataset has no splits
    examples = take(index, r.sft, len(index))
    captions = [e for e in examples if e.conversation[0]["value"] == f"<image>\n{CAPTION_INSTRUCTION}"]
    meta = world_meta(world)
    assert len(captions) == 11 and all(e.conversation[1]["value"] == meta[e.id]["detailed_caption"] for e in captions)
    convs = [e for e in examples if e.id.endswith("/conversation")]
    assert len(convs) == 11
    multi = next(e for e in convs if len(e.conversation) == 4)
    assert multi.conversation[0]["value"] == "<image>\nWhat colour is the square?"  # image moved to the front
    assert supervised_text(multi.conversation, "vicuna_v1") == "It is red.</s>Large.</s>"
    # the same weights with a max_samples cap keep the proportions
    capped = build_index("sft", dataclasses.replace(r.sft, max_samples=20), StageInputs([world, llava_json]))
    assert (capped.counts["examples.vqa"], capped.counts["examples.captions"], capped.counts["examples.conversations"]) == (12, 4, 4)


def test_flagged_samples_are_kept_and_counted() -> None:
    tok = tokenizer()
    ok = RawExample("ok", vqa_conversation({"kind": "short", "question": "Q?", "answer": "a red square"}),
                    _png(), Position(0, 1))
    long = RawExample("long", [{"from": "human", "value": "<image>\n" + "describe " * 40},
                               {"from": "gpt", "value": "a long answer " * 30}], _png(), Position(0, 2))
    bad = RawExample("bad", ok.conversation, b"not an image", Position(0, 3))
    batch = encode_examples([ok, long, bad], tok, "vicuna_v1", 90, IMAGE_TOKENS, 32, "pad", tok.pad_token_id)
    assert batch.input_ids.shape[0] == 3  # nothing dropped
    assert batch.flags == Counter(truncated=1, fully_masked=2, bad_image=1)  # long: cut in the prompt, so also masked
    assert batch.flagged_ids == ["long", "bad"]
    assert (batch.labels[2] == IGNORE_INDEX).all() and (batch.labels[0] != IGNORE_INDEX).any()
    assert batch.position == Position(0, 3)


def test_ranks_get_disjoint_data_covering_the_epoch(world: str) -> None:
    stage = recipe().pretrain
    index = build_index("pretrain", stage, StageInputs([world]))
    n = len(index)
    for world_size in (1, 2, 3):
        per_rank = [[i for w in rank_windows(index, 0, 0, r, world_size) for i in w] for r in range(world_size)]
        flat = [i for ranks in per_rank for i in ranks]
        assert len(flat) == len(set(flat)) == n - n % world_size  # disjoint; at most W-1 left out
        assert all(len(p) == n // world_size for p in per_rank)
    assert rank_windows(index, 0, 0, 1, 2) == rank_windows(index, 0, 0, 1, 2)  # deterministic
    assert rank_windows(index, 0, 1, 1, 2) != rank_windows(index, 0, 0, 1, 2)  # reshuffled every epoch
    assert rank_windows(index, 1, 0, 1, 2) != rank_windows(index, 0, 0, 1, 2)  # and by seed


def test_stream_restarts_exactly_at_a_saved_position(world: str) -> None:
    stage = dataclasses.replace(recipe().pretrain, max_samples=40)
    index = build_index("pretrain", stage, StageInputs([world]))
    assert len(index) == 40 and len(index.shards) == len(open_dataset(world).shard_uris("train"))
    full = take(index, stage, 70, rank=1, world=2)  # 20 per rank and epoch: crosses three epochs
    assert [e.position for e in full[18:22]] == [Position(0, 19), Position(0, 20), Position(1, 1), Position(1, 2)]
    other = take(index, stage, 20, rank=0, world=2)
    assert len({e.id for e in full[:20]} | {e.id for e in other}) == 40  # the two ranks share the epoch out
    for k in (0, 7, 20, 33):
        again = take(index, stage, 70 - k - 1, start=full[k].position, rank=1, world=2)
        assert [e.id for e in again] == [e.id for e in full[k + 1:]]


def test_pretrain_from_caption_set_and_max_samples(world: str, seed_captions: str) -> None:
    stage = dataclasses.replace(recipe().pretrain, max_samples=10)
    index = build_index("pretrain", stage, StageInputs([world], seed_captions))
    assert len(index) == 10 and all(e[2] == CAPTIONS for e in index.examples)
    assert all(ex.conversation[1]["value"] == seed_caption(ex.id) for ex in take(index, stage, 10))
    assert VQA not in {e[2] for e in index.examples}


def _png() -> bytes:
    from tests.modeling.fixtures import png

    return png((40, 30), (200, 10, 10))


def test_prefetching_thread_yields_the_same_batches(world: str) -> None:
    import threading

    from sharegpt4v.training.data import iter_batches

    stage = dataclasses.replace(recipe().pretrain, max_samples=24)
    index = build_index("pretrain", stage, StageInputs([world]))
    args = (index, stage, 0, 0, 1, Position(0, 5), 4, tokenizer(), 256, IMAGE_TOKENS, 32)
    plain, ahead = iter_batches(*args), iter_batches(*args, prefetch=2)
    for _ in range(9):  # across an epoch boundary
        a, b = next(plain), next(ahead)
        assert a.ids == b.ids and a.position == b.position and (a.input_ids == b.input_ids).all()
    ahead.close()
    assert not any(t.name == "sharegpt4v-batches" for t in threading.enumerate())
    broken = dataclasses.replace(index, shards=["/nonexistent/shard.tar"] * len(index.shards))
    with pytest.raises(Exception, match="nonexistent"):
        next(iter_batches(broken, stage, 0, 0, 1, Position(), 4, tokenizer(), 256, IMAGE_TOKENS, 32, prefetch=2))

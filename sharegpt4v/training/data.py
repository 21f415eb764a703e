"""Training examples for the three stages, streamed from image shards.

An *index pass* streams the shards once and keeps, per training example, four small ints:
(shard, position of the sample in its shard, kind, item). Image bytes are never kept beyond
the current window; a caption set is held as an id -> caption dict.

Kinds of examples (LLaVA conversations, built in `training.conversations`): ``captions`` (a caption
set joined by id, or the world sample's `stage.caption_field`), ``vqa`` (one world VQA item) and
``conversations`` (the records that came with an ingested LLaVA JSON).

Order: every epoch shuffles the shards and, within windows of a few shards, the examples
(seeded by `recipe.seed` and the epoch). Rank `r` of `W` takes the `r`-th contiguous block of
`N // W` examples of the epoch order, so ranks see disjoint data whose union is the epoch
(minus at most `W - 1` examples), and each rank reads only about `1/W` of the shards. A
`Position(epoch, index)` (index = examples this rank consumed in that epoch) restores the
stream exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
from sharegpt4v.modeling.images import to_tensor
from sharegpt4v.modeling.templates import IGNORE_INDEX, SYSTEM_PROMPT, encode_conversation
from sharegpt4v.training.conversations import (
    CAPTIONS,
    CHOICE_SUFFIX,
    CONVERSATIONS,
    KINDS,
    SHORT_ANSWER_SUFFIX,
    VQA,
    example_conversation,
    example_id,
    normalise_conversation,
    valid_vqa,
    vqa_answer,
    vqa_prompt,
)

log = logging.getLogger("sharegpt4v.training")

WINDOW_SHARDS = 4  # shards whose examples are shuffled together (bounds the images held in memory)
_CORPUS_LIMIT = 20_000  # texts kept for training a tokenizer when the model is built from config
_FLAG_EXAMPLES = 5  # ids quoted in the log line about flagged samples


@dataclass
class StageInputs:
    """What a stage trains on. `data`: image-shard datasets (URIs); `captions`: a caption set."""

    data: list[str]
    captions: str | None = None
    split: str | None = "train"  # shards of this split; a dataset without it (ingested: "data") uses all

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ValueError("inputs.data: name at least one image-shard dataset")


@dataclass(frozen=True)
class Position:
    """Where a rank's data stream stands: `index` examples of epoch `epoch` consumed."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Position":
        return cls(int(data["epoch"]), int(data["index"]))


@dataclass
class DataIndex:
    """The examples of one stage: `(shard, position in shard, kind, item)` per example."""

    shards: list[str]
    examples: list[tuple[int, int, int, int]]
    captions: dict[str, str] | None
    counts: dict[str, int]  # examples by kind, skipped samples by reason
    datasets: list[dict[str, Any]]  # {"uri", "digest", "shards", "split"} per input dataset
    caption_set: dict[str, Any] | None = None  # {"uri", "digest", "ok", "error"}
    corpus: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def digest(self) -> str:
        """Identifies the example list (shard URIs + examples): a resumed run checks it did not change."""
        h = hashlib.sha256()
        h.update(json.dumps(self.shards).encode())
        for ex in self.examples:
            h.update(b"%d,%d,%d,%d;" % ex)
        return h.hexdigest()[:32]


# the index pass --------------------------------------------------------------------------------


def load_caption_set(uri: str) -> tuple[dict[str, str], dict[str, Any]]:
    """id -> caption for the ok records of a complete caption set; error records are counted, not used."""
    from sharegpt4v import storage
    from sharegpt4v.captioning.job import iter_caption_records

    captions: dict[str, str] = {}
    errors = Counter()
    for record in iter_caption_records(uri):
        caption = record.get("caption")
        if record.get("status") == "ok" and isinstance(caption, str) and caption.strip():
            captions[str(record["id"])] = caption.strip()
        else:
            errors[str(record.get("reason") or "empty")] += 1
    manifest = storage.open_store(uri).read_manifest()
    info = {"uri": uri, "digest": storage.manifest_digest(manifest), "ok": len(captions), "error": sum(errors.values()),
            "error_reasons": dict(sorted(errors.items()))}
    return captions, info


def _split_shards(dataset: Any, split: str | None) -> tuple[list[str], str | None]:
    if split is not None and any(s["split"] == split for s in dataset.shards):
        return dataset.shard_uris(split), split
    return dataset.shard_uris(), None


def _mix_targets(pools: dict[int, int], mix: dict[str, float], max_samples: int | None) -> dict[int, int]:
    """Examples per kind: proportions by `mix` over the kinds that have data, as many as the pools allow."""
    weights = {k: float(mix.get(KINDS[k], 0.0)) for k in pools}
    active = {k: w for k, w in weights.items() if w > 0 and pools[k] > 0}
    if not active:
        return {}
    total_w = sum(active.values())
    share = {k: w / total_w for k, w in active.items()}
    total = min(pools[k] / share[k] for k in active)
    if max_samples is not None:
        total = min(total, max_samples)
    targets = {k: min(pools[k], int(math.floor(share[k] * total + 1e-9))) for k in active}
    # Rounding leftovers go to the kinds with the largest remainders, within their pools.
    left = int(math.floor(total + 1e-9)) - sum(targets.values())
    for k in sorted(active, key=lambda k: -(share[k] * total - targets[k])):
        if left <= 0:
            break
        if targets[k] < pools[k]:
            targets[k] += 1
            left -= 1
    return {k: n for k, n in targets.items() if n > 0}


def build_index(stage_name: str, stage: Any, inputs: StageInputs, seed: int = 0) -> DataIndex:
    """Stream the shards once and list this stage's examples (see module docstring)."""
    from sharegpt4v import storage
    from sharegpt4v.data.shards import iter_shard, open_dataset

    captions, caption_info = (None, None)
    if inputs.captions:
        captions, caption_info = load_caption_set(inputs.captions)
    # SFT mixes its kinds by `stage.mix`; the captioner too (its seed captions, optionally with short
    # grounded questions about the same images); pretraining reads captions only.
    sft = stage_name in ("sft", "captioner")
    mix = dict(stage.mix) if sft else {"captions": 1.0}
    want = {KINDS.index(k) for k, w in mix.items() if w > 0}
    counts: Counter = Counter()
    pools: dict[int, list[tuple[int, int, int, int]]] = {CAPTIONS: [], VQA: [], CONVERSATIONS: []}
    corpus: list[str] = [SYSTEM_PROMPT, CAPTION_INSTRUCTION, SHORT_ANSWER_SUFFIX, CHOICE_SUFFIX]
    shards: list[str] = []
    datasets = []

    def enough() -> bool:
        if stage.max_samples is None:
            return False
        if not sft:
            return len(pools[CAPTIONS]) >= stage.max_samples
        total_w = sum(mix.get(KINDS[k], 0.0) for k in want)
        return all(len(pools[k]) >= math.ceil(mix[KINDS[k]] / total_w * stage.max_samples) for k in want)

    done = False
    for uri in inputs.data:
        dataset = open_dataset(uri)
        uris, used_split = _split_shards(dataset, inputs.split)
        datasets.append({"uri": dataset.uri, "digest": storage.manifest_digest(dataset.manifest), "shards": len(uris),
                         "split": used_split})
        for shard_uri in uris:
            shards.append(shard_uri)
            if done:
                continue
            shard = len(shards) - 1
            for ordinal, sample in enumerate(iter_shard(shard_uri)):
                if not any(ext in sample for ext in ("png", "jpg", "jpeg", "webp")):
                    counts["skipped.no_image"] += 1
                    continue
                meta = json.loads(sample["json"]) if "json" in sample else {}
                sid = str(meta.get("id") or sample["__key__"])
                if len(corpus) < _CORPUS_LIMIT:
                    corpus.extend(_texts(meta))
                _index_sample(shard, ordinal, sid, meta, stage, captions, want, pools, counts)
            if enough():
                done = True  # max_samples reached: later shards are listed but not read
    if sft:
        targets = _mix_targets({k: len(v) for k, v in pools.items()}, mix, stage.max_samples)
        for k in want:
            if not pools[k]:
                counts[f"missing_kind.{KINDS[k]}"] += 1
                log.warning("%s: mix weight %s for %r but the data has no such examples; mixing the others",
                            stage_name, mix[KINDS[k]], KINDS[k])
        examples = []
        for k, n in targets.items():
            chosen = pools[k]
            if n < len(chosen):  # an even, seeded subset of the pool
                rng = random.Random(f"mix:{seed}:{k}")
                chosen = sorted(rng.sample(chosen, n))
            examples += chosen
        examples.sort()
    else:
        examples = pools[CAPTIONS][: stage.max_samples] if stage.max_samples else pools[CAPTIONS]
    for k in range(len(KINDS)):
        counts[f"examples.{KINDS[k]}"] = sum(1 for e in examples if e[2] == k)
    if captions is not None:
        corpus.extend(list(captions.values())[:_CORPUS_LIMIT])
    if not examples:
        raise ValueError(f"{stage_name}: no training examples in {inputs.data} (skipped: {dict(counts)})")
    return DataIndex(shards, examples, captions, dict(sorted(counts.items())), datasets, caption_info, corpus)


def _texts(meta: dict[str, Any]) -> list[str]:
    texts = [meta[k] for k in ("detailed_caption", "brief_caption") if isinstance(meta.get(k), str)]
    for item in meta.get("vqa") or []:
        if valid_vqa(item):
            texts.append(f"{vqa_prompt(item)} {vqa_answer(item)}")
    for turn in meta.get("conversations") or []:
        if isinstance(turn, dict) and isinstance(turn.get("value"), str):
            texts.append(turn["value"])
    return texts


# a world item's kind as `StageConfig.vqa_repeats` names it (ingested items without one are short answers)
_VQA_KIND_NAMES = {"yesno": "yesno", "mc": "mc", "choice": "mc"}


def _index_sample(shard: int, ordinal: int, sid: str, meta: dict[str, Any], stage: Any, captions: dict[str, str] | None,
                  want: set[int], pools: dict[int, list[tuple[int, int, int, int]]], counts: Counter) -> None:
    if CAPTIONS in want:
        if captions is not None:
            if sid in captions:
                pools[CAPTIONS].append((shard, ordinal, CAPTIONS, -1))
            else:
                counts["skipped.no_caption_record"] += 1
        elif isinstance(meta.get(stage.caption_field), str) and meta[stage.caption_field].strip():
            pools[CAPTIONS].append((shard, ordinal, CAPTIONS, -1))
        else:
            counts[f"skipped.no_{stage.caption_field}"] += 1
    if VQA in want:
        for j, item in enumerate(meta.get("vqa") or []):
            if not valid_vqa(item):
                counts["skipped.malformed_vqa"] += 1
            else:
                repeats = stage.vqa_repeats[_VQA_KIND_NAMES.get(item.get("kind"), "short")]
                pools[VQA].extend([(shard, ordinal, VQA, j)] * repeats)
                counts["left_out.vqa_kind"] += repeats == 0
    if CONVERSATIONS in want and meta.get("conversations") is not None:
        conversation = normalise_conversation(meta["conversations"])
        if conversation is None or (stage.template == "plain" and len(conversation) != 2):
            counts["skipped.malformed_conversation"] += 1
        else:
            pools[CONVERSATIONS].append((shard, ordinal, CONVERSATIONS, 0))


def caption_for(index: DataIndex, stage: Any, sid: str, meta: dict[str, Any]) -> str | None:
    if index.captions is not None:
        return index.captions.get(sid)
    value = meta.get(stage.caption_field)
    return value.strip() if isinstance(value, str) else None


# order, rank split and the stream -----------------------------------------------------------------


def rank_windows(index: DataIndex, seed: int, epoch: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's examples for `epoch` (indices into `index.examples`), as shuffled windows.

    The epoch order is the shards in a seeded order, each shard's examples in shard order; rank
    `r` takes the `r`-th contiguous block of `N // W`; the block is cut into windows of
    `WINDOW_SHARDS` shards whose examples are shuffled together.
    """
    per_rank = len(index.examples) // world_size
    if per_rank < 1:
        raise ValueError(f"{len(index.examples)} examples cannot be split over {world_size} processes")
    by_shard: dict[int, list[int]] = {}
    for i, ex in enumerate(index.examples):
        by_shard.setdefault(ex[0], []).append(i)
    order = sorted(by_shard)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    flat = [i for s in order for i in by_shard[s]]
    block = flat[rank * per_rank:(rank + 1) * per_rank]
    windows: list[list[int]] = []
    current: list[int] = []
    seen: list[int] = []
    for i in block:
        shard = index.examples[i][0]
        if not seen or seen[-1] != shard:
            if len(seen) == WINDOW_SHARDS:
                windows.append(current)
                current, seen = [], []
            seen.append(shard)
        current.append(i)
    if current:
        windows.append(current)
    for w, window in enumerate(windows):
        random.Random(f"window:{seed}:{epoch}:{rank}:{w}").shuffle(window)
    return windows


def _load_window(index: DataIndex, window: list[int]) -> dict[tuple[int, int], tuple[dict[str, Any], bytes]]:
    """(meta, image bytes) of the samples the window needs, reading each shard only up to the last one."""
    from sharegpt4v.data.shards import iter_shard, sample_image

    needed: dict[int, set[int]] = {}
    for i in window:
        shard, ordinal = index.examples[i][:2]
        needed.setdefault(shard, set()).add(ordinal)
    loaded: dict[tuple[int, int], tuple[dict[str, Any], bytes]] = {}
    for shard in sorted(needed):
        wanted, last = needed[shard], max(needed[shard])
        stream = iter_shard(index.shards[shard])
        try:
            for ordinal, sample in enumerate(stream):
                if ordinal in wanted:
                    meta = json.loads(sample["json"]) if "json" in sample else {}
                    loaded[(shard, ordinal)] = (meta, sample_image(sample)[1])
                if ordinal >= last:
                    break
        finally:
            stream.close()
        missing = [o for o in wanted if (shard, o) not in loaded]
        if missing:
            raise ValueError(f"{index.shards[shard]}: samples {sorted(missing)[:5]} are gone; the shard changed since indexing")
    return loaded


@dataclass
class RawExample:
    id: str
    conversation: list[dict[str, str]]
    image: bytes
    position: Position  # the stream position after this example


def iter_examples(index: DataIndex, stage: Any, seed: int, rank: int, world_size: int,
                  start: Position = Position()) -> Iterator[RawExample]:
    """This rank's endless stream of examples from `start`, epoch after epoch."""
    epoch, skip = start.epoch, start.index
    while True:
        windows = rank_windows(index, seed, epoch, rank, world_size)
        offset = 0
        for window in windows:
            if skip >= offset + len(window):  # before the start: not even read
                offset += len(window)
                continue
            loaded = _load_window(index, window)
            for j in range(max(0, skip - offset), len(window)):
                shard, ordinal, kind, item = index.examples[window[j]]
                meta, image = loaded[(shard, ordinal)]
                sid = str(meta.get("id") or "")
                caption = caption_for(index, stage, sid, meta) if kind == CAPTIONS else None
                conversation = example_conversation(kind, item, meta, caption, stage.yes_no_reasons)
                yield RawExample(example_id(kind, item, sid, meta), conversation, image, Position(epoch, offset + j + 1))
            offset += len(window)
        epoch, skip = epoch + 1, 0


# encoding and batches ---------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    ids: list[str]
    position: Position  # after the batch
    flags: Counter  # fully_masked / truncated / bad_image in this batch
    flagged_ids: list[str]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def supervised_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels,
                "pixel_values": self.pixel_values}


def encode_examples(examples: list[RawExample], tokenizer: Any, template: str, max_length: int, image_tokens: int,
                    image_size: int, aspect: str, pad_id: int) -> Batch:
    """Tokenize, mask and pad (right) a micro-batch; flagged samples are kept and counted, never dropped.

    A sample whose image does not decode keeps its place with a blank image and no supervised
    token (so the batch keeps its shape) and is counted as `bad_image`.
    """
    flags: Counter = Counter()
    flagged: list[str] = []
    rows, pixels = [], []
    for ex in examples:
        enc = encode_conversation(ex.conversation, tokenizer, template, max_length, image_tokens)
        labels = enc.labels
        try:
            pixels.append(to_tensor(ex.image, image_size, aspect))  # type: ignore[arg-type]
        except ValueError:
            pixels.append(torch.zeros(3, image_size, image_size))
            labels = [IGNORE_INDEX] * len(labels)
            flags["bad_image"] += 1
        masked = all(label == IGNORE_INDEX for label in labels[1:])
        if masked:
            flags["fully_masked"] += 1
        if enc.truncated:
            flags["truncated"] += 1
        if masked or enc.truncated:
            flagged.append(ex.id)
        rows.append((enc.input_ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, labels) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[r, : len(ids)] = 1
        labels_t[r, : len(labels)] = torch.tensor(labels, dtype=torch.long)
    return Batch(input_ids, attention, labels_t, torch.stack(pixels), [ex.id for ex in examples],
                 examples[-1].position, flags, flagged)


def iter_batches(index: DataIndex, stage: Any, seed: int, rank: int, world_size: int, start: Position, micro_batch: int,
                 tokenizer: Any, max_length: int, image_tokens: int, image_size: int, prefetch: int = 0) -> Iterator[Batch]:
    """Encoded micro-batches from `start`; with `prefetch > 0` a background thread prepares that many ahead
    (reading shards, decoding images and tokenising overlap the training step; the order is unchanged)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def produce() -> Iterator[Batch]:
        stream = iter_examples(index, stage, seed, rank, world_size, start)
        while True:
            chunk = [next(stream) for _ in range(micro_batch)]
            yield encode_examples(chunk, tokenizer, stage.template, max_length, image_tokens, image_size,
                                  stage.image_aspect, pad_id)

    if prefetch <= 0:
        yield from produce()
        return
    yield from _prefetched(produce(), prefetch)


def _prefetched(source: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run `source` in a daemon thread, `depth` items ahead; its exceptions surface here."""
    import queue
    import threading

    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        items.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            items.put(("error", exc))

    thread = threading.Thread(target=work, name="sharegpt4v-batches", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "error":
                raise value
            yield value
    finally:
        # Let the thread finish the batch it is on: a thread killed inside native code at interpreter
        # exit can abort the process.
        stop.set()
        thread.join(timeout=120)


def held_out_images(inputs: StageInputs, count: int = 4, exclude: set[str] | None = None) -> list[tuple[str, bytes]]:
    """A few images not trained on, for sample generations: a val/test split when there is one."""
    from sharegpt4v.data.shards import iter_shard, open_dataset, sample_image, sample_meta

    out: list[tuple[str, bytes]] = []
    for uri in inputs.data:
        dataset = open_dataset(uri)
        for split in ("val", "test"):
            for shard_uri in dataset.shard_uris(split):
                for sample in iter_shard(shard_uri):
                    sid = str(sample_meta(sample).get("id") or sample["__key__"]) if "json" in sample else sample["__key__"]
                    if exclude and sid in exclude:
                        continue
                    out.append((sid, sample_image(sample)[1]))
                    if len(out) >= count:
                        return out
    return out

"""Stand-ins for the pretrained parts LLaVA starts from, for models built from config (the tiny profile).

ShareGPT4V starts from CLIP ViT-L/14-336 (trained contrastively on web image / alt-text pairs) and
Vicuna (a language model). A model built from config has neither, and a tiny LLaVA whose vision tower
is random does not learn to name shapes in a few hundred steps (RECIPE.md; the README's science
section). So a model built from config gets both first, from the training split of the world:

- `train_vision_tower`: a CLIP vision tower trained with CLIP's symmetric contrastive loss on
  image <-> alt-text pairs. The alt text names the objects and the background, as web alt text
  does ("red circle, blue square, white background"): no positions, sizes or counts, which is what
  detailed captions add later. A bag-of-words text tower is trained beside it and dropped. Saved
  as a `CLIPVisionModel` folder (safetensors) for `model.vision.path`.
- `train_language_model`: a Llama trained on the world's text (captions, questions and answers),
  with the BPE tokenizer trained on the same text; then (`train_language_qa`, if
  `foundations.language_qa_steps`) tuned on text conversations, as Vicuna is: the world's questions
  answered from a plain statement of the scene ("There is a red circle in the top left corner. ...").
  Saved with its tokenizer for `model.language.path`.

`build_foundations` makes both (once: a complete folder is reused) and returns the recipe overrides
that make every later stage build its LLaVA from them, as the 7B profile builds from CLIP + Vicuna.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("sharegpt4v.training")

VISION_FOLDER, LANGUAGE_FOLDER = "vision", "language"


def alt_text(scene: dict[str, Any], rng: random.Random, detail: str = "names") -> str:
    """What web alt text would say about a world image: its objects and background, in any order.

    `detail`: "names" (red circle), "names+size" (large red circle), "names+size+position" (large red
    circle top left); "+texture" also names the background's texture (striped blue background).
    """
    def name(o: dict[str, Any]) -> str:
        words = [o["size"]] if "size" in detail else []
        words += [o["colour"], o["shape"]]
        if "position" in detail:
            from sharegpt4v.world.vocab import position_name

            words.append(position_name(int(o["row"]), int(o["col"])))
        return " ".join(words)

    names = [name(o) for o in scene["objects"]]
    rng.shuffle(names)
    background = scene["background"]
    if "texture" in detail:
        background = _TEXTURED[scene["texture"]].format(background)
    return ", ".join([*names, f"{background} background"])


# How alt text says a background's texture ("{}" is its colour): the words the world's captions use.
_TEXTURED = {"plain": "plain {}", "gradient": "{} gradient", "stripes": "striped {}", "dots": "dotted {}",
             "noise": "grainy {}"}


def scene_statement(scene: dict[str, Any], rng: random.Random) -> str:
    """The scene said plainly, in the words the world's questions use, objects in any order:
    "There is a red circle in the top left corner. ... The background is white."."""
    from sharegpt4v.world.vocab import position_name
    from sharegpt4v.world.vqa import CELL_PHRASES, with_article

    objects = list(scene["objects"])
    rng.shuffle(objects)
    said = [f"There is {with_article(o['colour'] + ' ' + o['shape'])} {CELL_PHRASES[position_name(int(o['row']), int(o['col']))]}."
            for o in objects]
    return " ".join([*said, f"The background is {scene['background']}."])


def text_qa_conversation(statement: str, item: dict[str, Any]) -> list[dict[str, str]]:
    """A text-only chat: the statement stands where the image will, then the question as the chat models get it."""
    from sharegpt4v.training.conversations import vqa_answer, vqa_prompt

    return [{"from": "human", "value": f"{statement}\n{vqa_prompt(item)}"}, {"from": "gpt", "value": vqa_answer(item)}]


@dataclass
class WorldImages:
    """The split's images as CLIP-normalised tensors, with their scenes and texts (held in memory)."""

    pixels: torch.Tensor  # [N, 3, S, S]
    scenes: list[dict[str, Any]]
    texts: list[str]  # captions and question/answer lines: the language model's corpus
    questions: list[list[dict[str, Any]]]  # each scene's world questions (its `vqa` items)

    def text_qa(self) -> list[list[dict[str, str]]]:
        """One text QA conversation (`text_qa_conversation`) per question, its scene stated first."""
        conversations = []
        for scene, items in zip(self.scenes, self.questions):
            rng = random.Random(f"statement:{scene.get('id')}")
            conversations += [text_qa_conversation(scene_statement(scene, rng), item) for item in items]
        return conversations


def load_world_images(dataset_uri: str, split: str, image_size: int, limit: int | None = None) -> WorldImages:
    from sharegpt4v.data.shards import open_dataset, sample_image, sample_meta
    from sharegpt4v.modeling.images import to_tensor
    from sharegpt4v.training.conversations import vqa_answer, vqa_prompt

    pixels, scenes, texts, questions = [], [], [], []
    for sample in open_dataset(dataset_uri).samples(split):
        meta = sample_meta(sample)
        if "scene" not in meta:
            raise ValueError(f"{dataset_uri}: sample {meta.get('id')} has no scene: foundations need a synthetic world "
                             "(set model.vision.path and model.language.path for real data)")
        pixels.append(to_tensor(sample_image(sample)[1], image_size, "crop"))
        scenes.append(meta["scene"])
        texts += [meta["brief_caption"], meta["detailed_caption"]]
        texts += [f"{vqa_prompt(item)} {vqa_answer(item)}" for item in meta.get("vqa", [])]
        questions.append(meta.get("vqa", []))
        if limit is not None and len(scenes) >= limit:
            break
    if not scenes:
        raise ValueError(f"{dataset_uri}: no {split!r} images to train the foundations on")
    return WorldImages(torch.stack(pixels), scenes, texts, questions)


def _lr(step: int, total: int, base: float) -> float:
    """5% linear warmup, cosine to zero."""
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    """One AdamW step at `lr`, gradients clipped to norm 1 (every foundation loop's)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _batches(n: int, batch: int, rng: random.Random) -> Iterator[list[int]]:
    order: list[int] = []
    while True:
        if len(order) < batch:
            order += rng.sample(range(n), n)
        yield [order.pop() for _ in range(batch)]


def train_vision_tower(recipe: Any, world: WorldImages, tokenizer: Any, seed: int = 0) -> tuple[Any, dict[str, float]]:
    """A `CLIPVisionModel` sized by `recipe.model.vision`, trained contrastively on image <-> alt text."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    v, f = recipe.model.vision, recipe.foundations
    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size, projection_dim=v.hidden_size))
    with torch.no_grad():
        tower.embeddings.position_embedding.weight.normal_(0.0, f.vision_position_init_std)
    width = v.hidden_size
    text_tower = torch.nn.ModuleDict({
        "words": torch.nn.EmbeddingBag(len(tokenizer), width, mode="mean"),
        "mlp": torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width)),
        "image": torch.nn.Linear(width * (v.num_patches if f.vision_pooling == "flatten" else 1), width),
    })
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    params = [*tower.parameters(), *text_tower.parameters(), log_scale]
    optimizer = torch.optim.AdamW(params, lr=f.vision_learning_rate, weight_decay=0.0)
    rng = random.Random(f"clip:{seed}")
    batches = _batches(len(world.scenes), min(f.vision_batch_size, len(world.scenes)), rng)
    tower.train()
    started, loss = time.perf_counter(), torch.tensor(0.0)
    for step in range(f.vision_steps):
        rows = next(batches)
        texts = [alt_text(world.scenes[i], rng, f.vision_alt_text) for i in rows]
        hidden = tower(pixel_values=world.pixels[rows], output_hidden_states=True).hidden_states[v.feature_layer]
        tokens = hidden[:, 1:]  # the tokens LLaVA reads
        pooled = tokens.flatten(1) if f.vision_pooling == "flatten" else tokens.mean(1)
        image = F.normalize(text_tower["image"](pooled), dim=-1)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        flat = torch.tensor([t for row in ids for t in row])
        offsets = torch.tensor([0, *[len(row) for row in ids[:-1]]]).cumsum(0)
        text = F.normalize(text_tower["mlp"](text_tower["words"](flat, offsets)), dim=-1)
        logits = log_scale.exp().clamp(max=100.0) * image @ text.T
        # Identical alt texts in one batch are all positives (CLIP's loss with multi-positive targets).
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        targets = same / same.sum(1, keepdim=True)
        loss = -((targets * logits.log_softmax(1)).sum(1).mean() + (targets * logits.T.log_softmax(1)).sum(1).mean()) / 2
        _step(optimizer, loss, _lr(step, f.vision_steps, f.vision_learning_rate))
    tower.eval()
    return tower, {"vision.final_loss": float(loss.detach()), "vision.seconds": time.perf_counter() - started,
                   "vision.images": float(len(world.scenes))}


def train_language_model(recipe: Any, texts: list[str], seed: int = 0) -> tuple[Any, Any, dict[str, float]]:
    """(LlamaForCausalLM, tokenizer): a BPE tokenizer and a Llama trained on `texts` (next-token loss)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
    from sharegpt4v.modeling.templates import SYSTEM_PROMPT
    from sharegpt4v.modeling.tokenizer import train_tokenizer
    from sharegpt4v.training.conversations import CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX

    lang, f = recipe.model.language, recipe.foundations
    tokenizer = train_tokenizer([*texts, SYSTEM_PROMPT, CAPTION_INSTRUCTION, SHORT_ANSWER_SUFFIX, CHOICE_SUFFIX],
                                lang.vocab_size, lang.max_length)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=lang.hidden_size, intermediate_size=lang.intermediate_size,
        num_hidden_layers=lang.num_layers, num_attention_heads=lang.num_heads, num_key_value_heads=lang.num_heads,
        max_position_embeddings=lang.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        initializer_range=lang.initializer_range)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=f.language_learning_rate, weight_decay=0.0)
    rng = random.Random(f"language:{seed}")
    batches = _batches(len(texts), min(f.language_batch_size, len(texts)), rng)
    tokenizer.padding_side = "right"
    model.train()
    started, loss = time.perf_counter(), torch.tensor(0.0)
    for step in range(f.language_steps):
        enc = tokenizer([texts[i] for i in next(batches)], return_tensors="pt", padding=True, truncation=True,
                        max_length=lang.max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        _step(optimizer, loss, _lr(step, f.language_steps, f.language_learning_rate))
    tokenizer.padding_side = "left"
    model.eval()
    return model, tokenizer, {"language.final_loss": float(loss.detach()),
                              "language.seconds": time.perf_counter() - started, "language.texts": float(len(texts))}


def train_language_qa(recipe: Any, model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]],
                      seed: int = 0) -> dict[str, float]:
    """Tune `model` in place on text conversations in the chat models' template, answers only supervised."""
    from sharegpt4v.modeling.templates import IGNORE_INDEX, encode_conversation

    lang, f = recipe.model.language, recipe.foundations
    template, image_tokens = recipe.sft.template, recipe.model.image_tokens
    optimizer = torch.optim.AdamW(model.parameters(), lr=f.language_learning_rate, weight_decay=0.0)
    batches = _batches(len(conversations), min(f.language_batch_size, len(conversations)), random.Random(f"qa:{seed}"))
    model.train()
    started, loss = time.perf_counter(), torch.tensor(0.0)
    for step in range(f.language_qa_steps):
        rows = [encode_conversation(conversations[i], tokenizer, template, lang.max_length, image_tokens)
                for i in next(batches)]
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row.input_ids)] = torch.tensor(row.input_ids)
            attention[r, : len(row.input_ids)] = 1
            labels[r, : len(row.labels)] = torch.tensor(row.labels)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        _step(optimizer, loss, _lr(step, f.language_qa_steps, f.language_learning_rate))
    model.eval()
    return {"language_qa.final_loss": float(loss.detach()), "language_qa.seconds": time.perf_counter() - started,
            "language_qa.conversations": float(len(conversations))}


def _clip_processor(image_size: int) -> Any:
    """The image processor a CLIP checkpoint ships with (PIL backend: no torchvision)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from sharegpt4v.modeling.images import CLIP_MEAN, CLIP_STD

    return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def foundation_overrides(out: str) -> list[str]:
    """Recipe overrides that build every later stage's LLaVA from the foundations at `out`."""
    from sharegpt4v import storage

    return [f"model.vision.path={storage.join(out, VISION_FOLDER)}",
            f"model.language.path={storage.join(out, LANGUAGE_FOLDER)}"]


def build_foundations(recipe: Any, dataset_uri: str, out: str, seed: int | None = None) -> dict[str, Any]:
    """Train the vision tower and the language model on `dataset_uri` into `out/vision`, `out/language`.

    A complete `out` (manifest written last) is reused as it is. Returns the overrides that use them.
    """
    from sharegpt4v import storage, tracking
    from sharegpt4v.modeling.builder import save_model

    seed = recipe.seed if seed is None else seed
    store = storage.open_store(out)
    result = {"uri": out, "overrides": foundation_overrides(out)}
    if store.is_complete():
        return {**result, **store.read_manifest().get("metrics", {})}
    f = recipe.foundations
    params = {"dataset": dataset_uri, "out": out, "seed": seed,
              **{f"foundations.{k}": getattr(f, k) for k in vars(f)}}
    with tracking.stage_run("foundations", params, tags={"stage": "foundations", "output": out}):
        world = load_world_images(dataset_uri, f.split, recipe.model.vision.image_size)
        language, tokenizer, metrics = train_language_model(recipe, world.texts, seed)
        log.info("foundations: language model trained (%d texts, loss %.3f)", len(world.texts), metrics["language.final_loss"])
        if f.language_qa_steps:
            conversations = world.text_qa()
            metrics.update(train_language_qa(recipe, language, tokenizer, conversations, seed))
            log.info("foundations: language model tuned on %d text QA conversations (answer loss %.3f)",
                     len(conversations), metrics["language_qa.final_loss"])
        tower, vision_metrics = train_vision_tower(recipe, world, tokenizer, seed)
        metrics.update(vision_metrics)
        log.info("foundations: vision tower trained (%d images, loss %.3f)", len(world.scenes), metrics["vision.final_loss"])
        save_model(language, tokenizer, storage.join(out, LANGUAGE_FOLDER), kind="language-model")
        save_model(tower, _clip_processor(recipe.model.vision.image_size), storage.join(out, VISION_FOLDER),
                   kind="vision-tower")
        tracking.log_metrics(metrics)
        store.commit_folder("", files=[], kind="foundations", dataset=dataset_uri, seed=seed,
                            metrics={k: round(v_, 6) for k, v_ in metrics.items()})
    return {**result, **metrics}

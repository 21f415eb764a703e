"""Controls for the ablation: captions that carry no information about their own image.

`ShuffledCaptioner` answers every image with the detailed caption of another image of the same
split (a seeded derangement): the captions keep their words, length and style, but no longer
describe the picture they are paired with. Pretraining on them must fall to the brief arm or below;
if it does not, an arm's gain comes from the answer words, not from seeing.
"""

from __future__ import annotations

import random

from sharegpt4v.captioning.records import CaptionRequest, CaptionResult


def derangement(ids: list[str], seed: int) -> dict[str, str]:
    """id -> another id, every id used once, none mapped to itself (for >= 2 ids)."""
    if len(ids) < 2:
        raise ValueError("shuffling captions needs at least 2 images")
    order = sorted(ids)
    random.Random(f"shuffle:{seed}").shuffle(order)
    # A cyclic shift of a random order: a permutation without fixed points.
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}


class ShuffledCaptioner:
    """A `Captioner` whose caption for an image is the world's detailed caption of another image."""

    def __init__(self, dataset_uri: str, split: str | None, seed: int = 0, field: str = "detailed_caption"):
        from sharegpt4v.data.shards import open_dataset, sample_meta

        captions: dict[str, str] = {}
        for sample in open_dataset(dataset_uri).samples(split):
            meta = sample_meta(sample)
            captions[str(meta["id"])] = str(meta[field])
        self.donor = derangement(list(captions), seed)
        self.captions = captions
        self.name = f"shuffled-{field}(seed={seed})"

    def caption_batch(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        results = []
        for request in requests:
            donor = self.donor.get(request.id)
            if donor is None:
                results.append(CaptionResult.error(request.id, "unknown_image", f"{request.id} is not in the split"))
            else:
                results.append(CaptionResult(request.id, "ok", self.captions[donor], prompt_id=f"donor:{donor}"))
        return results


def shuffled_caption_set(dataset_uri: str, split: str | None, out: str, seed: int = 0) -> str:
    """A complete caption set at `out` with every image's caption taken from another image."""
    from sharegpt4v import storage
    from sharegpt4v.captioning.job import run_caption_job

    if not storage.open_store(out).is_complete():
        run_caption_job(dataset_uri, out, ShuffledCaptioner(dataset_uri, split, seed), batch_size=256, split=split,
                        progress=False)
    return out

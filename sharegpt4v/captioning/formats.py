"""Caption records <-> the ShareGPT4V/LLaVA conversation JSON used for training.

Export: every ok record becomes `{"id", "image", "conversations": [human: "<image>\\n" +
instruction, gpt: caption]}`; with the image dataset given, the images are written too, under
the `image` paths the JSON names. Import: an existing ShareGPT4V caption JSON (e.g. the
released ShareGPT4V-PT file) becomes a caption set that the rest of the platform reads.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sharegpt4v import storage
from sharegpt4v.captioning.job import CAPTION_SET_KIND, iter_caption_records
from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
from sharegpt4v.data.images import IMAGE_EXTENSIONS
from sharegpt4v.data.shards import open_dataset, put_jsonl, sample_image, sample_meta
from sharegpt4v.errors import PlatformError


class FormatError(PlatformError, ValueError):
    pass


def _image_path(record_id: str, ext: str | None) -> str:
    """A safe relative path for an image: the id itself when it already names an image file."""
    path = storage.check_key(record_id)
    if path.lower().endswith(IMAGE_EXTENSIONS) or ext is None:
        return path
    return f"{path}.{ext}"


def export_conversations(
    records_uri: str,
    out_json: str,
    dataset_uri: str | None = None,
    images_out: str | None = None,
    instruction: str = CAPTION_INSTRUCTION,
) -> dict[str, int]:
    """Write the LLaVA JSON for the ok records; returns counts (exported, skipped errors, images)."""
    if images_out and not dataset_uri:
        raise FormatError("--images-out needs --input (the image dataset the captions were made from)")
    captions: dict[str, str] = {}
    skipped = 0
    for record in iter_caption_records(records_uri):
        if record["status"] == "ok" and record.get("caption"):
            captions[record["id"]] = record["caption"]
        else:
            skipped += 1
    extensions: dict[str, str] = {}
    images_written = 0
    if dataset_uri:
        image_store = storage.open_store(images_out) if images_out else None
        for sample in open_dataset(dataset_uri).samples():
            record_id = sample_meta(sample)["id"]
            if record_id not in captions:
                continue
            ext, data = sample_image(sample)
            extensions[record_id] = ext
            if image_store is not None:
                image_store.put_bytes(_image_path(record_id, ext), data)
                images_written += 1
    conversations = [
        {
            "id": record_id,
            "image": _image_path(record_id, extensions.get(record_id)),
            "conversations": [
                {"from": "human", "value": f"<image>\n{instruction}"},
                {"from": "gpt", "value": caption},
            ],
        }
        for record_id, caption in captions.items()
    ]
    store, name = storage.split(out_json)
    store.put_bytes(name, json.dumps(conversations, ensure_ascii=False, indent=1).encode())
    return {"exported": len(conversations), "skipped_errors": skipped, "images": images_written}


def import_conversations(
    json_uri: str,
    out_uri: str,
    image_root: str | None = None,
    captioner: str | None = None,
    records_per_file: int = 10000,
) -> dict[str, Any]:
    """Turn a ShareGPT4V/LLaVA caption JSON into a caption set (the caption = first gpt turn)."""
    json_store, name = storage.split(json_uri)
    try:
        data = json.loads(json_store.get_bytes(name))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{json_uri}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise FormatError(f"{json_uri}: expected a JSON list of records")
    images = storage.open_store(image_root) if image_root else None
    captioner = captioner or f"imported:{name}"
    out = storage.open_store(out_uri)
    files, batch, counts = [], [], {"records": 0, "ok": 0, "error": 0}
    for index, item in enumerate(data):
        record = _import_record(item, index, captioner, images)
        batch.append(record)
        counts["records"] += 1
        counts[record["status"]] += 1
        if len(batch) >= records_per_file:
            files.append(put_jsonl(out, f"records/import-{len(files):06d}.jsonl", batch))
            batch = []
    if batch or not files:
        files.append(put_jsonl(out, f"records/import-{len(files):06d}.jsonl", batch))
    return out.commit_folder("", files, kind=CAPTION_SET_KIND, version=1, dataset=None, imported_from=json_uri,
                             counts=counts)


def _import_record(item: Any, index: int, captioner: str, images: storage.Store | None) -> dict[str, Any]:
    if not isinstance(item, dict):
        return _error(f"#{index}", "malformed_record", "record is not an object", captioner)
    record_id = str(item.get("id", f"#{index}"))
    image = item.get("image") if isinstance(item.get("image"), str) else None
    turns = item.get("conversations") if isinstance(item.get("conversations"), list) else []
    caption = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
    source = image.split("/", 1)[0] if image and "/" in image else "imported"
    base = {"id": record_id, "source": source, "image": image, "image_sha256": None}
    if images is not None and image:
        try:
            base["image_sha256"] = hashlib.sha256(images.get_bytes(storage.check_key(image))).hexdigest()
        except (ValueError, storage.ObjectNotFound):
            return {**_error(record_id, "missing_file", f"image {image!r} not found under the image root",
                             captioner), "source": source, "image": image}
    if not isinstance(caption, str) or not caption.strip():
        return {**_error(record_id, "no_caption", "no gpt turn with text", captioner), "source": source}
    return {**base, "caption": caption, "captioner": captioner, "prompt_id": "imported", "status": "ok",
            "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0.0, "attempts": 0, "cost_usd": 0.0}


def _error(record_id: str, reason: str, detail: str, captioner: str) -> dict[str, Any]:
    return {"id": record_id, "source": "imported", "caption": None, "captioner": captioner, "prompt_id": "imported",
            "status": "error", "reason": reason, "detail": detail, "image_sha256": None}

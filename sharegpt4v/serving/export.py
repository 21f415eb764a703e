"""Exporter: registered MLflow model versions -> a Triton model repository under an S3 prefix.

The repository is complete when its `manifest.json` (every file + sha256, the models and the
versions they came from) exists: it is written last, after the configs, adapters and weights.
A previous manifest at the prefix is removed first and stale objects are deleted, so a reader
never takes a half-written repository for a complete one. The layout is what KServe's storage
initializer downloads into `/mnt/models` for `tritonserver --model-store=/mnt/models`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sharegpt4v.provenance import refuse_if_different
from sharegpt4v.serving.repository import ADAPTER, EXPORTABLE, STREAM_MODEL, RepositoryError, model_configs

REPOSITORY_KIND = "triton-model-repository"
TAG_REPOSITORY = "serving.model_repository"


def _checkpoint_files(folder: Path) -> list[str]:
    """Files of a checkpoint folder, as its manifest lists them (cache marks and partial files are not part of it)."""
    from sharegpt4v.storage import MANIFEST_NAME

    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    return [entry["path"] for entry in manifest.get("files", [])] + [MANIFEST_NAME]


def _clear_previous(store: Any) -> None:
    """Remove an earlier (complete or interrupted) repository at the prefix; refuse to touch anything else."""
    from sharegpt4v.storage import MANIFEST_NAME, IncompleteFolder, LocalStore

    keys = [info.key for info in store.list()]
    if not keys:
        return
    try:
        previous = store.read_manifest().get("kind")
    except IncompleteFolder:
        previous = None
    ours = all(key == MANIFEST_NAME or key.split("/", 1)[0] in (*EXPORTABLE, STREAM_MODEL) for key in keys)
    if previous != REPOSITORY_KIND and not ours:
        raise RepositoryError(
            f"{store.url()}: holds other files ({keys[0]}, ...); export a model repository to an empty prefix"
        )
    if MANIFEST_NAME in keys:
        store.delete(MANIFEST_NAME)  # incomplete from here until the new manifest is written
    for key in keys:
        if key != MANIFEST_NAME:
            store.delete(key)
    if isinstance(store, LocalStore):  # an empty model folder left behind would fail Triton's load
        for folder in sorted((p for p in store.root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()


def export_model_repository(
    models: dict[str, str],
    out_uri: str,
    recipe: Any,
    kind: str | None = None,
    tag_versions: bool = True,
    replace: bool = False,
) -> dict[str, Any]:
    """Write a Triton repository for `models` ({"chat": "models:/sharegpt4v-chat@champion",
    "captioner": "models:/sharegpt4v-captioner/3" or a checkpoint URI}) under `out_uri`.

    `kind` (KIND_GPU for the cluster, KIND_CPU for local serving) overrides `serving.instance_kind`.
    Returns {"uri" (with a trailing slash: the KServe storageUri), "manifest", "digest",
    "models": {name: {"ref", "checkpoint", "checkpoint_digest", "name", "version"}}}; a registry
    version also gets the tag `serving.model_repository` = the repository URI.

    A complete repository already at `out_uri` is kept when it serves the same checkpoints with the
    same configs (nothing is rewritten under a live server) and refused in one line when it serves
    others, unless `replace`.
    """
    from sharegpt4v.modeling.builder import checkpoint_digest, materialize
    from sharegpt4v.storage import FileEntry, open_store, sha256_stream
    from sharegpt4v.tracking import resolve_model

    if recipe.serving.engine == "vllm":
        raise RepositoryError("serving.engine=vllm serves the checkpoint itself, with no Triton repository: "
                              "run `sharegpt4v serve vllm --model REF` or `sharegpt4v deploy render --engine vllm`")
    if not models:
        raise RepositoryError("export: name at least one model (captioner=... and/or chat=...)")
    unknown = [name for name in models if name not in EXPORTABLE]
    if unknown:
        raise RepositoryError(f"model {unknown[0]!r}: not a served model (known: {', '.join(EXPORTABLE)})")
    resolved: dict[str, dict[str, str]] = {}
    for name, ref in models.items():
        checkpoint, version = resolve_model(ref)
        resolved[name] = {"ref": ref, "checkpoint": checkpoint, "checkpoint_digest": checkpoint_digest(checkpoint),
                          **version}
    configs = model_configs(recipe, list(models), kind=kind, extra_parameters={
        name: {f"lineage.{k}": v for k, v in info.items()} for name, info in resolved.items()
    })

    instance_kind = kind or recipe.serving.instance_kind
    served = {name: resolved["chat" if name == STREAM_MODEL else name] for name in configs}
    made_from = {"models": {name: info["checkpoint_digest"] for name, info in sorted(served.items())},
                 "configs": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in sorted(configs.items())},
                 "adapter": hashlib.sha256(ADAPTER.encode()).hexdigest()}
    store = open_store(out_uri)
    previous = store.read_manifest() if store.is_complete() and not replace else None
    if previous is not None and previous.get("kind") == REPOSITORY_KIND:
        refuse_if_different(store.url(), "a model repository", previous.get("made_from"), made_from, "--replace")
        if previous.get("made_from") is not None:  # the same repository: keep it, do not rewrite it under a server
            return _finish(store, previous, resolved, tag_versions)
    _clear_previous(store)
    entries: list[FileEntry] = []

    def put(key: str, path: Path) -> None:
        with open(path, "rb") as stream:
            digest, size = sha256_stream(stream)
        store.put_file(key, path)
        entries.append(FileEntry(key, size, digest))

    def put_text(key: str, text: str) -> None:
        data = text.encode()
        store.put_bytes(key, data)
        entries.append(FileEntry(key, len(data), hashlib.sha256(data).hexdigest()))

    for name, info in resolved.items():
        folder = materialize(info["checkpoint"], require_manifest=True)  # verified against its manifest
        for rel in _checkpoint_files(folder):
            put(f"{name}/1/weights/{rel}", folder / rel)
    for name, text in configs.items():
        put_text(f"{name}/1/model.py", ADAPTER)
        put_text(f"{name}/config.pbtxt", text)

    manifest = store.commit_folder(
        "", files=sorted(entries, key=lambda e: e.path), kind=REPOSITORY_KIND, instance_kind=instance_kind,
        models=served, profile=recipe.profile, made_from=made_from,
    )
    return _finish(store, manifest, resolved, tag_versions)


def _finish(store: Any, manifest: dict[str, Any], resolved: dict[str, dict[str, str]], tag_versions: bool) -> dict[str, Any]:
    """The export's result; registry versions get tagged with the repository that serves them."""
    from sharegpt4v.storage import MANIFEST_NAME, manifest_digest
    from sharegpt4v.tracking import _client

    uri = store.url().rstrip("/") + "/"
    result = {"uri": uri, "manifest": store.url(MANIFEST_NAME), "digest": manifest_digest(manifest),
              "models": manifest["models"], "instance_kind": manifest["instance_kind"]}
    if tag_versions:
        client = None
        for info in resolved.values():
            if info.get("name") and info.get("version"):
                client = client or _client()
                client.set_model_version_tag(info["name"], info["version"], TAG_REPOSITORY, uri)
                client.set_model_version_tag(info["name"], info["version"], "serving.repository_digest", result["digest"][:12])
    return result

"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

Layout under the stage's `out` prefix (local folder or `s3://`):

    checkpoint-<step>/
        config.json, model.safetensors, generation_config.json    the whole LLaVA (ViT included)
        tokenizer / processor files                                 (HF `save_pretrained`)
        trainer_state/state.json                 step, schedule, data position, loss history,
                                                 python/numpy RNG of every rank, optimizer index
        trainer_state/optimizer-rank-<r>.safetensors   AdamW moments (and fp32 master weights
                                                 under mixed precision / ZeRO), full shapes, keyed
                                                 `exp_avg/<param name>`; rank r writes params r, r+W, ...
        trainer_state/rng-rank-<r>.safetensors   torch CPU (and CUDA) RNG state of rank r
        manifest.json                            written last (sha256 of every file): complete
    final/                                       the model + processor only, manifest last

Optimizer states are stored per parameter in their natural shape, gathered from DeepSpeed's
partitions with its `safe_get_full_*` API, so a checkpoint written by W processes (ZeRO 0-3)
resumes on any number of processes.
"""

from __future__ import annotations

import json
import logging
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("sharegpt4v.training")

CHECKPOINT_KIND = "sharegpt4v.train-checkpoint"
FINAL_KIND = "llava-checkpoint"  # the kind `sharegpt4v.modeling.builder.save_model` writes
STATE_DIR = "trainer_state"
STATE_FILE = f"{STATE_DIR}/state.json"
OPTIM_KEYS = ("exp_avg", "exp_avg_sq")
_NAME = re.compile(r"^checkpoint-(\d+)/")


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    uri: str
    complete: bool


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def list_checkpoints(out: str) -> list[CheckpointInfo]:
    """Every `checkpoint-<step>/` under `out`, oldest first; complete = has its manifest."""
    from sharegpt4v import storage

    store = storage.open_store(out)
    seen: dict[int, bool] = {}
    for info in store.list(""):
        match = _NAME.match(info.key)
        if match:
            step = int(match.group(1))
            seen[step] = seen.get(step, False) or info.key == f"{match.group(0)}{storage.MANIFEST_NAME}"
    return [CheckpointInfo(step, store.url(checkpoint_name(step)), seen[step]) for step in sorted(seen)]


def latest_checkpoint(out: str, stage: str | None = None) -> str | None:
    """The newest complete checkpoint of `out` (of `stage`, when given); incomplete ones are ignored."""
    from sharegpt4v import storage

    store = storage.open_store(out)
    for info in reversed(list_checkpoints(out)):
        if not info.complete:
            log.warning("%s: no manifest (a run was killed while writing it); ignored", info.uri)
            continue
        manifest = store.read_manifest(checkpoint_name(info.step))
        if manifest.get("kind") != CHECKPOINT_KIND or (stage is not None and manifest.get("stage") != stage):
            log.warning("%s: not a %s checkpoint of stage %s; ignored", info.uri, CHECKPOINT_KIND, stage)
            continue
        return info.uri
    return None


def prune_checkpoints(out: str, keep: int, all_incomplete: bool = False) -> list[str]:
    """Delete all but the `keep` newest complete checkpoints, and incomplete ones older than the newest
    complete one (all of them when the stage is done). A checkpoint's manifest goes first, so a reader
    never sees a half-deleted folder as complete."""
    from sharegpt4v import storage

    store = storage.open_store(out)
    infos = list_checkpoints(out)
    complete = [i for i in infos if i.complete]
    newest = complete[-1].step if complete else -1
    doomed = complete[: max(0, len(complete) - keep)] + [i for i in infos if not i.complete and (all_incomplete or i.step < newest)]
    for info in doomed:
        name = checkpoint_name(info.step)
        store.delete(f"{name}/{storage.MANIFEST_NAME}")
        store.delete_prefix(name)
    return [i.uri for i in doomed]


def upload_folder(folder: Path, uri: str, skip: tuple[str, ...] = ()) -> list[Any]:
    """Put every file of a local folder under `uri`; returns the manifest entries (sha256 while reading)."""
    from sharegpt4v.storage import FileEntry, open_store, sha256_stream

    store = open_store(uri)
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in skip:
            continue
        with open(path, "rb") as stream:
            digest, size = sha256_stream(stream)
        store.put_file(rel, path)
        entries.append(FileEntry(rel, size, digest))
    return entries


# RNG ---------------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able python/numpy states, torch tensors) of this process."""
    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda/{i}"] = state
    return plain, tensors


def set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    import numpy as np

    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda/")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# optimizer state, per parameter ------------------------------------------------------------------


def is_fragmented(params: list[torch.nn.Parameter]) -> bool:
    """True when DeepSpeed holds the fp32 state in partitions (ZeRO 1-3, its bf16 optimizer)."""
    return any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in params)


def _base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer


def optimizer_step_count(optimizer: Any) -> float:
    base = _base_optimizer(optimizer)
    for state in base.state.values():
        if "step" in state:
            step = state["step"]
            return float(step.item() if torch.is_tensor(step) else step)
    return 0.0


def gather_optimizer_tensors(named: list[tuple[str, torch.nn.Parameter]], optimizer: Any, rank: int,
                             world_size: int) -> dict[str, torch.Tensor]:
    """Full-shape AdamW moments (+ fp32 masters when fragmented) of the params this rank writes.

    Collective under ZeRO: every rank must call it with the same parameter list.
    """
    fragmented = is_fragmented([p for _, p in named])
    if fragmented:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        _link_fragments(optimizer)
    base = _base_optimizer(optimizer)
    out: dict[str, torch.Tensor] = {}
    for i, (name, param) in enumerate(named):
        mine = i % world_size == rank
        if fragmented:
            values = {key: safe_get_full_optimizer_state(param, key) for key in OPTIM_KEYS}
            values["master"] = safe_get_full_fp32_param(param)
        else:
            state = base.state.get(param, {})
            values = {key: state.get(key) for key in OPTIM_KEYS}
        if mine:
            for key, value in values.items():
                if value is not None:
                    out[f"{key}/{name}"] = value.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def prepare_optimizer_state(optimizer: Any) -> None:
    """Create (zero) AdamW state for every parameter the optimizer holds, so saved values can be set
    before the first step; DeepSpeed's ZeRO-1/2 and bf16 optimizers then link their fragments to it."""
    base = _base_optimizer(optimizer)
    # ZeRO-3 puts its flat fp32 partitions into the param groups only while stepping.
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    for p in flats if flats is not None else [p for group in base.param_groups for p in group["params"]]:
        if p is not None:
            state = base.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    _link_fragments(optimizer)


def _link_fragments(optimizer: Any) -> None:
    """(Re)link DeepSpeed's per-parameter views of the optimizer state (ZeRO-1/2, bf16 optimizer).

    DeepSpeed links them once, right after the first param group's first step, so with several
    param groups (decay / no decay) the later groups stay unlinked; linking again is idempotent.
    """
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def restore_optimizer_tensors(named: list[tuple[str, torch.nn.Parameter]], optimizer: Any, files: list[Path],
                              step: float) -> None:
    """Set AdamW moments (and masters) from the saved files; every rank reads every file (lazily)."""
    params = dict(named)
    fragmented = is_fragmented(list(params.values()))
    if fragmented:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    prepare_optimizer_state(optimizer)
    base = _base_optimizer(optimizer)
    found: set[str] = set()
    # Every rank walks the same keys in the same order (ZeRO-3 setters may communicate).
    handles = [safe_open(str(f), framework="pt") for f in files]
    keyed = sorted((key, h) for h in handles for key in h.keys())
    for key, handle in keyed:
        kind, _, name = key.partition("/")
        if name not in params:
            raise ValueError(f"checkpoint has optimizer state for {name!r}, which is not trainable in this stage")
        param, value = params[name], handle.get_tensor(key)
        found.add(name)
        if fragmented:
            device_value = value.to(param.device if param.device.type != "meta" else "cpu")
            if kind == "master":
                safe_set_full_fp32_param(param, device_value)
            else:
                safe_set_full_optimizer_state(param, device_value, kind)
        elif kind == "master":  # written under mixed precision; here the parameter is the master
            with torch.no_grad():
                param.copy_(value.to(param.device, param.dtype).reshape(param.shape))
        elif kind in OPTIM_KEYS:
            state = base.state[param]
            state[kind] = value.to(param.device, param.dtype).reshape(param.shape).clone()
            state.setdefault("step", torch.tensor(0.0))
    missing = sorted(set(params) - found)
    if missing:
        raise ValueError(f"checkpoint has no optimizer state for trainable {missing[:3]} (the freezing changed?)")
    for state in base.state.values():
        if "step" in state:
            state["step"] = torch.tensor(float(step), dtype=torch.float32) if torch.is_tensor(state["step"]) else step


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def tempdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="sharegpt4v-ckpt-")


# What a stage's output is made from ------------------------------------------------------------

# Stage settings a resumed run may change without changing what it trains: how the work is split
# and saved, not what is learnt.
RESUME_SAFE_FIELDS = ("micro_batch_size", "gradient_checkpointing", "zero_stage", "save_every_steps",
                      "log_every_steps", "keep_checkpoints")


def _folder_digest(uri: str) -> str | None:
    from sharegpt4v import storage

    try:
        return storage.manifest_digest(storage.open_store(uri).read_manifest())
    except storage.IncompleteFolder:
        return None  # a folder without a manifest (e.g. a plain HF checkpoint): known by its URI only


def stage_made_from(stage: str, recipe: Any, inputs: Any, init: str | None) -> dict[str, Any]:
    """What a stage's checkpoints are made from: recipe, data and caption digests, init checkpoint.

    The process count, micro-batch and checkpoint cadence are left out: a resume may change them.
    """
    import dataclasses

    from sharegpt4v import storage
    from sharegpt4v.data.shards import open_dataset

    settings = {k: v for k, v in dataclasses.asdict(getattr(recipe, stage)).items() if k not in RESUME_SAFE_FIELDS}
    data = []
    for uri in inputs.data:
        data.append({"digest": storage.manifest_digest(open_dataset(uri).manifest), "split": inputs.split})
    init_digest = _folder_digest(init) if init else None
    return {
        "stage": stage,
        "recipe": {"seed": recipe.seed, "precision": recipe.compute.precision,
                   "model": dataclasses.asdict(recipe.model), stage: settings},
        "data": data,
        "captions": _folder_digest(inputs.captions) if inputs.captions else None,
        "init": (init_digest or init) if init else None,
    }

"""Writing a stage's `checkpoint-<step>/` and `final/` from every rank (collective; rank 0 commits the manifest)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sharegpt4v.modeling.hf_layout import write_layout
from sharegpt4v.training import checkpoint as ckpt
from sharegpt4v.training.data import DataIndex, StageInputs
from sharegpt4v.training.distributed import _barrier, _gather, dist_env
from sharegpt4v.training.engine import _Engine
from sharegpt4v.training.optimizer import scheduler_state

if TYPE_CHECKING:
    from sharegpt4v.training.trainer import StageResult

log = logging.getLogger("sharegpt4v.training")


@dataclass
class _Context:
    """A stage's checkpoint writer: `save` every `save_every_steps`, `save_final` at the end."""

    stage: str
    recipe: Any
    s: Any
    inputs: StageInputs
    out: str
    init: str | None
    index: DataIndex
    engine: _Engine
    processor: Any
    named: list[tuple[str, torch.nn.Parameter]]
    rank: int
    world: int
    total: int
    run_id: str | None = None
    made_from: dict[str, Any] | None = None  # recorded in every manifest: a rerun refuses other inputs

    def _write(self, name: str, meta: dict[str, Any], state: dict[str, Any] | None) -> str:
        """Write `out/<name>/` from every rank; rank 0 commits the manifest last. Collective."""
        from sharegpt4v import storage

        store = storage.open_store(self.out)
        uri = store.url(name)
        if self.rank == 0:  # leftovers of a killed writer at the same step go first
            store.delete(f"{name}/{storage.MANIFEST_NAME}")
            store.delete_prefix(name)
        _barrier()
        state_dict = _consolidated_state_dict(self.engine)
        entries: list[Any] = []
        rng_plain = None
        with ckpt.tempdir() as tmp:
            tmp_path = Path(tmp)
            if state is not None:
                mine = tmp_path / "rank"
                tensors = ckpt.gather_optimizer_tensors(self.named, self.engine.optimizer, self.rank, self.world)
                ckpt.save_tensors(tensors, mine / ckpt.STATE_DIR / f"optimizer-rank-{self.rank:05d}.safetensors")
                rng_plain, rng_tensors = ckpt.rng_state()
                ckpt.save_tensors(rng_tensors, mine / ckpt.STATE_DIR / f"rng-rank-{self.rank:05d}.safetensors")
                entries = ckpt.upload_folder(mine, uri)
            gathered = _gather((entries, rng_plain))
            if self.rank == 0:
                model_dir = tmp_path / "model"
                with _no_progress_bars():
                    self.engine.model.save_pretrained(model_dir, state_dict=state_dict)
                    self.processor.save_pretrained(model_dir)
                write_layout(model_dir, self.s.image_aspect)  # the llava-hf layout every engine loads
                if state is not None:
                    state = {
                        **state,
                        "stage": self.stage,
                        "step": meta["step"],
                        "total_steps": self.total,
                        "world_size": self.world,
                        "engine": self.engine.kind,
                        "optimizer_step": ckpt.optimizer_step_count(self.engine.optimizer),
                        "optimizer_files": [f"{ckpt.STATE_DIR}/optimizer-rank-{r:05d}.safetensors" for r in range(self.world)],
                        "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                         for g in self.engine.scheduler.optimizer.param_groups],
                        "scheduler": scheduler_state(self.engine.scheduler),
                        "rng": {str(r): g[1] for r, g in enumerate(gathered)},
                        "data_digest": self.index.digest(),
                        "recipe": self.recipe.to_dict(),
                    }
                    ckpt.write_json(model_dir / ckpt.STATE_FILE, state)
                all_entries = ckpt.upload_folder(model_dir, uri) + [e for g in gathered for e in g[0]]
                parameters = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.engine.model.parameters())
                store.commit_folder(name, files=sorted(all_entries, key=lambda e: e.path), parameters=parameters, **meta)
        _barrier()
        return uri

    def save(self, step: int, state: dict[str, Any]) -> str:
        uri = self._write(ckpt.checkpoint_name(step), {"kind": ckpt.CHECKPOINT_KIND, "stage": self.stage, "step": step,
                                                        "total_steps": self.total, "made_from": self.made_from}, state)
        if self.rank == 0:
            log.info("%s: checkpoint %s", self.stage, uri)
            ckpt.prune_checkpoints(self.out, max(1, self.s.keep_checkpoints))
        _barrier()
        return uri

    def save_final(self, result: StageResult) -> str:
        meta = {"kind": ckpt.FINAL_KIND, "stage": self.stage, "steps": result.steps, "final_loss": result.final_loss,
                "samples_seen": result.samples_seen, "flagged_samples": result.flagged_samples, "flagged": result.flagged,
                "examples": result.examples, "run_id": result.run_id, "data": self.inputs.data,
                "captions": self.inputs.captions, "init": self.init, "made_from": self.made_from}
        uri = self._write("final", meta, None)
        if self.rank == 0:
            log.info("%s: final model %s", self.stage, uri)
        return uri


def _consolidated_state_dict(engine: _Engine) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0 (collective under ZeRO-3)."""
    if engine.ds is not None and engine.ds.zero_optimization_stage() == 3:
        return engine.ds._zero3_consolidated_16bit_state_dict()
    return engine.model.state_dict() if dist_env()[0] == 0 else None


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a progress bar per save; a training log does not need one per checkpoint."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()

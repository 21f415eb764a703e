"""Training core: one function per stage (captioner, pretrain, SFT) driven by the recipe.

- `data`: training examples as LLaVA conversations streamed from image shards, the SFT mix,
  per-rank splits and an exact, resumable data position.
- `trainer`: `train_stage(stage, recipe, inputs, out, init=None, resume=True) -> StageResult`,
  the loop: gradient accumulation, checkpoints without pickle, resume, MLflow tracking; with
  `optimizer` (AdamW + cosine), `freezing`, `engine` (DeepSpeed ZeRO 0-3 or a plain torch loop),
  `distributed` (rank, collectives), `checkpoint_writer` and `tracking_hooks` (MLflow) beside it.
- `checkpoint`: `checkpoint-<step>/` and `final/` layouts (safetensors + JSON, manifest last),
  per-parameter optimizer state that resumes on any process count, retention, RNG.
- `run`: `python -m sharegpt4v.training.run ...` (works under torchrun and the DeepSpeed
  launcher) and `launch(...)` for N local processes.

Modules import only torch / transformers / deepspeed / safetensors / the standard library and
the project's modeling code at module level; storage and MLflow are imported where used.
"""

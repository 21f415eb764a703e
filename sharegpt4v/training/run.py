"""Launch a training stage: `python -m sharegpt4v.training.run`, under torchrun or DeepSpeed, or `launch()`.

    python -m sharegpt4v.training.run --stage pretrain --profile tiny --data URI [--data URI ...]
        [--captions URI] [--init URI] --out URI [--split train] [--no-resume] [key.sub=value ...]
    torchrun --nproc_per_node=2 -m sharegpt4v.training.run ... compute.gpus_per_node=2
    deepspeed --num_gpus=8 --module sharegpt4v.training.run ...

Every process runs the same command; rank 0 prints the `StageResult` as one JSON line (and
writes it to `--result-json` when given). Exit codes: 0 done, 1 failed, 2 usage or recipe error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sharegpt4v.environment import patched_environ
from sharegpt4v.training.data import StageInputs
from sharegpt4v.training.distributed import dist_env, free_port, single_process_env
from sharegpt4v.training.trainer import STAGES, StageResult, train_stage

if TYPE_CHECKING:
    from sharegpt4v.config import RecipeConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sharegpt4v.training.run", description=__doc__.split("\n")[0])
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--profile", default="tiny", help="profile name or YAML path")
    p.add_argument("--data", action="append", required=True, help="image-shard dataset URI (repeatable)")
    p.add_argument("--captions", default=None, help="caption set URI (captioner: seed captions; pretrain: corpus captions)")
    p.add_argument("--split", default="train", help="shard split to train on (datasets without it: all shards)")
    p.add_argument("--init", default=None, help="checkpoint to start from (the previous stage's final/)")
    p.add_argument("--out", required=True, help="output prefix: checkpoints and final/ (local path or s3://)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of continuing the newest checkpoint")
    p.add_argument("--result-json", default=None, help="rank 0 writes the StageResult here")
    p.add_argument("--trace", default=None, help="local folder for per-rank step traces (debugging)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed launcher
    p.add_argument("overrides", nargs="*", help="recipe overrides key.sub=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from sharegpt4v.config import ConfigError, load_recipe
    from sharegpt4v.errors import PlatformError

    args = parse_args(argv)
    # DeepSpeed's ZeRO calls a torch collective torch has renamed: one warning per call, no information.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = dist_env()[0]
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    try:
        recipe = load_recipe(args.profile, args.overrides)
    except ConfigError as exc:
        print(f"sharegpt4v.training: error: {exc}", file=sys.stderr)
        return 2
    inputs = StageInputs(args.data, args.captions, args.split or None)
    try:
        result = train_stage(args.stage, recipe, inputs, args.out, init=args.init, resume=not args.no_resume,
                             trace=args.trace)
    except (PlatformError, ValueError, OSError) as exc:
        if os.environ.get("SHAREGPT4V_DEBUG"):
            raise
        print(f"sharegpt4v.training: error (rank {rank}): {exc}", file=sys.stderr)
        return 1
    if rank == 0:
        text = json.dumps(result.to_dict(), sort_keys=True)
        print(text, flush=True)
        if args.result_json:
            Path(args.result_json).write_text(text)
    return 0


def on_one_node(recipe: "RecipeConfig", nproc: int) -> "RecipeConfig":
    """The recipe as `nproc` processes on one node run it (`compute.num_nodes=1`, `gpus_per_node=nproc`)."""
    from sharegpt4v.config import recipe_from_dict

    if recipe.compute.world_size == nproc:
        return recipe
    data = recipe.to_dict()
    data["compute"].update(num_nodes=1, gpus_per_node=nproc)
    return recipe_from_dict(data)


def launch(stage: str, recipe: "RecipeConfig", inputs: StageInputs | dict[str, Any] | str, out: str,
           init: str | None = None, nproc: int = 1, resume: bool = True, env: dict[str, str] | None = None,
           trace: str | None = None, timeout: float | None = None) -> StageResult:
    """Train a stage with `nproc` processes on this machine.

    1 process: in this process, with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set for
    the call (DeepSpeed then does not look for MPI). N processes: torchrun on 127.0.0.1 with a
    free port; the recipe goes to the children as YAML, with `compute.gpus_per_node = nproc`.
    """
    recipe = on_one_node(recipe, nproc)
    if not isinstance(inputs, StageInputs):
        inputs = StageInputs(**inputs) if isinstance(inputs, dict) else StageInputs([inputs])
    if nproc == 1:
        with patched_environ({**single_process_env(), **(env or {})}):
            return train_stage(stage, recipe, inputs, out, init=init, resume=resume, trace=trace)
    with tempfile.TemporaryDirectory(prefix="sharegpt4v-launch-") as tmp:
        profile = Path(tmp) / "recipe.yaml"
        profile.write_text(recipe.to_yaml())
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "sharegpt4v.training.run",
               "--stage", stage, "--profile", str(profile), "--out", out, "--result-json", str(result_path)]
        for uri in inputs.data:
            cmd += ["--data", uri]
        if inputs.captions:
            cmd += ["--captions", inputs.captions]
        cmd += ["--split", inputs.split or ""]
        if init:
            cmd += ["--init", init]
        if not resume:
            cmd.append("--no-resume")
        if trace:
            cmd += ["--trace", trace]
        child_env = {**os.environ, **(env or {})}
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            child_env.pop(key, None)
        if recipe.compute.device == "cpu":
            child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        proc = subprocess.run(cmd, env=child_env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"training {stage} with {nproc} processes failed (exit {proc.returncode})")
        return StageResult(**json.loads(result_path.read_text()))


if __name__ == "__main__":
    sys.exit(main())

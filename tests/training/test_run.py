"""The launcher: command line (torchrun / DeepSpeed launcher arguments), errors, and the import rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sharegpt4v.training.run import main, parse_args

ROOT = Path(__file__).resolve().parents[2]


def test_arguments_of_the_deepspeed_launcher_are_accepted() -> None:
    args = parse_args(["--local_rank=3", "--stage", "sft", "--data", "s3://b/world", "--data", "s3://b/llava",
                       "--captions", "s3://b/caps", "--init", "s3://b/pre/final", "--out", "s3://b/sft",
                       "sft.learning_rate=1e-4", "compute.gpus_per_node=8"])
    assert args.local_rank == 3 and args.data == ["s3://b/world", "s3://b/llava"]
    assert args.overrides == ["sft.learning_rate=1e-4", "compute.gpus_per_node=8"]


def test_errors_exit_with_one_line(tmp_path: Path, capsys) -> None:
    assert main(["--stage", "pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "pretrain.nope=1"]) == 2
    assert "pretrain.nope" in capsys.readouterr().err
    assert main(["--stage", "pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing" in err
    # a launch whose process count disagrees with the recipe is refused before anything runs
    assert main(["--stage", "pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "compute.gpus_per_node=2", "captioner.micro_batch_size=8", "pretrain.micro_batch_size=8",
                 "sft.micro_batch_size=8"]) == 1
    assert "1 process(es) but the recipe says" in capsys.readouterr().err


def test_compute_modules_do_not_import_storage_or_mlflow_at_module_level() -> None:
    code = ("import sys, sharegpt4v.training.trainer, sharegpt4v.training.run, sharegpt4v.training.checkpoint, "
            "sharegpt4v.training.data; print(sorted(m for m in ('mlflow', 'boto3', 'sharegpt4v.storage', "
            "'sharegpt4v.tracking', 'deepspeed', 'sharegpt4v.data.shards') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

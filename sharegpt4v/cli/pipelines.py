"""Commands that run the Kubeflow pipelines: `demo`, `pipeline compile|run|submit`. The `pipelines` package
(and kfp with it) is imported only inside them, so the core CLI does not need it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sharegpt4v.errors import UsageError


def cmd_demo(args: argparse.Namespace) -> int:
    from sharegpt4v.demo import run_demo

    run_demo(Path(args.dir), images=args.images, seed=args.seed, profile=args.profile, overrides=args.overrides,
             shard_groups=args.shard_groups)
    return 0


def cmd_pipeline_compile(args: argparse.Namespace) -> int:
    from pipelines import runner  # kfp stays out of the core package: imported only for this command

    image = None if args.image is None else runner.image_reference(args.image)  # a malformed one: exit 2
    out = Path(args.out) if args.out else runner.COMPILED_DIR
    if args.check:
        problems = runner.check_compiled(out, image)
        if problems:  # one line, like every error
            raise runner.PipelineError(problems[0] if len(problems) == 1 else
                                       f"{len(problems)} problems: " + "; ".join(problems))
        print(f"pipelines: the compiled IR YAML under {out} (image {image or runner.default_image()}) and the "
              "component reference are up to date and valid")
        return 0
    paths = runner.compile_all(out, image)
    for name, path in paths.items():
        print(f"{name} -> {path}")
    if out.resolve() == runner.COMPILED_DIR.resolve():
        print(f"component reference -> {runner.write_reference(paths)}")
        if image is not None:
            print(f"note: {out} now runs {image}; `pipeline compile --check` expects the committed default "
                  f"{runner.default_image()}", file=sys.stderr)
    return 0


def cmd_pipeline_run(args: argparse.Namespace) -> int:
    from pipelines import runner

    result = runner.run_local(Path(args.dir), images=args.images, seed=args.seed, profile=args.profile,
                              overrides=args.overrides, shard_groups=args.shard_groups,
                              champion_threshold=args.champion_threshold, extra=_pipeline_params(args.param))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(f"world: {result['world']}")
    print(f"caption sets: seed {result['caption_sets']['seed']}, corpus {result['caption_sets']['corpus']}")
    for stage, model in result["models"].items():
        print(f"{stage}: {model['model_uri']} ({model['checkpoint_uri']})")
    print(f"evaluation: score {result['eval']['score']:.4f}; champion: {result['champion'] or 'not promoted'}")
    if result["model_repository"]:
        print(f"model repository: {result['model_repository']}")
    print(f"pipeline run: MLflow {result['mlflow_run_id']}, KFP outputs {result['kfp_run']} "
          f"({result['minutes']:.1f} min)")
    return 0


def _pipeline_params(items: list[str]) -> dict[str, Any]:
    from pipelines import runner

    for item in items:
        name, sep, _ = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--param {item!r}: expected NAME=VALUE")
    return runner.parse_arguments(items)


def cmd_pipeline_submit(args: argparse.Namespace) -> int:
    from pipelines import runner

    if args.recurring is not None and len(args.recurring.split()) != 6:
        raise UsageError(f"--recurring {args.recurring!r}: expected a 6-field cron expression, seconds first "
                         "(e.g. '0 0 3 * * *')")
    result = runner.submit(args.host, pipeline=args.pipeline, arguments=_pipeline_params(args.param),
                           experiment=args.experiment, run_name=args.run_name, recurring=args.recurring,
                           namespace=args.namespace)
    print(json.dumps(result, indent=2))
    return 0

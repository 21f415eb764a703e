"""Commands that train and measure models: `train *`, `experiment ablation|probe-sft|probe-vision`,
`eval run|score`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from sharegpt4v.cli.common import CommandError, _pairs, _recipe
from sharegpt4v.errors import UsageError


def cmd_train(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    if args.trainjob:
        import yaml

        from sharegpt4v.cluster import build_trainjob

        if not args.image:
            raise UsageError("--trainjob needs --image (the training image, pinned by tag or digest)")
        job = build_trainjob(
            args.stage, recipe, name=args.name or f"sharegpt4v-{args.stage}", image=args.image, data=list(args.data),
            out=args.out, init=args.init, captions=args.captions, overrides=args.overrides, runtime=args.runtime,
            namespace=args.namespace, split=args.split,
        )
        print(yaml.safe_dump(job, sort_keys=False), end="")
        return 0
    from sharegpt4v import storage, tracking
    from sharegpt4v.training.data import StageInputs
    from sharegpt4v.training.run import launch

    init, parent = tracking.resolve_model(args.init) if args.init else (None, {})
    inputs = StageInputs(list(args.data), captions=args.captions, split=args.split or None)
    result = launch(args.stage, recipe, inputs, args.out, init=init, nproc=args.nproc, resume=not args.no_resume)
    summary: dict[str, Any] = {"stage": args.stage, **result.to_dict()}
    if tracking.tracking_enabled() and not args.no_register:
        def digest(uri: str) -> str:
            return storage.manifest_digest(storage.open_store(uri).read_manifest())[:16]

        lineage = tracking.stage_lineage(parent, init, ",".join(args.data), ",".join(digest(d) for d in args.data),
                                         args.captions, digest(args.captions) if args.captions else None)
        summary["registered"] = tracking.register_checkpoint(args.stage, result.checkpoint_uri, result.run_id, lineage)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{args.stage}: {result.steps} steps, final loss {result.final_loss:.4f}, {result.samples_seen} samples "
              f"({result.flagged_samples} flagged) -> {result.checkpoint_uri}")
        if "registered" in summary:
            print(f"registered {summary['registered']['uri']} (alias: candidate)")
    return 0


def cmd_experiment_ablation(args: argparse.Namespace) -> int:
    from sharegpt4v.config import load_recipe
    from sharegpt4v.experiments.ablation import ABLATION_OVERRIDES, ARMS, AblationPlan, run_ablation
    from sharegpt4v.experiments.summary import log_summary, results_table

    recipe = load_recipe(args.profile, [*ABLATION_OVERRIDES, *args.overrides])
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise UsageError(f"--arms: unknown arm(s) {sorted(unknown)}; known: {', '.join(ARMS)}")
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise UsageError(f"--seeds: comma-separated integers, got {args.seeds!r}") from None
    try:
        plan = AblationPlan(out=args.out, images=args.images, world_seed=args.world_seed, arms=arms, seeds=seeds,
                            lanes=args.lanes)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None
    summary = run_ablation(recipe, plan)
    log_summary(summary)
    print(results_table(summary), end="")
    print(f"{len(arms) * len(seeds)} runs in {summary['minutes']:.1f} min -> {args.out}/results.md")
    return 0


def cmd_experiment_probe_sft(args: argparse.Namespace) -> int:
    from sharegpt4v.experiments.ablation import ARMS, default_recipe
    from sharegpt4v.experiments.probes import reason_table, sft_probe, sft_probe_table

    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    unknown = set(arms) - set(ARMS)
    if unknown or not arms:
        raise UsageError(f"--arms: unknown arm(s) {sorted(unknown)}; known: {', '.join(ARMS)}")
    recipe = default_recipe(args.profile, args.overrides)
    try:
        results = sft_probe(args.ablation, recipe, arms, args.out, seed=args.seed, lanes=args.lanes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(sft_probe_table(results), end="")
    if any("reasons" in r for r in results):
        print("\nYes/no answered with reasons (sft.yes_no_reasons), test split:\n")
        if recipe.sft.yes_no_reasons == "before":
            print("(the perception columns above read the first word, as MME's parser does: answers that give their\n"
                  "reason first score 0 there; the answer column below reads the word after the reason)\n")
        print(reason_table(results), end="")
    return 0


def cmd_experiment_probe_vision(args: argparse.Namespace) -> int:
    from sharegpt4v.experiments.ablation import default_recipe
    from sharegpt4v.experiments.probes import vision_probe

    try:
        results = vision_probe(args.ablation, default_recipe(args.profile, args.overrides))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print("| tower | background | texture |\n|---|---|---|")
    for name, acc in results.items():
        print(f"| {name} | {acc['background']:.3f} | {acc['texture']:.3f} |")
    return 0


def cmd_eval_run(args: argparse.Namespace) -> int:
    from sharegpt4v import tracking
    from sharegpt4v.evaluation import evaluate, flat_metrics

    recipe = _recipe(args)
    if args.benchmarks_only:
        recipe.eval.benchmarks = [b.strip() for b in args.benchmarks_only.split(",") if b.strip()]
        _known_benchmarks(recipe.eval.benchmarks, "--benchmarks")
    paths = dict(_pairs(args.benchmark, "--benchmark", "NAME=PATH"))
    _known_benchmarks(list(paths), "--benchmark")
    for name in recipe.eval.benchmarks:  # every source named before the model is resolved or loaded
        if name == "world-vqa" and not (args.data or paths.get(name)):
            raise UsageError("world-vqa needs --data (the synthetic world dataset); or choose --benchmarks")
        if name != "world-vqa" and name not in paths:
            raise UsageError(f"{name} needs --benchmark {name}=PATH (its folder); or choose --benchmarks")
    if tracking.parse_model_ref(args.model) is None and args.promote:  # a malformed reference: UsageError too
        raise UsageError(f"--promote needs --model {tracking.MODEL_REF_FORMS} (a registered version to alias)")
    checkpoint, version = tracking.resolve_model(args.model)
    results = evaluate(checkpoint, recipe, dataset_uri=args.data, benchmark_paths=paths, out=args.out,
                       model_id=args.model, progress=True)
    metrics = flat_metrics(results)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}")
    if args.promote:
        metric, threshold = recipe.eval.champion_metric, recipe.eval.champion_threshold
        if metric not in metrics:
            raise CommandError(f"eval.champion_metric {metric!r} was not measured (have: {', '.join(metrics)})")
        if metrics[metric] >= threshold:
            tracking.promote(version["name"], version["version"])
            print(f"promoted {version['name']}/{version['version']} to champion ({metric}={metrics[metric]:.4f} >= {threshold})")
        else:
            print(f"not promoted: {metric}={metrics[metric]:.4f} < eval.champion_threshold {threshold}")
    return 0


def _known_benchmarks(names: list[str], flag: str) -> None:
    from sharegpt4v.evaluation.registry import BENCHMARKS

    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise UsageError(f"{flag}: unknown benchmark {unknown[0]!r} (known: {', '.join(BENCHMARKS)})")


def cmd_eval_score(args: argparse.Namespace) -> int:
    from sharegpt4v.evaluation import flat_metrics, score_answers

    _known_benchmarks([args.benchmark], "--benchmark")
    results = score_answers(args.benchmark, args.answers, args.path, args.split)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in flat_metrics({args.benchmark: results}).items():
            print(f"{key}  {value:.4f}")
    return 0

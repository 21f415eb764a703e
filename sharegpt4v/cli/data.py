"""Commands on recipes and data: `config show`, `world generate`, `data ingest|inspect`, `caption *`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sharegpt4v.cli.common import _pairs, _recipe
from sharegpt4v.errors import UsageError


def cmd_config_show(args: argparse.Namespace) -> int:
    from sharegpt4v.training.memory import check_memory_fit, format_plan, memory_plan

    recipe = _recipe(args)
    print(json.dumps(recipe.to_dict(), indent=2) if args.json else recipe.to_yaml(), end="" if not args.json else "\n")
    # The per-GPU memory of each training stage (YAML comments; on stderr beside --json), then the fit check.
    print(format_plan(memory_plan(recipe), recipe.compute.device), end="", file=sys.stderr if args.json else sys.stdout, flush=True)
    check_memory_fit(recipe)
    return 0


def cmd_world_generate(args: argparse.Namespace) -> int:
    from sharegpt4v.world.generate import generate_world

    recipe = _recipe(args)
    world = recipe.world
    if args.workers:
        world.workers = args.workers
    result = generate_world(args.out, images=args.images, seed=args.seed, cfg=world, overwrite=args.overwrite)
    counts = result["counts"]
    print(
        f"world: {counts['ok']} images in {len(result['shards'])} shards "
        f"({', '.join(f'{k}={v}' for k, v in result['splits'].items())}) -> {args.out}"
    )
    return 0


def cmd_data_ingest(args: argparse.Namespace) -> int:
    from sharegpt4v.data.ingest import ingest

    recipe = _recipe(args)
    summary = ingest(
        args.source,
        args.out,
        recipe.ingest,
        kind=args.kind,
        source_name=args.source_name,
        image_root=args.images,
        overwrite=args.overwrite,
    )
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(summary.reasons.items())) or "none"
        print(
            f"ingest: ok={summary.ok} error={summary.error} duplicate={summary.duplicate} "
            f"skipped={summary.skipped} text_only={summary.text_only} -> {args.out}\n"
            f"errors by reason: {reasons}"
        )
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from sharegpt4v.data.inspect import inspect_dataset

    report = inspect_dataset(args.uri, verify=args.verify, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{report['uri']}[/bold]: {report['shards']} shards, {report['bytes'] / 1e6:.1f} MB")
    table = Table("status", "count")
    for key in ("ok", "error", "duplicate", "skipped", "text_only"):
        table.add_row(key, str(report[key]))
    console.print(table)
    for title, data in (("source", report["sources"]), ("split", report["splits"]), ("error reason", report["error_reasons"])):
        if data:
            t = Table(title, "count")
            for k, v in data.items():
                t.add_row(k, str(v))
            console.print(t)
    for reason, example in report["error_examples"].items():
        console.print(f"  e.g. [red]{reason}[/red] {example}")
    if report["captions"]:
        t = Table("caption field", "n", "mean chars", "median", "p90", "mean words")
        for name, stats in report["captions"].items():
            c, w = stats["chars"], stats["words"]
            t.add_row(name, str(c["count"]), f"{c['mean']:.0f}", f"{c['median']:.0f}", f"{c['p90']:.0f}", f"{w['mean']:.1f}")
        console.print(t)
    if not report["consistent_with_manifest"]:
        console.print(f"[red]manifest disagrees with the data: {report['manifest_mismatch']}[/red]")
    if args.verify:
        problems = report["integrity_problems"]
        console.print("integrity: " + ("[green]all files match their sha256[/green]" if not problems else f"[red]{problems}[/red]"))
        return 1 if problems else 0
    return 0


def _check_worker(args: argparse.Namespace) -> None:
    if args.worker >= args.num_workers:
        raise UsageError(f"--worker {args.worker}: outside 0..{args.num_workers - 1} "
                         f"(--num-workers {args.num_workers})")


def _run_job(args: argparse.Namespace, captioner: Any, batch_size: int) -> int:
    from sharegpt4v.captioning.job import run_caption_job

    summary = run_caption_job(
        args.input, args.out, captioner, batch_size=batch_size, worker=args.worker, num_workers=args.num_workers,
        split=args.split, retry_errors=args.retry_errors, overwrite=args.overwrite,
    )
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
        return 0
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(summary.reasons.items())) or "none"
    print(
        f"caption: {summary.captioned} captioned this run (ok={summary.ok} error={summary.error}; errors: {reasons}); "
        f"shards {summary.shards_done_before} done before + {summary.shards_completed} now of {summary.shards_total}"
    )
    if summary.stopped == "budget":
        print("stopped: the budget cap was reached; what finished is kept, rerun (with more budget) to continue")
    elif summary.complete:
        print(f"complete: {args.out}" + ("" if args.num_workers == 1 else " (run `caption finalize` to publish it)"))
    return 0


def cmd_caption_teacher(args: argparse.Namespace) -> int:
    from sharegpt4v.captioning.teacher import TeacherClient

    _check_worker(args)
    recipe = _recipe(args)
    if args.budget_usd is not None:
        if args.budget_usd < 0:
            raise UsageError(f"--budget-usd: must be >= 0, got {args.budget_usd}")
        recipe.teacher.budget_usd = args.budget_usd
    with TeacherClient(recipe.teacher) as client:
        return _run_job(args, client, batch_size=args.batch_size or 4 * recipe.teacher.concurrency)


def cmd_caption_run(args: argparse.Namespace) -> int:
    from sharegpt4v.captioning.engine import captioner_identity, make_captioner
    from sharegpt4v.captioning.job import check_caption_set
    from sharegpt4v.modeling.builder import checkpoint_digest

    _check_worker(args)
    recipe = _recipe(args)
    device = args.device or recipe.compute.device
    if not args.overwrite:  # another captioner's set is refused before a model is loaded
        check_caption_set(args.input, args.out, captioner_identity(checkpoint_digest(args.model), recipe.captioning),
                          args.split)
    captioner = make_captioner(args.model, recipe, device=device)
    try:
        return _run_job(args, captioner, batch_size=args.batch_size or recipe.captioning.batch_size)
    finally:
        captioner.close()


def cmd_caption_finalize(args: argparse.Namespace) -> int:
    from sharegpt4v.captioning.job import finalize_caption_set

    manifest = finalize_caption_set(args.input, args.out, args.split)
    print(f"caption set complete: {manifest['counts']} -> {args.out}")
    return 0


def cmd_caption_export(args: argparse.Namespace) -> int:
    from sharegpt4v.captioning.formats import export_conversations

    counts = export_conversations(args.records, args.out, dataset_uri=args.input, images_out=args.images_out)
    print(f"export: {counts['exported']} conversations ({counts['skipped_errors']} error records left out, "
          f"{counts['images']} images written) -> {args.out}")
    return 0


def cmd_caption_import(args: argparse.Namespace) -> int:
    from sharegpt4v.captioning.formats import import_conversations

    manifest = import_conversations(args.source, args.out, image_root=args.images)
    print(f"import: {manifest['counts']} -> {args.out}")
    return 0


def cmd_caption_report(args: argparse.Namespace) -> int:
    from sharegpt4v.captioning.report import run_report, world_caption_sets

    sets: dict[str, Any] = dict(_pairs(args.records, "--records", "NAME=URI"))
    if args.world_captions and not args.input:
        raise UsageError("--world-captions needs --input (a synthetic world dataset)")
    if not sets and not args.world_captions:
        raise UsageError("nothing to report: give --records NAME=URI and/or --world-captions")
    if args.world_captions:
        sets.update(world_caption_sets(args.input, args.split))
    report = run_report(sets, args.out, dataset_uri=args.input, split=args.split, samples=args.samples)
    print(f"caption report -> {args.out}/report.html")
    for row in report["comparison"]:
        print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return 0

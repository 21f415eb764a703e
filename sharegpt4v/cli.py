"""`sharegpt4v` command line: subcommands map to plain functions of the core package.

Exit codes: 0 success, 1 failure (one-line cause on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sharegpt4v.config import ConfigError, available_profiles, load_recipe


class CommandError(RuntimeError):
    """A failure to report as one line and exit 1."""


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="tiny", help=f"recipe profile ({', '.join(available_profiles())}) or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, e.g. world.image_size=32")


def _recipe(args: argparse.Namespace) -> Any:
    return load_recipe(args.profile, args.overrides)


# commands ---------------------------------------------------------------------------------


def cmd_config_show(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    print(json.dumps(recipe.to_dict(), indent=2) if args.json else recipe.to_yaml(), end="" if not args.json else "\n")
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


def cmd_services_up(args: argparse.Namespace) -> int:
    from sharegpt4v.services import local_services

    workdir = Path(args.dir)
    with local_services(workdir, mlflow_server=args.mlflow_server) as (s3, mlflow):
        # The keys go to a private file, not the terminal: a shell picks them up with `source`.
        env_file = workdir.resolve() / "env.sh"
        env_file.touch(mode=0o600)
        env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in {**s3.env, **mlflow.env}.items()))
        ui = mlflow.tracking_uri if args.mlflow_server else f"mlflow ui --backend-store-uri {mlflow.tracking_uri}"
        print(f"S3 (SeaweedFS): {s3.endpoint}  buckets: {', '.join(s3.buckets)}")
        print(f"MLflow: {ui}")
        print(f"In another shell: source {env_file}")
        print("Ctrl-C stops them", flush=True)
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        try:
            while not stop["now"] and s3.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sharegpt4v.demo import run_demo

    run_demo(Path(args.dir), images=args.images, seed=args.seed, profile=args.profile, overrides=args.overrides)
    return 0


# parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharegpt4v", description="ShareGPT4V recipe platform")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(group: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = add(sub, "demo", cmd_demo, "the main job on the embedded default: local S3 + MLflow, a synthetic world, its report")
    p.add_argument("--dir", default=".local/demo", help="working folder for the local services")
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    _recipe_args(p)

    config = sub.add_parser("config", help="recipes").add_subparsers(dest="action", required=True)
    p = add(config, "show", cmd_config_show, "print a resolved recipe (profile + overrides), validated")
    p.add_argument("--json", action="store_true")
    _recipe_args(p)

    world = sub.add_parser("world", help="the synthetic scene world").add_subparsers(dest="action", required=True)
    p = add(world, "generate", cmd_world_generate, "render a deterministic synthetic world into image shards")
    p.add_argument("--out", required=True, help="dataset folder: s3://bucket/prefix or a local path")
    p.add_argument("--images", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="parallel processes (default: world.workers)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset that already exists at --out")
    _recipe_args(p)

    data = sub.add_parser("data", help="image shards").add_subparsers(dest="action", required=True)
    p = add(data, "ingest", cmd_data_ingest, "turn images / img2dataset shards / a LLaVA JSON into image shards")
    p.add_argument("--from", dest="source", required=True, help="folder, shard folder, or conversation .json")
    p.add_argument("--out", required=True)
    p.add_argument("--kind", default="auto", choices=("auto", "folder", "wds", "json"))
    p.add_argument("--source", dest="source_name", default=None, help="source name for every sample (default: first sub-folder)")
    p.add_argument("--images", default=None, help="image root for a conversation JSON (default: the JSON's folder)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _recipe_args(p)
    p = add(data, "inspect", cmd_data_inspect, "counts by status/source/split, error reasons, duplicates, caption lengths")
    p.add_argument("uri")
    p.add_argument("--json", action="store_true", help="one JSON object (top level: ok, error, duplicate, ...)")
    p.add_argument("--verify", action="store_true", help="also re-hash every file against the manifest")

    services = sub.add_parser("services", help="embedded S3 and MLflow").add_subparsers(dest="action", required=True)
    p = add(services, "up", cmd_services_up, "run local S3 (SeaweedFS) and MLflow on loopback until Ctrl-C")
    p.add_argument("--dir", default=".local/services")
    p.add_argument("--mlflow-server", action="store_true", help="run an MLflow server with S3 artifacts (default: sqlite file)")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    from sharegpt4v.data.ingest import IngestError
    from sharegpt4v.services import ServiceError
    from sharegpt4v.storage import StoreError

    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"sharegpt4v: error: {exc}", file=sys.stderr)
        return 2
    except (CommandError, StoreError, IngestError, ServiceError, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"sharegpt4v: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sharegpt4v: interrupted", file=sys.stderr)
        return 130



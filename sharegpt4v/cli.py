"""`sharegpt4v` command line: subcommands map to plain functions of the core package.

Exit codes: 0 success, 1 failure (one-line cause on stderr), 2 usage error (a bad or missing argument
or argument value, a recipe that cannot run: also one line). `main()` is the one boundary where every
error becomes that line; `SHAREGPT4V_DEBUG=1` re-raises it for the full traceback.
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
from typing import Any, NoReturn

from sharegpt4v.config import ConfigError, available_profiles, load_recipe
from sharegpt4v.errors import PlatformError, UsageError, first_line
from sharegpt4v.redact import redact_text


class CommandError(PlatformError):
    """A failure to report as one line and exit 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one `--help` away), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low` (a count, a port, an index)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _port(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1..65535, got {value}")
    return value


def _seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


_COUNT = _int_at_least(1)
_NON_NEGATIVE = _int_at_least(0)


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="tiny", help=f"recipe profile ({', '.join(available_profiles())}) or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, e.g. world.image_size=32")


def _recipe(args: argparse.Namespace) -> Any:
    return load_recipe(args.profile, args.overrides)


# commands ---------------------------------------------------------------------------------


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


def _pairs(items: list[str], flag: str, shape: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"{flag} {item!r}: expected {shape}")
        pairs.append((name, value))
    return pairs


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _stop_on_signals() -> None:
    """SIGTERM (a pod's, a supervisor's) and SIGINT stop a long-running server like Ctrl-C. SIGINT is set
    explicitly: a process started in the background of a non-interactive shell inherits it ignored."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)


def cmd_teacher_sim_serve(args: argparse.Namespace) -> int:
    from sharegpt4v.captioning.teacher_sim import FAULT_KINDS, Faults, serve_forever

    kinds = tuple(k for k in args.fault_kinds.split(",") if k) if args.fault_kinds else FAULT_KINDS
    try:
        faults = Faults(rate=args.fault_rate, kinds=kinds, latency_s=args.latency_s)
    except ValueError as exc:
        raise UsageError(f"teacher-sim faults: {exc}") from None
    _stop_on_signals()
    serve_forever(args.world, host=args.host, port=args.port, faults=faults, seed=args.seed)
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
        _stop_on_signals()
        try:
            while s3.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sharegpt4v.demo import run_demo

    run_demo(Path(args.dir), images=args.images, seed=args.seed, profile=args.profile, overrides=args.overrides,
             shard_groups=args.shard_groups)
    return 0


def cmd_deploy_render(args: argparse.Namespace) -> int:
    from sharegpt4v import deploy

    if args.write or args.check:
        manifests = Path(args.manifests)
        if not (manifests / "base" / "kustomization.yaml").is_file():
            raise CommandError(f"{manifests}: not the manifests/ folder (no base/kustomization.yaml)")
        if args.check:
            stale = [str(path) for path, text in deploy.manifest_files(manifests).items()
                     if not path.is_file() or path.read_text() != text]
            if stale:
                raise CommandError(f"out of date (run `sharegpt4v deploy render --write`): {', '.join(stale)}")
            return 0
        for path in deploy.write_manifests(manifests):
            print(f"wrote {path}")
        return 0
    uris = dict(_key_value(item, "--storage-uri") for item in args.storage_uri)
    unknown = [name for name in uris if name not in deploy.SERVED_MODELS]
    if unknown:
        known = ", ".join(deploy.SERVED_MODELS)
        raise UsageError(f"--storage-uri {unknown[0]}=...: not a served model (known: {known})")
    objects = deploy.render_deployment(args.profile, models=tuple(args.model or deploy.SERVED_MODELS),
                                       storage_uris=uris, namespace=args.namespace, image=args.image,
                                       engine=args.engine, transformer_image=args.openai_image)
    print(deploy.to_yaml(objects), end="")
    return 0


def _openai_image_arg(p: argparse.ArgumentParser) -> None:
    from sharegpt4v.cluster import TRAIN_IMAGE

    p.add_argument("--openai-image", default=TRAIN_IMAGE, metavar="IMAGE",
                   help=f"image of the OpenAI API transformer (default: {TRAIN_IMAGE}, the train image)")


def _key_value(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
        raise UsageError(f"{flag} {item!r}: expected MODEL=s3://...")
    return key, value


def cmd_deploy_apply(args: argparse.Namespace) -> int:
    from sharegpt4v import deploy

    obj = deploy.render_inference_service(args.model, args.profile, storage_uri=args.storage_uri,
                                          namespace=args.namespace, transformer_image=args.openai_image)
    result = deploy.apply_inference_service(obj, dry_run=args.dry_run)
    if not args.dry_run:
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        print(f"InferenceService {namespace}/{name}: {result}", file=sys.stderr)
        if args.wait:
            status = deploy.wait_ready(name, namespace, timeout_s=args.timeout)
            print(f"InferenceService {namespace}/{name}: ready at {status['url']}", file=sys.stderr)
    return 0


def _model_refs(items: list[str]) -> dict[str, str]:
    """--model NAME=REF items, checked before any work: known served models, well-formed references."""
    from sharegpt4v import tracking
    from sharegpt4v.serving.repository import EXPORTABLE

    refs: dict[str, str] = {}
    for item in items:
        name, sep, ref = item.partition("=")
        if not sep or not name or not ref:
            raise UsageError(f"--model {item!r}: expected NAME=REF, e.g. chat=models:/sharegpt4v-chat@champion")
        if name not in EXPORTABLE:
            raise UsageError(f"--model {item!r}: {name!r} is not a served model (known: {', '.join(EXPORTABLE)})")
        tracking.parse_model_ref(ref)
        refs[name] = ref
    return refs


def cmd_serve_export(args: argparse.Namespace) -> int:
    from sharegpt4v.serving.export import export_model_repository

    result = export_model_repository(_model_refs(args.model), args.out, _recipe(args), kind=args.kind,
                                     replace=args.replace)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, info in result["models"].items():
        version = f"{info['name']}/{info['version']}" if info.get("version") else info["checkpoint"]
        print(f"{name}: {version} (checkpoint {info['checkpoint_digest']})")
    print(f"model repository ({result['instance_kind']}): {result['uri']}  manifest digest {result['digest'][:12]}")
    return 0


def _serve_until_interrupted(start: Any, name: str, banner: Any) -> int:
    """Start a server (`start()` returns it once ready), print `banner(server)`, run until Ctrl-C."""
    _stop_on_signals()
    try:
        server = start()
    except KeyboardInterrupt:
        print("sharegpt4v: stopped before the server was ready", file=sys.stderr)
        return 130
    with server:
        print(f"{banner(server)}; log: {server.log}; Ctrl-C stops it", flush=True)
        try:
            while server.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print(f"stopping {name}", flush=True)
            return 0
    raise CommandError(f"{name} exited with {server.process.returncode}; see {server.log}")


def cmd_serve_local(args: argparse.Namespace) -> int:
    import tempfile

    from sharegpt4v.serving.triton import start_triton

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sharegpt4v-triton-"))

    def banner(triton: Any) -> str:
        models = sorted(d.name for d in triton.repository.iterdir() if (d / "config.pbtxt").is_file())
        return f"Triton ready: HTTP {triton.http_url}  gRPC {triton.grpc_url}  models: {', '.join(models)}"

    return _serve_until_interrupted(
        lambda: start_triton(args.model_repo, workdir, http_port=args.http_port, grpc_port=args.grpc_port,
                             metrics_port=args.metrics_port, timeout=args.timeout), "tritonserver", banner)


def cmd_serve_vllm(args: argparse.Namespace) -> int:
    from sharegpt4v import tracking
    from sharegpt4v.serving.vllm_server import start_vllm_server

    checkpoint, _ = tracking.resolve_model(args.model)
    return _serve_until_interrupted(
        lambda: start_vllm_server(checkpoint, args.name, port=args.port, workdir=args.workdir, timeout=args.timeout),
        "the vLLM server", lambda server: f"vLLM ready: OpenAI API {server.openai_base_url} (model {args.name!r})")


def cmd_serve_openai(args: argparse.Namespace) -> int:
    from sharegpt4v.serving.openai_frontend import DEFAULT_MODELS, create_app, serve

    models = dict(_pairs(args.model, "--model", "OPENAI_ID=TRITON_MODEL")) if args.model else dict(DEFAULT_MODELS)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    try:
        app = create_app(args.triton_url, models, args.fetch_allow, api_key=api_key, timeout_s=args.timeout)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"OpenAI API on http://{args.host}:{args.port}/v1 (models: {', '.join(models)}) in front of Triton at "
          f"{redact_text(app.state.triton.base_url)}; Ctrl-C stops it", flush=True)
    serve(app, args.host, args.port)
    return 0


def _client_call(args: argparse.Namespace) -> dict[str, Any]:
    from sharegpt4v.serving import client

    if args.action == "chat" and args.stream and args.protocol != "grpc":
        raise UsageError("--stream: token streaming uses gRPC; add --protocol grpc")
    path = Path(args.image)
    if not path.is_file():
        raise CommandError(f"{args.image}: no such image file")
    image = path.read_bytes()
    url = args.url or client.DEFAULT_URLS[args.protocol]
    options = {"protocol": args.protocol, "host": args.host, "max_tokens": args.max_tokens,
               "temperature": args.temperature, "timeout": args.timeout}
    if args.model:
        options["model"] = args.model
    if args.action == "caption":
        return client.caption(url, image, prompt=args.prompt, **options)
    messages: list[dict[str, str]] = []
    if args.history:
        messages = json.loads(Path(args.history).read_text())
        if not isinstance(messages, list):
            raise CommandError(f"{args.history}: expected a JSON list of {{role, content}} messages")
    messages.append({"role": "user", "content": args.question})
    if args.stream:
        options.pop("protocol")
        options.setdefault("model", "chat_stream")
        final: dict[str, Any] = {}
        for piece in client.stream_chat(url, image, messages, **options):
            if "finish_reason" in piece:
                final = piece
            elif not args.json:
                print(piece["text"], end="", flush=True)
        if not args.json:
            print()
        return {**final, "streamed": True}
    return client.chat(url, image, messages, **options)


def cmd_client(args: argparse.Namespace) -> int:
    result = _client_call(args)
    if args.json:
        print(json.dumps(result, indent=2))
    elif not result.get("streamed"):
        print(result["text"])
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


# parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sharegpt4v", description="ShareGPT4V recipe platform")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(group: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = add(sub, "demo", cmd_demo, "the main job on the embedded default: the sharegpt4v pipeline with kfp.local on "
            "local S3 + MLflow, then the champion served on the local Triton server")
    p.add_argument("--dir", default=".local/demo", help="working folder for the local services and pipeline outputs")
    p.add_argument("--images", type=_COUNT, default=2000, help="synthetic world size (60 %% corpus, 30 %% seed captions "
                   "and SFT questions, 10 %% test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-groups", type=_COUNT, default=2, help="parallel corpus-captioning tasks (ParallelFor)")
    _recipe_args(p)

    config = sub.add_parser("config", help="recipes").add_subparsers(dest="action", required=True)
    p = add(config, "show", cmd_config_show, "print a resolved recipe (profile + overrides), validated")
    p.add_argument("--json", action="store_true")
    _recipe_args(p)

    world = sub.add_parser("world", help="the synthetic scene world").add_subparsers(dest="action", required=True)
    p = add(world, "generate", cmd_world_generate, "render a deterministic synthetic world into image shards")
    p.add_argument("--out", required=True, help="dataset folder: s3://bucket/prefix or a local path")
    p.add_argument("--images", type=_COUNT, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=_NON_NEGATIVE, default=0, help="parallel processes (default: world.workers)")
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

    caption = sub.add_parser("caption", help="captioning jobs and caption sets").add_subparsers(dest="action", required=True)

    def job_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--input", required=True, help="image dataset (folder with a shard manifest)")
        p.add_argument("--out", required=True, help="caption set folder (records per shard + manifest)")
        p.add_argument("--split", default=None, help="only this split (train/val/test); default: all")
        p.add_argument("--worker", type=_NON_NEGATIVE, default=0, help="this worker's index (KFP fan-out)")
        p.add_argument("--num-workers", type=_COUNT, default=1)
        p.add_argument("--batch-size", type=_NON_NEGATIVE, default=0,
                       help="images per captioner call (default from the recipe)")
        p.add_argument("--retry-errors", action="store_true", help="caption again the images whose record is an error")
        p.add_argument("--overwrite", action="store_true",
                       help="replace a caption set written by another captioner, prompt or input (default: refuse)")
        p.add_argument("--json", action="store_true", help="print the job summary as JSON")
        _recipe_args(p)

    p = add(caption, "teacher", cmd_caption_teacher,
            "seed captions from the teacher VLM (OpenAI-compatible endpoint from $OPENAI_BASE_URL / $OPENAI_API_KEY)")
    job_args(p)
    p.add_argument("--budget-usd", type=float, default=None, help="stop cleanly after spending this much (teacher.budget_usd)")
    p = add(caption, "run", cmd_caption_run, "caption a corpus with a trained captioner (LLaVA checkpoint folder or s3:// prefix)")
    job_args(p)
    p.add_argument("--model", required=True, help="captioner checkpoint written by the platform (with its manifest)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: compute.device of the recipe)")
    p = add(caption, "finalize", cmd_caption_finalize, "fan-in: publish the caption set once every shard is captioned")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default=None)
    p = add(caption, "export", cmd_caption_export, "caption set -> ShareGPT4V/LLaVA conversation JSON (+ images)")
    p.add_argument("--records", required=True, help="caption set folder")
    p.add_argument("--out", required=True, help="JSON file to write (local or s3://)")
    p.add_argument("--input", default=None, help="the image dataset, to name image files by format and to export them")
    p.add_argument("--images-out", default=None, help="also write the images here, under the JSON's image paths")
    p = add(caption, "import", cmd_caption_import, "ShareGPT4V/LLaVA caption JSON -> caption set")
    p.add_argument("--from", dest="source", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--images", default=None, help="image root, to record each image's sha256")

    p = add(caption, "report", cmd_caption_report,
            "caption quality report (lengths, POS, diversity, fact recall on the synthetic world) as JSON + HTML")
    p.add_argument("--records", action="append", default=[], metavar="NAME=URI", help="a caption set to include (repeat)")
    p.add_argument("--input", default=None, help="the image dataset: joins images, and scores facts on the synthetic world")
    p.add_argument("--split", default=None)
    p.add_argument("--world-captions", action="store_true", help="add the world's own brief and detailed captions as references")
    p.add_argument("--samples", type=_NON_NEGATIVE, default=12)
    p.add_argument("--out", required=True, help="folder (local or s3://) for report.json, report.html and plots")

    train = sub.add_parser("train", help="train a stage and register its checkpoint in MLflow").add_subparsers(
        dest="stage", required=True)
    for stage, about in (("captioner", "the captioner on seed captions"), ("pretrain", "LMM pretraining on detailed captions"),
                         ("sft", "instruction tuning (SFT) on the VQA/conversation mix")):
        p = add(train, stage, cmd_train, f"train {about}, register the checkpoint (alias candidate)")
        p.add_argument("--data", action="append", required=True, help="image dataset (repeat for several)")
        p.add_argument("--captions", default=None,
                       help="caption set (seed captions for the captioner, corpus captions for pretraining)")
        p.add_argument("--init", default=None,
                       help="start from this checkpoint or models:/<name>@<alias> (default: built from the recipe)")
        p.add_argument("--out", required=True, help="checkpoint prefix (checkpoint-<step>/ and final/)")
        p.add_argument("--split", default="train")
        p.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun); CPU: gloo")
        p.add_argument("--no-resume", action="store_true",
                       help="start over: remove the checkpoints and final model at --out (needed when they were made "
                            "from another recipe, data or init)")
        p.add_argument("--no-register", action="store_true", help="do not register the checkpoint as a model version")
        p.add_argument("--json", action="store_true")
        p.add_argument("--trainjob", action="store_true", help="print a Kubeflow Trainer TrainJob for this run instead")
        p.add_argument("--image", default=None, help="training image for --trainjob")
        p.add_argument("--name", default=None, help="TrainJob name (default: sharegpt4v-<stage>)")
        p.add_argument("--runtime", default="torch-distributed",
                       choices=("torch-distributed", "deepspeed-distributed", "sharegpt4v-deepspeed"),
                       help="Trainer runtime (sharegpt4v-deepspeed: the platform's, from manifests/)")
        p.add_argument("--namespace", default=None)
        _recipe_args(p)

    experiment = sub.add_parser("experiment", help="experiments built from the stages").add_subparsers(
        dest="action", required=True)
    p = add(experiment, "ablation", cmd_experiment_ablation,
            "the paper's ablation in miniature: brief vs detailed captions, full vs projector-only pretraining")
    p.add_argument("--out", default=".local/ablation", help="folder (local or s3://) for the world, runs and results")
    p.add_argument("--arms", default="A,B,D,C,shuffled,none",
                   help="comma-separated: A (brief), B (teacher-detailed), D (captioner-detailed), C (projector-only), "
                        "shuffled (B's captions on other images), none (no pretraining)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (the captioner is trained once, with the first)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the synthetic world")
    p.add_argument("--images", type=_COUNT, default=16000,
                   help="synthetic world size (train: foundations + pretraining, val: seed captions + SFT, test: evaluation)")
    p.add_argument("--lanes", type=_COUNT, default=2, help="runs in parallel (one per core)")
    _recipe_args(p)

    evaluation = sub.add_parser("eval", help="benchmarks").add_subparsers(dest="action", required=True)
    p = add(evaluation, "run", cmd_eval_run, "answer and score the benchmarks of eval.benchmarks with a model")
    p.add_argument("--model", required=True, help="checkpoint folder / s3:// prefix, or models:/<name>/<version|@alias>")
    p.add_argument("--out", required=True, help="folder (local or s3://) for answers, results.json/.md/.png")
    p.add_argument("--data", default=None, help="synthetic world dataset (for world-vqa)")
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME=PATH",
                   help="folder of a benchmark as it ships: mme, mmbench, scienceqa, gqa, textvqa (repeat)")
    p.add_argument("--benchmarks", dest="benchmarks_only", default=None,
                   help="comma-separated benchmarks to run (default: eval.benchmarks of the recipe)")
    p.add_argument("--promote", action="store_true",
                   help="alias the registered version 'champion' if eval.champion_metric >= eval.champion_threshold")
    _recipe_args(p)
    p = add(evaluation, "score", cmd_eval_score, "score an answers file produced elsewhere (LLaVA answers JSONL / MMBench xlsx)")
    p.add_argument("--benchmark", required=True, help="world-vqa, mme, mmbench, scienceqa, gqa or textvqa")
    p.add_argument("--answers", required=True)
    p.add_argument("--path", default=None, help="the benchmark's folder (MME: its ground truth; world-vqa: the dataset)")
    p.add_argument("--split", default="test")
    p.add_argument("--json", action="store_true")

    teacher_sim = sub.add_parser("teacher-sim", help="synthetic teacher endpoint (a stand-in for the paid teacher)")
    p = add(teacher_sim.add_subparsers(dest="action", required=True), "serve", cmd_teacher_sim_serve,
            "serve an OpenAI-compatible endpoint that answers with the synthetic world's detailed captions")
    p.add_argument("--world", required=True, help="synthetic world dataset whose images it knows")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--fault-kinds", default="", help="comma-separated: 429,500,503,slow,malformed,short,refusal,truncated")
    p.add_argument("--latency-s", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)

    pipeline = sub.add_parser("pipeline", help="Kubeflow Pipelines: compile, run locally, submit").add_subparsers(
        dest="action", required=True)
    p = add(pipeline, "compile", cmd_pipeline_compile, "compile the pipelines to IR YAML under pipelines/compiled/ "
            "and write the component reference, components/COMPONENTS.md")
    p.add_argument("--check", action="store_true", help="only check that the committed YAML (and the component "
                   "reference, components/COMPONENTS.md) is up to date and valid")
    p.add_argument("--image", default=None, metavar="REF",
                   help="the container image of every component, e.g. registry.example/sharegpt4v/train@sha256:<64 hex> "
                        "(default: components.resources.IMAGE, the image of the committed files)")
    p.add_argument("--out", "--output-dir", dest="out", default=None, metavar="DIR",
                   help="write (or with --check, compare) the IR YAML here instead of pipelines/compiled/")
    p = add(pipeline, "run", cmd_pipeline_run,
            "run the end-to-end pipeline with kfp.local here, on embedded S3 + MLflow and a synthetic world")
    p.add_argument("--local", action="store_true", required=True, help="run with kfp.local in this environment")
    p.add_argument("--dir", default=".local/pipeline", help="working folder (S3 data, MLflow, KFP outputs)")
    p.add_argument("--images", type=_COUNT, default=96, help="synthetic world size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-groups", type=_COUNT, default=2)
    p.add_argument("--champion-threshold", type=float, default=0.0)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="another pipeline parameter")
    p.add_argument("--json", action="store_true")
    _recipe_args(p)
    p = add(pipeline, "submit", cmd_pipeline_submit, "create a run (or a --recurring run) on a KFP endpoint")
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80")
    p.add_argument("--pipeline", default="sharegpt4v", help="sharegpt4v, caption-corpus, train-captioner or train-lmm")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="pipeline parameter (JSON values are parsed: numbers, true/false, lists)")
    p.add_argument("--experiment", default="sharegpt4v")
    p.add_argument("--run-name", default=None)
    p.add_argument("--recurring", default=None, metavar="CRON",
                   help="create a recurring run on this KFP cron schedule (6 fields, seconds first) instead")
    p.add_argument("--namespace", default=None)

    services = sub.add_parser("services", help="embedded S3 and MLflow").add_subparsers(dest="action", required=True)
    p = add(services, "up", cmd_services_up, "run local S3 (SeaweedFS) and MLflow on loopback until Ctrl-C")
    p.add_argument("--dir", default=".local/services")
    p.add_argument("--mlflow-server", action="store_true", help="run an MLflow server with S3 artifacts (default: sqlite file)")

    deploy = sub.add_parser("deploy", help="KServe serving objects (manifests/, the pipeline's deploy step)").add_subparsers(
        dest="action", required=True)
    p = add(deploy, "render", cmd_deploy_render,
            "print a profile's serving objects (Triton ServingRuntime, ServiceAccount, InferenceServices) as YAML")
    p.add_argument("--profile", default="prod", choices=("dev", "prod"))
    p.add_argument("--model", action="append", choices=("captioner", "chat"), help="only this model (repeat)")
    p.add_argument("--storage-uri", action="append", default=[], metavar="MODEL=S3_URI",
                   help="model repository of a model (default: s3://sharegpt4v/serving/<model>)")
    p.add_argument("--namespace", default="sharegpt4v")
    p.add_argument("--image", default=None, help="image of the ServingRuntime (default: sharegpt4v/serving:<version>; "
                                                  "with --engine vllm sharegpt4v/train:<version>)")
    p.add_argument("--engine", default="transformers", choices=("transformers", "vllm"),
                   help="transformers: Triton on a model repository; vllm: vLLM's OpenAI server on a checkpoint "
                        "(--storage-uri then names llava-hf checkpoints)")
    _openai_image_arg(p)
    p.add_argument("--write", action="store_true", help="regenerate the generated files under --manifests instead")
    p.add_argument("--check", action="store_true", help="exit 1 if the generated files under --manifests are out of date")
    p.add_argument("--manifests", default="manifests", help="the repository's manifests/ folder")
    p = add(deploy, "apply", cmd_deploy_apply,
            "create or merge-patch a model's InferenceService (in-cluster config or kubeconfig)")
    p.add_argument("--model", required=True, choices=("captioner", "chat"))
    p.add_argument("--storage-uri", default=None, help="s3:// prefix of the Triton model repository")
    p.add_argument("--profile", default="prod", choices=("dev", "prod"))
    p.add_argument("--namespace", default="sharegpt4v")
    p.add_argument("--dry-run", action="store_true", help="print the InferenceService and change nothing")
    _openai_image_arg(p)
    p.add_argument("--wait", action="store_true", help="wait until it is Ready")
    p.add_argument("--timeout", type=_seconds, default=1800.0, help="seconds --wait waits")
    serve = sub.add_parser("serve", help="Triton model repositories and local serving").add_subparsers(
        dest="action", required=True)
    p = add(serve, "export", cmd_serve_export,
            "registered models -> a Triton model repository under an S3 prefix (or folder), manifest last")
    p.add_argument("--model", action="append", required=True, metavar="NAME=REF",
                   help="served model (captioner or chat) = models:/<name>@<alias>, models:/<name>/<version> "
                        "or a checkpoint URI (repeat)")
    p.add_argument("--out", required=True, help="repository prefix, e.g. s3://sharegpt4v/serving/chat/")
    p.add_argument("--kind", default=None, choices=("KIND_GPU", "KIND_CPU"),
                   help="Triton instance kind (default: serving.instance_kind of the recipe)")
    p.add_argument("--replace", action="store_true",
                   help="replace a repository that serves other models at --out (default: refuse; the same one is kept)")
    p.add_argument("--json", action="store_true")
    _recipe_args(p)
    p = add(serve, "local", cmd_serve_local,
            "serve a model repository with the real Triton server (nvidia-pytriton wheel) on loopback until Ctrl-C")
    p.add_argument("--model-repo", required=True, help="repository: s3:// prefix (downloaded first) or a folder")
    p.add_argument("--http-port", type=_port, default=8000)
    p.add_argument("--grpc-port", type=_port, default=8001)
    p.add_argument("--metrics-port", type=_port, default=8002)
    p.add_argument("--workdir", default=None, help="folder for the download and the server log (default: a temp folder)")
    p.add_argument("--timeout", type=_seconds, default=300.0, help="seconds to wait for the models to load")

    p = add(serve, "vllm", cmd_serve_vllm,
            "serve a checkpoint with vLLM's OpenAI server (engine environment) on loopback until Ctrl-C")
    p.add_argument("--model", required=True, help="checkpoint: folder, s3:// prefix or models:/<name>@<alias>")
    p.add_argument("--name", default="chat", help="the model name clients ask for")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--workdir", default=None, help="folder for the server log (default: a temp folder)")
    p.add_argument("--timeout", type=_seconds, default=600.0, help="seconds to wait for the model to load")

    p = add(serve, "openai", cmd_serve_openai,
            "an OpenAI-compatible API (chat completions with an image, streaming, models) in front of a Triton server "
            "serving the chat model and/or the captioner, until Ctrl-C; in the cluster, the InferenceService's transformer")
    p.add_argument("--triton-url", "--predictor_host", dest="triton_url", required=True, metavar="URL",
                   help="the Triton server's HTTP endpoint, e.g. http://127.0.0.1:8000 (KServe passes --predictor_host)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    p.add_argument("--port", "--http_port", dest="port", type=_port, default=8080)
    p.add_argument("--model", action="append", default=[], metavar="OPENAI_ID=TRITON_MODEL",
                   help="a model clients ask for, and the Triton model behind it (repeat; default: "
                        "sharegpt4v-chat=chat and sharegpt4v-captioner=captioner)")
    p.add_argument("--fetch-allow", action="append", default=[], metavar="PREFIX",
                   help="image URLs the server may fetch start with this s3://bucket/prefix or http(s)://host/path "
                        "(repeat; default: none, images come as data URLs)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="require `Authorization: Bearer $VAR` (default: any key is accepted)")
    p.add_argument("--timeout", type=_seconds, default=300.0, help="seconds a generation may take")
    p.add_argument("--model_name", help=argparse.SUPPRESS)  # KServe appends the InferenceService's name...
    p.add_argument("--workers", help=argparse.SUPPRESS)  # ...and, with containerConcurrency, a worker count

    client = sub.add_parser("client", help="call a served model over the V2 protocol (local Triton or KServe)")
    client_sub = client.add_subparsers(dest="action", required=True)

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=None, help="server base URL (default: http://127.0.0.1:8000, gRPC 127.0.0.1:8001)")
        p.add_argument("--protocol", default="http", choices=("http", "grpc"))
        p.add_argument("--host", default=None, help="virtual host behind an ingress (a KServe InferenceService's hostname)")
        p.add_argument("--model", default=None, help="Triton model name (default: captioner / chat)")
        p.add_argument("--max-tokens", type=_COUNT, default=None)
        p.add_argument("--temperature", type=float, default=None)
        p.add_argument("--timeout", type=_seconds, default=120.0)
        p.add_argument("--json", action="store_true", help="print text, finish reason and token counts as JSON")

    p = add(client_sub, "caption", cmd_client, "a detailed caption of an image file")
    p.add_argument("image")
    p.add_argument("--prompt", default=None, help="instruction (default: the captioner's own)")
    client_args(p)
    p = add(client_sub, "chat", cmd_client, "ask the chat model a question about an image file")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--history", default=None, help="JSON file with earlier turns: [{role, content}, ...]")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (chat_stream model, gRPC)")
    client_args(p)
    return parser


def error_line(exc: BaseException) -> str:
    """The one line the CLI prints for `exc`, without credentials in any URL it quotes. Our own errors
    (PlatformError, ConfigError) and OSError / ValueError say what went wrong in their message; any other
    type (a bug, or a third-party layer's error nobody translated) is named, with where to look further."""
    message = first_line(exc)
    if not isinstance(exc, (PlatformError, ConfigError, ValueError, OSError)):
        message = f"{type(exc).__name__}: {message} (SHAREGPT4V_DEBUG=1 shows the traceback)"
    return redact_text(message)


def main(argv: list[str] | None = None) -> int:
    """Run one command: 0 success, 1 failure, 2 usage error; every error is one line on stderr."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), its line already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("sharegpt4v: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("SHAREGPT4V_DEBUG"):
            raise  # the full traceback, for developers
        print(f"sharegpt4v: error: {error_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, (UsageError, ConfigError)) else 1



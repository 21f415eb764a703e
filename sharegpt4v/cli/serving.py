"""Commands that run servers or talk to them: `teacher-sim serve`, `services up`, `deploy render|apply`,
`serve export|local|vllm|openai`, `client caption|chat`."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sharegpt4v.cli.common import CommandError, _pairs, _recipe
from sharegpt4v.errors import UsageError
from sharegpt4v.redact import redact_text


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
        try:  # the banner inside: a stop signal can land while it is flushed (see teacher_sim.serve_forever)
            print(f"{banner(server)}; log: {server.log}; Ctrl-C stops it", flush=True)
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

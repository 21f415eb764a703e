"""`build_parser()`: every command, its flags and help. Commands are looked up in their modules when the
parser is built, so a test can replace one (`monkeypatch.setattr(data, "cmd_config_show", ...)`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from sharegpt4v.cli import data as data_cmds
from sharegpt4v.cli import pipelines as pipelines_cmds
from sharegpt4v.cli import serving as serving_cmds
from sharegpt4v.cli import training as training_cmds
from sharegpt4v.cli.common import _COUNT, _NON_NEGATIVE, _Parser, _port, _recipe_args, _seconds


def _openai_image_arg(p: argparse.ArgumentParser) -> None:
    from sharegpt4v.cluster import TRAIN_IMAGE

    p.add_argument("--openai-image", default=TRAIN_IMAGE, metavar="IMAGE",
                   help=f"image of the OpenAI API transformer (default: {TRAIN_IMAGE}, the train image)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sharegpt4v", description="ShareGPT4V recipe platform")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(group: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = add(sub, "demo", pipelines_cmds.cmd_demo,
            "the main job on the embedded default: the sharegpt4v pipeline with kfp.local on "
            "local S3 + MLflow, then the champion served on the local Triton server")
    p.add_argument("--dir", default=".local/demo", help="working folder for the local services and pipeline outputs")
    p.add_argument("--images", type=_COUNT, default=2000, help="synthetic world size (60 %% corpus, 30 %% seed captions "
                   "and SFT questions, 10 %% test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-groups", type=_COUNT, default=2, help="parallel corpus-captioning tasks (ParallelFor)")
    _recipe_args(p)

    config = sub.add_parser("config", help="recipes").add_subparsers(dest="action", required=True)
    p = add(config, "show", data_cmds.cmd_config_show, "print a resolved recipe (profile + overrides), validated")
    p.add_argument("--json", action="store_true")
    _recipe_args(p)

    world = sub.add_parser("world", help="the synthetic scene world").add_subparsers(dest="action", required=True)
    p = add(world, "generate", data_cmds.cmd_world_generate, "render a deterministic synthetic world into image shards")
    p.add_argument("--out", required=True, help="dataset folder: s3://bucket/prefix or a local path")
    p.add_argument("--images", type=_COUNT, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=_NON_NEGATIVE, default=0, help="parallel processes (default: world.workers)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset that already exists at --out")
    _recipe_args(p)

    data = sub.add_parser("data", help="image shards").add_subparsers(dest="action", required=True)
    p = add(data, "ingest", data_cmds.cmd_data_ingest,
            "turn images / img2dataset shards / a LLaVA JSON into image shards")
    p.add_argument("--from", dest="source", required=True, help="folder, shard folder, or conversation .json")
    p.add_argument("--out", required=True)
    p.add_argument("--kind", default="auto", choices=("auto", "folder", "wds", "json"))
    p.add_argument("--source", dest="source_name", default=None, help="source name for every sample (default: first sub-folder)")
    p.add_argument("--images", default=None, help="image root for a conversation JSON (default: the JSON's folder)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _recipe_args(p)
    p = add(data, "inspect", data_cmds.cmd_data_inspect,
            "counts by status/source/split, error reasons, duplicates, caption lengths")
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

    p = add(caption, "teacher", data_cmds.cmd_caption_teacher,
            "seed captions from the teacher VLM (OpenAI-compatible endpoint from $OPENAI_BASE_URL / $OPENAI_API_KEY)")
    job_args(p)
    p.add_argument("--budget-usd", type=float, default=None, help="stop cleanly after spending this much (teacher.budget_usd)")
    p = add(caption, "run", data_cmds.cmd_caption_run,
            "caption a corpus with a trained captioner (LLaVA checkpoint folder or s3:// prefix)")
    job_args(p)
    p.add_argument("--model", required=True, help="captioner checkpoint written by the platform (with its manifest)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: compute.device of the recipe)")
    p = add(caption, "finalize", data_cmds.cmd_caption_finalize,
            "fan-in: publish the caption set once every shard is captioned")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default=None)
    p = add(caption, "export", data_cmds.cmd_caption_export,
            "caption set -> ShareGPT4V/LLaVA conversation JSON (+ images)")
    p.add_argument("--records", required=True, help="caption set folder")
    p.add_argument("--out", required=True, help="JSON file to write (local or s3://)")
    p.add_argument("--input", default=None, help="the image dataset, to name image files by format and to export them")
    p.add_argument("--images-out", default=None, help="also write the images here, under the JSON's image paths")
    p = add(caption, "import", data_cmds.cmd_caption_import, "ShareGPT4V/LLaVA caption JSON -> caption set")
    p.add_argument("--from", dest="source", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--images", default=None, help="image root, to record each image's sha256")

    p = add(caption, "report", data_cmds.cmd_caption_report,
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
        p = add(train, stage, training_cmds.cmd_train, f"train {about}, register the checkpoint (alias candidate)")
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
    p = add(experiment, "ablation", training_cmds.cmd_experiment_ablation,
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

    p = add(experiment, "probe-sft", training_cmds.cmd_experiment_probe_sft,
            "SFT (the recipe's, with your overrides) from each arm's pretrained model of a finished ablation, evaluated")
    p.add_argument("--ablation", required=True, help="folder of a finished `experiment ablation`")
    p.add_argument("--out", required=True, help="folder for the probe's checkpoints and answers")
    p.add_argument("--arms", default="A,B", help="comma-separated arms whose pretrained models to start from")
    p.add_argument("--seed", type=int, default=0, help="the ablation seed whose pretrained models to use")
    p.add_argument("--lanes", type=_COUNT, default=2, help="runs in parallel (one per core)")
    _recipe_args(p)
    p = add(experiment, "probe-vision", training_cmds.cmd_experiment_probe_vision,
            "a vision tower trained as the recipe's foundations say, beside the ablation's, read by linear probes")
    p.add_argument("--ablation", required=True, help="folder of a finished `experiment ablation`")
    _recipe_args(p)

    evaluation = sub.add_parser("eval", help="benchmarks").add_subparsers(dest="action", required=True)
    p = add(evaluation, "run", training_cmds.cmd_eval_run,
            "answer and score the benchmarks of eval.benchmarks with a model")
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
    p = add(evaluation, "score", training_cmds.cmd_eval_score,
            "score an answers file produced elsewhere (LLaVA answers JSONL / MMBench xlsx)")
    p.add_argument("--benchmark", required=True, help="world-vqa, mme, mmbench, scienceqa, gqa or textvqa")
    p.add_argument("--answers", required=True)
    p.add_argument("--path", default=None, help="the benchmark's folder (MME: its ground truth; world-vqa: the dataset)")
    p.add_argument("--split", default="test")
    p.add_argument("--json", action="store_true")

    teacher_sim = sub.add_parser("teacher-sim", help="synthetic teacher endpoint (a stand-in for the paid teacher)")
    p = add(teacher_sim.add_subparsers(dest="action", required=True), "serve", serving_cmds.cmd_teacher_sim_serve,
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
    p = add(pipeline, "compile", pipelines_cmds.cmd_pipeline_compile,
            "compile the pipelines to IR YAML under pipelines/compiled/ "
            "and write the component reference, components/COMPONENTS.md")
    p.add_argument("--check", action="store_true", help="only check that the committed YAML (and the component "
                   "reference, components/COMPONENTS.md) is up to date and valid")
    p.add_argument("--image", default=None, metavar="REF",
                   help="the container image of every component, e.g. registry.example/sharegpt4v/train@sha256:<64 hex> "
                        "(default: components.resources.IMAGE, the image of the committed files)")
    p.add_argument("--out", "--output-dir", dest="out", default=None, metavar="DIR",
                   help="write (or with --check, compare) the IR YAML here instead of pipelines/compiled/")
    p = add(pipeline, "run", pipelines_cmds.cmd_pipeline_run,
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
    p = add(pipeline, "submit", pipelines_cmds.cmd_pipeline_submit,
            "create a run (or a --recurring run) on a KFP endpoint")
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
    p = add(services, "up", serving_cmds.cmd_services_up,
            "run local S3 (SeaweedFS) and MLflow on loopback until Ctrl-C")
    p.add_argument("--dir", default=".local/services")
    p.add_argument("--mlflow-server", action="store_true", help="run an MLflow server with S3 artifacts (default: sqlite file)")

    deploy = sub.add_parser("deploy", help="KServe serving objects (manifests/, the pipeline's deploy step)").add_subparsers(
        dest="action", required=True)
    p = add(deploy, "render", serving_cmds.cmd_deploy_render,
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
    p = add(deploy, "apply", serving_cmds.cmd_deploy_apply,
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
    p = add(serve, "export", serving_cmds.cmd_serve_export,
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
    p = add(serve, "local", serving_cmds.cmd_serve_local,
            "serve a model repository with the real Triton server (nvidia-pytriton wheel) on loopback until Ctrl-C")
    p.add_argument("--model-repo", required=True, help="repository: s3:// prefix (downloaded first) or a folder")
    p.add_argument("--http-port", type=_port, default=8000)
    p.add_argument("--grpc-port", type=_port, default=8001)
    p.add_argument("--metrics-port", type=_port, default=8002)
    p.add_argument("--workdir", default=None, help="folder for the download and the server log (default: a temp folder)")
    p.add_argument("--timeout", type=_seconds, default=300.0, help="seconds to wait for the models to load")

    p = add(serve, "vllm", serving_cmds.cmd_serve_vllm,
            "serve a checkpoint with vLLM's OpenAI server (engine environment) on loopback until Ctrl-C")
    p.add_argument("--model", required=True, help="checkpoint: folder, s3:// prefix or models:/<name>@<alias>")
    p.add_argument("--name", default="chat", help="the model name clients ask for")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--workdir", default=None, help="folder for the server log (default: a temp folder)")
    p.add_argument("--timeout", type=_seconds, default=600.0, help="seconds to wait for the model to load")

    p = add(serve, "openai", serving_cmds.cmd_serve_openai,
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

    p = add(client_sub, "caption", serving_cmds.cmd_client, "a detailed caption of an image file")
    p.add_argument("image")
    p.add_argument("--prompt", default=None, help="instruction (default: the captioner's own)")
    client_args(p)
    p = add(client_sub, "chat", serving_cmds.cmd_client, "ask the chat model a question about an image file")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--history", default=None, help="JSON file with earlier turns: [{role, content}, ...]")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (chat_stream model, gRPC)")
    client_args(p)
    return parser

"""KFP components, one per stage: each body imports the project and calls one function of
`sharegpt4v.stages` (which calls the core). Inputs and outputs are URIs, digests and small
JSON values; the data stays in S3. Metrics and HTML artifacts are what the KFP UI shows.

The base image is the project's training image (`components.resources.IMAGE`) and the project
imports sit inside the bodies with `install_kfp_package=False`: a cluster run uses the image as it
is, a local run (`kfp.local.SubprocessRunner(use_venv=False)`) the installed project. Resources,
secrets, retries and caching are set by `components.resources`, not here.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from components.resources import IMAGE


def component(fn):
    """`@dsl.component` on the project image, without installing kfp (the image has it)."""
    return dsl.component(fn, base_image=IMAGE, install_kfp_package=False)


# the pipeline's MLflow run ------------------------------------------------------------------------


@component
def start_run(pipeline: str, kfp_run_id: str, kfp_run_name: str, params: dict, overrides: list, experiment: str,
              gpu_product: str) -> NamedTuple("Outputs", [("mlflow_run_id", str), ("gpu_node_selector", dict)]):
    """Create the pipeline's MLflow run (KFP run id, parameters); the GPU node selector for GPU tasks."""
    from sharegpt4v import stages as steps
    from sharegpt4v.cluster import GPU_PRODUCT_LABEL

    run_id = steps.start_pipeline_run(pipeline, kfp_run_id, kfp_run_name, {**params, "overrides": " ".join(overrides)},
                                      experiment)
    outputs = NamedTuple("Outputs", [("mlflow_run_id", str), ("gpu_node_selector", dict)])
    return outputs(run_id, {GPU_PRODUCT_LABEL: gpu_product})


@component
def finish_run(kfp_run_id: str, status: dsl.PipelineTaskFinalStatus) -> str:
    """Exit handler: mark the pipeline's MLflow run FINISHED, or FAILED when a step failed."""
    from sharegpt4v import stages as steps

    return steps.finish_pipeline_run(kfp_run_id, status.state, status.error_message or "")


# data ---------------------------------------------------------------------------------------------


@component
def synthetic_world(out_root: str, images: int, seed: int, profile: str, overrides: list,
                    metrics: Output[Metrics]) -> NamedTuple("Outputs", [("uri", str), ("digest", str)]):
    """Render a synthetic world (known ground truth) into image shards."""
    from sharegpt4v import stages as steps

    result = steps.synthetic_world(out_root, images, seed, profile, overrides)
    metrics.log_metric("images", result["ok"])
    metrics.log_metric("shards", result["shards"])
    for split, count in result["splits"].items():
        metrics.log_metric(f"split.{split}", count)
    outputs = NamedTuple("Outputs", [("uri", str), ("digest", str)])
    return outputs(result["uri"], result["digest"])


@component
def ingest(source_uri: str, out_root: str, kind: str, source_name: str, profile: str, overrides: list,
           metrics: Output[Metrics]) -> NamedTuple("Outputs", [("uri", str), ("digest", str)]):
    """Images / img2dataset shards / a LLaVA conversation JSON -> image shards with a manifest."""
    from sharegpt4v import stages as steps

    result = steps.ingest_images(source_uri, out_root, kind, source_name, profile, overrides)
    for key in ("ok", "error", "duplicate"):
        metrics.log_metric(key, result[key])
    outputs = NamedTuple("Outputs", [("uri", str), ("digest", str)])
    return outputs(result["uri"], result["digest"])


@component
def dataset_digest(uri: str) -> str:
    """Digest of a complete folder's manifest (dataset or caption set): the cache key of what reads it."""
    from sharegpt4v import stages as steps

    return steps.folder_digest(uri)


# captioning ---------------------------------------------------------------------------------------


@component
def seed_captions(dataset_uri: str, out_root: str, split: str, teacher_endpoint: str, teacher_model: str,
                  budget_usd: float, profile: str, overrides: list,
                  metrics: Output[Metrics]) -> NamedTuple("Outputs", [("uri", str), ("digest", str)]):
    """Seed captions from the teacher VLM (OpenAI-compatible; key from the teacher Secret)."""
    from sharegpt4v import stages as steps

    result = steps.seed_captions(dataset_uri, out_root, split, teacher_endpoint, teacher_model, budget_usd, profile,
                                 overrides)
    for key in ("ok", "error", "captioned"):
        metrics.log_metric(key, result[key])
    outputs = NamedTuple("Outputs", [("uri", str), ("digest", str)])
    return outputs(result["uri"], result["digest"])


@component
def shard_groups(dataset_uri: str, dataset_digest: str, model: str, groups: int, overrides: list) -> list:
    """The fan-out of corpus captioning: one job per shard group, [{group, groups, dataset, model, overrides}].

    The jobs carry the upstream values the loop body needs (kfp.local resolves an upstream task's
    output inside a ParallelFor body to the loop item; the loop item itself is resolved right).
    """
    if groups < 1:
        raise ValueError(f"shard_groups: need at least 1 group, got {groups}")
    return [{"group": i, "groups": groups, "dataset_uri": dataset_uri, "dataset_digest": dataset_digest, "model": model,
             "overrides": list(overrides)} for i in range(groups)]


@component
def caption_shard_group(job: dict, out_root: str, split: str, gpus: int, profile: str) -> dict:
    """Caption shard group `job["group"]` of `job["groups"]` of the corpus with the trained captioner."""
    from sharegpt4v import stages as steps

    return steps.caption_shard_group(job["dataset_uri"], job["dataset_digest"], job["model"], out_root, job["group"],
                                     job["groups"], split, gpus, profile, job["overrides"])


@component
def merge_captions(dataset_uri: str, split: str, groups: list, reference: str, report_root: str,
                   metrics: Output[Metrics], report: Output[HTML]) -> NamedTuple("Outputs", [("uri", str),
                                                                                            ("digest", str)]):
    """Fan-in: publish the corpus caption set once every shard is captioned; its quality report."""
    from sharegpt4v import stages as steps

    result = steps.merge_captions(dataset_uri, split, groups, reference, report_root)
    for key, value in result["counts"].items():
        metrics.log_metric(f"records.{key}", value)
    for key, value in sorted(result["metrics"].items()):
        metrics.log_metric(key, value)
    with open(report.path, "w") as f:
        f.write(result["html"])
    outputs = NamedTuple("Outputs", [("uri", str), ("digest", str)])
    return outputs(result["uri"], result["digest"])


# training -----------------------------------------------------------------------------------------


@component
def foundations(dataset_uri: str, dataset_digest: str, out_root: str, profile: str, overrides: list,
                metrics: Output[Metrics]) -> list:
    """The recipe overrides of every later task: `overrides`, plus the CLIP and Vicuna stand-ins trained on
    the data when the model is built from config (tiny profile); unchanged for checkpoint-based recipes."""
    from sharegpt4v import stages as steps

    result = steps.foundations(dataset_uri, dataset_digest, out_root, profile, overrides)
    for key, value in sorted(result.get("metrics", {}).items()):
        metrics.log_metric(key, value)
    return result["overrides"]


@component
def train_base(dataset_uri: str, dataset_digest: str, split: str, out_root: str, gpus: int, profile: str,
               overrides: list, metrics: Output[Metrics]) -> NamedTuple("Outputs", [("checkpoint_uri", str),
                                                                                   ("model_uri", str),
                                                                                   ("digest", str), ("version", str)]):
    """Pretrain on brief captions (LLaVA-1.5's stage): the LMM the captioner is fine-tuned from; register it
    (sharegpt4v-base)."""
    from sharegpt4v import stages as steps

    result = steps.train("pretrain", dataset_uri, dataset_digest, "", "", "", out_root, gpus, profile,
                         [*overrides, "pretrain.caption_field=brief_caption"], split=split, register_as="base")
    for key in ("steps", "final_loss", "samples_seen", "flagged_samples"):
        metrics.log_metric(key, result[key])
    outputs = NamedTuple("Outputs", [("checkpoint_uri", str), ("model_uri", str), ("digest", str), ("version", str)])
    return outputs(result["checkpoint_uri"], result["model_uri"], result["digest"], result["version"])


@component
def given_model(model: str) -> NamedTuple("Outputs", [("model_uri", str)]):
    """A model given as a pipeline parameter, as a task output (the other branch of `train_base`)."""
    outputs = NamedTuple("Outputs", [("model_uri", str)])
    return outputs(model)


@component
def train_captioner(dataset_uri: str, dataset_digest: str, captions: str, captions_digest: str, init: str,
                    split: str, out_root: str, gpus: int, profile: str, overrides: list,
                    metrics: Output[Metrics]) -> NamedTuple("Outputs", [("checkpoint_uri", str), ("model_uri", str),
                                                                        ("digest", str), ("version", str)]):
    """Fine-tune the captioner from a pretrained LMM on the teacher's seed captions of `split`; register it
    (sharegpt4v-captioner, alias candidate)."""
    from sharegpt4v import stages as steps

    result = steps.train("captioner", dataset_uri, dataset_digest, captions, captions_digest, init, out_root, gpus,
                         profile, overrides, split=split)
    for key in ("steps", "final_loss", "samples_seen", "flagged_samples"):
        metrics.log_metric(key, result[key])
    outputs = NamedTuple("Outputs", [("checkpoint_uri", str), ("model_uri", str), ("digest", str), ("version", str)])
    return outputs(result["checkpoint_uri"], result["model_uri"], result["digest"], result["version"])


@component
def pretrain(dataset_uri: str, dataset_digest: str, captions: str, captions_digest: str, init: str, split: str,
             out_root: str, gpus: int, profile: str, overrides: list,
             metrics: Output[Metrics]) -> NamedTuple("Outputs", [("checkpoint_uri", str), ("model_uri", str),
                                                                 ("digest", str), ("version", str)]):
    """Pretrain the LMM on the corpus split with its detailed captions; register it (sharegpt4v-pretrained)."""
    from sharegpt4v import stages as steps

    result = steps.train("pretrain", dataset_uri, dataset_digest, captions, captions_digest, init, out_root, gpus,
                         profile, overrides, split=split)
    for key in ("steps", "final_loss", "samples_seen", "flagged_samples"):
        metrics.log_metric(key, result[key])
    outputs = NamedTuple("Outputs", [("checkpoint_uri", str), ("model_uri", str), ("digest", str), ("version", str)])
    return outputs(result["checkpoint_uri"], result["model_uri"], result["digest"], result["version"])


@component
def sft(dataset_uri: str, dataset_digest: str, init: str, split: str, out_root: str, gpus: int, profile: str,
        overrides: list, metrics: Output[Metrics]) -> NamedTuple("Outputs", [("checkpoint_uri", str),
                                                                            ("model_uri", str), ("digest", str),
                                                                            ("version", str)]):
    """Instruction-tune the pretrained LMM on the SFT mix of `split`; register it (sharegpt4v-chat, alias candidate)."""
    from sharegpt4v import stages as steps

    result = steps.train("sft", dataset_uri, dataset_digest, "", "", init, out_root, gpus, profile, overrides,
                         split=split)
    for key in ("steps", "final_loss", "samples_seen", "flagged_samples"):
        metrics.log_metric(key, result[key])
    outputs = NamedTuple("Outputs", [("checkpoint_uri", str), ("model_uri", str), ("digest", str), ("version", str)])
    return outputs(result["checkpoint_uri"], result["model_uri"], result["digest"], result["version"])


# evaluation, registry, serving --------------------------------------------------------------------


@component
def evaluate(model: str, model_digest: str, dataset_uri: str, out_root: str, metric: str, gpus: int, profile: str,
             overrides: list, metrics: Output[Metrics],
             table: Output[HTML]) -> NamedTuple("Outputs", [("score", float), ("results", dict), ("out", str)]):
    """Answer and score the benchmarks of `eval.benchmarks`; `score` is the champion metric."""
    import html

    from sharegpt4v import stages as steps

    result = steps.evaluate(model, dataset_uri, out_root, metric, gpus, profile, overrides)
    for key, value in sorted(result["metrics"].items()):
        metrics.log_metric(key, value)
    with open(table.path, "w") as f:
        f.write(f"<h3>{html.escape(model)}: {html.escape(metric)} = {result['score']:.4f}</h3>"
                f"<pre>{html.escape(result['table'])}</pre>")
    outputs = NamedTuple("Outputs", [("score", float), ("results", dict), ("out", str)])
    return outputs(result["score"], result["metrics"], result["out"])


@component
def champion_score(results: dict, metric: str) -> float:
    """The metric the promotion gate compares (one output: kfp.local's If reads only a task's single output)."""
    if metric not in results:
        raise ValueError(f"champion metric {metric!r} was not measured (have: {', '.join(sorted(results))})")
    return float(results[metric])


@component
def promote(model: str, results: dict, metric: str, threshold: float, alias: str) -> str:
    """Alias the registered version `alias` (champion) in MLflow, tagged with its evaluation."""
    from sharegpt4v import stages as steps

    return steps.promote(model, results, metric, threshold, alias)["uri"]


@component
def export_model_repository(chat_model: str, captioner_model: str, out_root: str, kind: str, profile: str,
                            overrides: list) -> NamedTuple("Outputs", [("uri", str), ("digest", str)]):
    """Export the chat model and the captioner as a Triton model repository (KServe storageUri) in S3."""
    from sharegpt4v import stages as steps

    models = {name: ref for name, ref in (("chat", chat_model), ("captioner", captioner_model)) if ref}
    result = steps.export_repository(models, out_root, kind, profile, overrides)
    outputs = NamedTuple("Outputs", [("uri", str), ("digest", str)])
    return outputs(result["uri"], result["digest"])


@component
def deploy(model: str, storage_uri: str, serving_profile: str, namespace: str, dry_run: bool,
           manifest: Output[HTML]) -> str:
    """Create or patch the KServe InferenceService of `model` through the Kubernetes API (dry run: print it)."""
    import html

    from sharegpt4v import stages as steps

    result = steps.deploy(model, storage_uri, serving_profile, namespace, dry_run)
    with open(manifest.path, "w") as f:
        f.write(f"<h3>{html.escape(result['name'])}: {result['action']}</h3><pre>{html.escape(result['yaml'])}</pre>")
    return result["action"]

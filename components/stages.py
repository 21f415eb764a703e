"""KFP components, one per stage: each body imports the project and calls one function of
`sharegpt4v.stages` (which calls the core). Inputs and outputs are URIs, digests and small
JSON values; the data stays in S3. Metrics and HTML artifacts are what the KFP UI shows.

The base image is the project's training image (`components.resources.IMAGE`; `sharegpt4v pipeline
compile --image REF` compiles the pipelines for another) and the project imports sit inside the
bodies with `install_kfp_package=False`: a cluster run uses the image as it is, a local run
(`kfp.local.SubprocessRunner(use_venv=False)`) the installed project. Resources, secrets, retries
and caching are set by `components.resources`, not here.

Each component is documented once, here: its Google-style docstring (`Args:` for the inputs,
`Returns:` for the outputs, artifacts included: the KFP compiler reads both into the IR's input and
output descriptions, which the KFP UI shows) and its card, `@component(reads=..., writes=...,
gpu=..., teacher=...)` (`components.catalog`): what it reads, writes and needs, appended to its
description and rendered with the docstrings into `components/COMPONENTS.md`. A parameter or output
several components share is described once, in `components.catalog.SHARED_DOCS`: the docstring names
it, e.g. `profile: {profile}` or `out_root: {out_root(folder=sft, area=models)}`, and `@component`
writes it out, in the description and in the function source the container runs alike.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from components import catalog
from components.resources import IMAGE


def component(*, reads: str, writes: str, gpu: bool = False, teacher: bool = False, trainjob: bool = False,
              needs: str = ""):
    """`@dsl.component` on the project image, without installing kfp (the image has it), with the
    component's card (`components.catalog.Card`): what it reads, writes and needs (`trainjob`: a train task,
    whose resources are the start task's outputs), and its docstring's placeholders expanded
    (`catalog.document`, `catalog.expand_embedded`)."""

    def wrap(fn):
        made = dsl.component(catalog.document(fn), base_image=IMAGE, install_kfp_package=False)
        return catalog.register(catalog.expand_embedded(made),
                                catalog.Card(reads=reads, writes=writes, gpu=gpu, teacher=teacher, trainjob=trainjob,
                                             needs=needs))

    return wrap


# the pipeline's MLflow run ------------------------------------------------------------------------


@component(
    reads="the pipeline parameters and their recipe (`profile` + `overrides`: memory plan, `compute.num_nodes`); "
          "MLflow (adopts the run KFP's MLflow plugin created, if any)",
    writes="the pipeline's MLflow run: tags kfp.run_id, kfp.run_name, kfp.pipeline; params pipeline.<name>"
)
def start_run(pipeline: str, kfp_run_id: str, kfp_run_name: str, params: dict, overrides: list, experiment: str,
              gpu_product: str, train_size: dict, follow_size: dict) -> NamedTuple("Outputs", [
                  ("mlflow_run_id", str), ("gpu_node_selector", dict), ("train_gpus", int), ("train_cpu", str),
                  ("train_memory", str)]):
    """Create the pipeline's MLflow run (KFP run id, parameters); the GPU node selector; the train tasks' resources.

    The first task of every pipeline (inside its ExitHandler): every later task's MLflow run nests under this
    one, found by the KFP run id (`KFP_RUN_ID`, from the pod's `pipeline/runid` label). It prints the training
    stages' per-GPU memory plan and refuses one that cannot fit, before any GPU task is scheduled. A train task
    (train-base, train-captioner, pretrain, sft) gets its GPUs, CPU and memory from this task's outputs: a
    one-node recipe trains in the task's pod (`train_gpus` GPUs, `train_size`); a multi-node recipe
    (`compute.num_nodes > 1`) trains as a Kubeflow Trainer TrainJob on its own nodes, which the task only
    creates and follows (no GPU, `follow_size`).

    Args:
        pipeline: The pipeline's name, e.g. "sharegpt4v"; tagged `kfp.pipeline`.
        kfp_run_id: The KFP run's id (the `{{$.pipeline_job_uuid}}` placeholder); tagged `kfp.run_id`, how tasks find
            the run.
        kfp_run_name: The KFP run's name (the `{{$.pipeline_job_name}}` placeholder); the MLflow run's name.
        params: The pipeline parameters to record as MLflow params `pipeline.<name>` (credentials in URLs redacted);
            its `profile` (with `overrides`) and `train_gpus` (count; 0 when absent) also decide the train tasks'
            resources.
        overrides: The recipe overrides, recorded as one param `pipeline.overrides` (space-separated).
        experiment: MLflow experiment of the run, e.g. "sharegpt4v"; created when missing.
        gpu_product: The `nvidia.com/gpu.product` node label value GPU tasks must run on, e.g.
            "NVIDIA-A100-SXM4-80GB".
        train_size: CPU and memory of a train task that trains in its own pod (a one-node recipe), as Kubernetes
            quantities, e.g. {"cpu": "64", "memory": "800Gi"} (`components.resources.SIZES["train"]`, set at
            compile time).
        follow_size: CPU and memory of a train task that only creates and follows its TrainJob (a multi-node
            recipe), as Kubernetes quantities, e.g. {"cpu": "1", "memory": "2Gi"}
            (`components.resources.SIZES["follow"]`, set at compile time).

    Returns:
        mlflow_run_id: The pipeline's MLflow run id ("" when MLflow tracking is off: no `MLFLOW_TRACKING_URI`).
        gpu_node_selector: The node selector of the GPU tasks, {"nvidia.com/gpu.product": gpu_product}.
        train_gpus: The `nvidia.com/gpu` limit of each train task (count): the pipeline's `train_gpus` for a
            one-node recipe, e.g. 8; 0 for a multi-node one (its TrainJob has the recipe's `num_nodes x
            gpus_per_node` GPUs).
        train_cpu: The CPU request of each train task (Kubernetes quantity): `train_size`'s for a one-node recipe,
            e.g. "64"; `follow_size`'s for a multi-node one, e.g. "1".
        train_memory: The memory request and limit of each train task (Kubernetes quantity): `train_size`'s for a
            one-node recipe, e.g. "800Gi"; `follow_size`'s for a multi-node one, e.g. "2Gi".
    """
    from sharegpt4v import stages as steps
    from sharegpt4v.cluster import GPU_PRODUCT_LABEL

    run_id = steps.start_pipeline_run(pipeline, kfp_run_id, kfp_run_name, {**params, "overrides": " ".join(overrides)},
                                      experiment)
    train = steps.train_task_resources(str(params["profile"]), overrides, params.get("train_gpus"), train_size,
                                       follow_size)
    outputs = NamedTuple("Outputs", [("mlflow_run_id", str), ("gpu_node_selector", dict), ("train_gpus", int),
                                     ("train_cpu", str), ("train_memory", str)])
    return outputs(run_id, {GPU_PRODUCT_LABEL: gpu_product}, train["train_gpus"], train["train_cpu"],
                   train["train_memory"])


@component(
    reads="the ExitHandler's final status (filled in by KFP)",
    writes="the pipeline's MLflow run: status FINISHED or FAILED, tags kfp.state and kfp.error"
)
def finish_run(kfp_run_id: str, status: dsl.PipelineTaskFinalStatus) -> str:
    """Exit handler: mark the pipeline's MLflow run FINISHED, or FAILED when a step failed.

    Args:
        kfp_run_id: The KFP run's id (the `{{$.pipeline_job_uuid}}` placeholder): finds the pipeline's MLflow run.
        status: Filled in by KFP, not by the user: the final state of the ExitHandler's tasks and the first error.

    Returns:
        Output: The status set: "FINISHED", "FAILED", or "none" when there is no MLflow run (tracking off).
    """
    from sharegpt4v import stages as steps

    return steps.finish_pipeline_run(kfp_run_id, status.state, status.error_message or "")


# data ---------------------------------------------------------------------------------------------


@component(
    reads="nothing: the world is rendered from `seed` and the recipe's `world` section",
    writes="image shards + manifest (with the ground truth) at `<out_root>/world-<key>` (S3); a nested MLflow run"
)
def synthetic_world(out_root: str, images: int, seed: int, profile: str, overrides: list,
                    metrics: Output[Metrics]) -> NamedTuple("Outputs", [("uri", str), ("digest", str)]):
    """Render a synthetic world (known ground truth) into image shards.

    Each image comes with the facts it shows, so captions and answers can be scored against the truth.

    Args:
        out_root: {out_root(folder=world, area=data)}
        images: Images to render (count), e.g. 6000; split into train/val by the recipe.
        seed: Random seed of the world (integer, e.g. 0): the same seed and recipe give the same images.
        profile: {profile}
        overrides: {overrides}

    Returns:
        uri: The world's dataset folder (image shards + manifest).
        digest: {manifest_digest}
        metrics: images and shards written, and the images per split (`split.<name>`).
    """
    from sharegpt4v import stages as steps

    result = steps.synthetic_world(out_root, images, seed, profile, overrides)
    metrics.log_metric("images", result["ok"])
    metrics.log_metric("shards", result["shards"])
    for split, count in result["splits"].items():
        metrics.log_metric(f"split.{split}", count)
    outputs = NamedTuple("Outputs", [("uri", str), ("digest", str)])
    return outputs(result["uri"], result["digest"])


@component(
    reads="`source_uri`: a folder of images, img2dataset WebDataset shards or a LLaVA conversation JSON (S3 or local)",
    writes="image shards + manifest at `<out_root>/ingested-<key>` (S3), with an error or duplicate record for every "
           "bad or repeated input; a nested MLflow run"
)
def ingest(source_uri: str, out_root: str, kind: str, source_name: str, profile: str, overrides: list,
           metrics: Output[Metrics]) -> NamedTuple("Outputs", [("uri", str), ("digest", str)]):
    """Images / img2dataset shards / a LLaVA conversation JSON -> image shards with a manifest.

    A bad image becomes an error record with a reason, a repeated one a duplicate record; nothing crashes on a
    sample.

    Args:
        source_uri: Where the images are, e.g. "s3://datasets/coco/train2017/" (a folder, searched recursively),
            an img2dataset shard folder, or "s3://datasets/sharegpt4v/share-captioner_coco_lcs_sam_1246k.json".
        out_root: {out_root(folder=ingested, area=data)}
        kind: What `source_uri` is: "auto" (detected), "folder", "wds" (WebDataset shards) or "json" (LLaVA
            conversations).
        source_name: The samples' source name in the manifest, e.g. "coco"; "" derives it from `source_uri`.
        profile: {profile}
        overrides: {overrides}

    Returns:
        uri: The dataset folder (image shards + manifest).
        digest: {manifest_digest}
        metrics: Inputs that became images (ok), errors (error) and repeats (duplicate), as counts.
    """
    from sharegpt4v import stages as steps

    result = steps.ingest_images(source_uri, out_root, kind, source_name, profile, overrides)
    for key in ("ok", "error", "duplicate"):
        metrics.log_metric(key, result[key])
    outputs = NamedTuple("Outputs", [("uri", str), ("digest", str)])
    return outputs(result["uri"], result["digest"])


@component(
    reads="the manifest of the folder at `uri` (S3)",
    writes="nothing"
)
def dataset_digest(uri: str) -> str:
    """Digest of a complete folder's manifest (dataset or caption set): the cache key of what reads it.

    Args:
        uri: A complete dataset or caption set folder, e.g. "s3://sharegpt4v/pipeline/data/world-0123456789ab";
            a folder without a manifest fails the task.

    Returns:
        Output: The manifest's digest, 16 hex digits.
    """
    from sharegpt4v import stages as steps

    return steps.folder_digest(uri)


# captioning ---------------------------------------------------------------------------------------


@component(
    reads="the dataset's images of `split` (S3); the teacher VLM's chat-completions API",
    writes="a caption set at `<out_root>/seed-<key>` (S3); a nested MLflow run (counts, cost)",
    teacher=True,
    needs='network access to the teacher endpoint (none with `teacher_endpoint="synthetic"`)'
)
def seed_captions(dataset_uri: str, out_root: str, split: str, teacher_endpoint: str, teacher_model: str,
                  budget_usd: float, profile: str, overrides: list,
                  metrics: Output[Metrics]) -> NamedTuple("Outputs", [("uri", str), ("digest", str)]):
    """Seed captions from the teacher VLM (OpenAI-compatible; key from the teacher Secret).

    Exactly once per shard: a retried or resubmitted task continues where the last one stopped.

    Args:
        dataset_uri: {dataset_uri}
        out_root: {out_root(folder=seed, area=captions)}
        split: The images the teacher captions, e.g. "val"; "" for every image.
        teacher_endpoint: OpenAI-compatible base URL ending in /v1, e.g. "http://teacher.sharegpt4v:8000/v1";
            "" reads `OPENAI_BASE_URL` from the teacher Secret; "synthetic" starts the synthetic world's stand-in
            teacher in the task (synthetic worlds only, no network).
        teacher_model: The model the endpoint serves, e.g. "gpt-4o"; "" keeps the recipe's `teacher.model`.
        budget_usd: Most the teacher may cost in this run, in US dollars (e.g. 50.0), priced per 1k tokens by the
            recipe; 0 keeps the recipe's `teacher.budget_usd` (none: no cap). At the budget the task stops and
            fails; a rerun continues.
        profile: {profile}
        overrides: {overrides}

    Returns:
        uri: The seed caption set folder.
        digest: {manifest_digest}
        metrics: Records captioned (ok), failed (error) and captioned in this run (captioned), as counts.
    """
    from sharegpt4v import stages as steps

    result = steps.seed_captions(dataset_uri, out_root, split, teacher_endpoint, teacher_model, budget_usd, profile,
                                 overrides)
    for key in ("ok", "error", "captioned"):
        metrics.log_metric(key, result[key])
    outputs = NamedTuple("Outputs", [("uri", str), ("digest", str)])
    return outputs(result["uri"], result["digest"])


@component(
    reads="nothing but its inputs",
    writes="nothing (the job list is its output)"
)
def shard_groups(dataset_uri: str, dataset_digest: str, model: str, groups: int, overrides: list) -> list:
    """The fan-out of corpus captioning: one job per shard group, [{group, groups, dataset, model, overrides}].

    The jobs carry the upstream values the loop body needs (kfp.local resolves an upstream task's
    output inside a ParallelFor body to the loop item; the loop item itself is resolved right).

    Args:
        dataset_uri: {dataset_uri}
        dataset_digest: {dataset_digest}
        model: The captioner: a registered version or checkpoint, e.g. "models:/sharegpt4v-captioner@champion" or
            "s3://sharegpt4v/pipeline/models/captioner-0123456789ab/final".
        groups: Shard groups, i.e. parallel captioning tasks (count, at least 1), e.g. 4.
        overrides: {overrides}

    Returns:
        Output: One job per group, {"group": i, "groups": groups, "dataset_uri", "dataset_digest", "model",
            "overrides"}, i = 0 .. groups - 1.
    """
    if groups < 1:
        raise ValueError(f"shard_groups: need at least 1 group, got {groups}")
    return [{"group": i, "groups": groups, "dataset_uri": dataset_uri, "dataset_digest": dataset_digest, "model": model,
             "overrides": list(overrides)} for i in range(groups)]


@component(
    reads="the captioner's checkpoint (S3, through the MLflow registry for models:/) and the images of its shard group",
    writes="the caption shards of its group, into the corpus caption set `<out_root>/corpus-<key>` (S3); a nested "
           "MLflow run",
    gpu=True
)
def caption_shard_group(job: dict, out_root: str, split: str, gpus: int, profile: str) -> dict:
    """Caption shard group `job["group"]` of `job["groups"]` of the corpus with the trained captioner.

    Every group writes into one caption set (keyed by the dataset and the captioner's checkpoint), exactly once
    per shard; `merge_captions` publishes it once every shard is done.

    Args:
        job: One item of `shard_groups`' output: {"group", "groups", "dataset_uri", "dataset_digest", "model",
            "overrides"}.
        out_root: {out_root(folder=corpus, area=captions)}
        split: The images to caption, e.g. "train"; "" for every image.
        gpus: {task_gpus}
        profile: {profile}

    Returns:
        Output: {"uri": the caption set, "group", "groups", "captioned", "ok", "error", "shards"}: counts of this
            group.
    """
    from sharegpt4v import stages as steps

    return steps.caption_shard_group(job["dataset_uri"], job["dataset_digest"], job["model"], out_root, job["group"],
                                     job["groups"], split, gpus, profile, job["overrides"])


@component(
    reads="the corpus caption set, the dataset and the `reference` caption set (S3)",
    writes="the caption set's manifest (publishes it); a quality report (HTML + JSON) at "
           "`<report_root>/report-<caption set>` (S3); a nested MLflow run"
)
def merge_captions(dataset_uri: str, split: str, groups: list, reference: str, report_root: str,
                   metrics: Output[Metrics], report: Output[HTML]) -> NamedTuple("Outputs", [("uri", str),
                                                                                            ("digest", str)]):
    """Fan-in: publish the corpus caption set once every shard is captioned; its quality report.

    The report compares the set with `reference` and, on a synthetic world, scores the captions' facts against
    the ground truth.

    Args:
        dataset_uri: {dataset_uri}
        split: The split that was captioned, e.g. "train"; "" for every image.
        groups: The outputs of every `caption_shard_group` task (`dsl.Collected`); they name one caption set.
        reference: A caption set to compare with, e.g. the teacher's seed captions
            "s3://sharegpt4v/pipeline/captions/seed-0123456789ab"; "" for none.
        report_root: S3 prefix of the report, written to `<report_root>/report-<caption set name>`, e.g.
            "s3://sharegpt4v/pipeline/reports".

    Returns:
        uri: The published corpus caption set.
        digest: {manifest_digest}
        metrics: Records per status (`records.<status>`) and the report's caption quality metrics.
        report: The caption quality report (HTML: metrics, samples side by side).
    """
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


@component(
    reads="the dataset (S3), only when the recipe builds its model from config",
    writes="the CLIP and Vicuna stand-ins at `<out_root>/foundations-<key>` (S3; tiny profile only); a nested MLflow "
           "run"
)
def foundations(dataset_uri: str, dataset_digest: str, out_root: str, profile: str, overrides: list,
                metrics: Output[Metrics]) -> list:
    """The recipe overrides of every later task: `overrides`, plus the CLIP and Vicuna stand-ins trained on
    the data when the model is built from config (tiny profile); unchanged for checkpoint-based recipes.

    Args:
        dataset_uri: {dataset_uri}
        dataset_digest: {dataset_digest}
        out_root: {out_root(folder=foundations, area=models)}
        profile: {profile}
        overrides: {overrides}

    Returns:
        Output: The overrides every later task uses: `overrides` plus the stand-ins' paths
            (`model.vision.path=...`, `model.language.path=...`) when they were trained here.
        metrics: The stand-ins' training metrics (empty for checkpoint-based recipes).
    """
    from sharegpt4v import stages as steps

    result = steps.foundations(dataset_uri, dataset_digest, out_root, profile, overrides)
    for key, value in sorted(result.get("metrics", {}).items()):
        metrics.log_metric(key, value)
    return result["overrides"]


@component(
    reads="the dataset's images and brief captions of `split` (S3)",
    writes="checkpoints at `<out_root>/base-<key>` (S3); an MLflow run; the registered model sharegpt4v-base (alias "
           "candidate)",
    gpu=True,
    trainjob=True
)
def train_base(dataset_uri: str, dataset_digest: str, split: str, out_root: str, gpus: int, profile: str,
               overrides: list, metrics: Output[Metrics]) -> NamedTuple("Outputs", [("checkpoint_uri", str),
                                                                                   ("model_uri", str),
                                                                                   ("digest", str), ("version", str)]):
    """Pretrain on brief captions (LLaVA-1.5's stage): the LMM the captioner is fine-tuned from; register it
    (sharegpt4v-base).

    A retried task resumes from its newest checkpoint; a finished one returns at once.

    Args:
        dataset_uri: {dataset_uri}
        dataset_digest: {dataset_digest}
        split: The images whose brief captions it trains on, e.g. "train"; "" for every image.
        out_root: {out_root(folder=base, area=models)}
        gpus: {training_gpus}
        profile: {profile}
        overrides: {overrides}

    Returns:
        checkpoint_uri: {checkpoint_uri(folder=base)}
        model_uri: {model_uri(name=sharegpt4v-base)}
        digest: {checkpoint_digest}
        version: {version}
        metrics: {training_metrics}
    """
    from sharegpt4v import stages as steps

    result = steps.train("pretrain", dataset_uri, dataset_digest, "", "", "", out_root, gpus, profile,
                         [*overrides, "pretrain.caption_field=brief_caption"], split=split, register_as="base")
    for key in ("steps", "final_loss", "samples_seen", "flagged_samples"):
        metrics.log_metric(key, result[key])
    outputs = NamedTuple("Outputs", [("checkpoint_uri", str), ("model_uri", str), ("digest", str), ("version", str)])
    return outputs(result["checkpoint_uri"], result["model_uri"], result["digest"], result["version"])


@component(
    reads="nothing but its input",
    writes="nothing"
)
def given_model(model: str) -> NamedTuple("Outputs", [("model_uri", str)]):
    """A model given as a pipeline parameter, as a task output (the other branch of `train_base`).

    Args:
        model: A registered version or checkpoint, e.g. "models:/llava-1.5-7b/1" or "s3://models/llava-1.5-7b-hf".

    Returns:
        model_uri: `model`, unchanged.
    """
    outputs = NamedTuple("Outputs", [("model_uri", str)])
    return outputs(model)


@component(
    reads="the dataset's images of `split`, the seed caption set and the `init` model (S3, through the MLflow "
          "registry for models:/)",
    writes="checkpoints at `<out_root>/captioner-<key>` (S3); an MLflow run; the registered model "
           "sharegpt4v-captioner (alias candidate)",
    gpu=True,
    trainjob=True
)
def train_captioner(dataset_uri: str, dataset_digest: str, captions: str, captions_digest: str, init: str,
                    split: str, out_root: str, gpus: int, profile: str, overrides: list,
                    metrics: Output[Metrics]) -> NamedTuple("Outputs", [("checkpoint_uri", str), ("model_uri", str),
                                                                        ("digest", str), ("version", str)]):
    """Fine-tune the captioner from a pretrained LMM on the teacher's seed captions of `split`; register it
    (sharegpt4v-captioner, alias candidate).

    A retried task resumes from its newest checkpoint; a finished one returns at once.

    Args:
        dataset_uri: {dataset_uri}
        dataset_digest: {dataset_digest}
        captions: The teacher's seed caption set, e.g. "s3://sharegpt4v/pipeline/captions/seed-0123456789ab".
        captions_digest: {captions_digest}
        init: The pretrained LMM to start from: a registered version or checkpoint, e.g.
            "models:/sharegpt4v-base/1"; "" builds it from the recipe.
        split: The images the seed captions describe, e.g. "val".
        out_root: {out_root(folder=captioner, area=models)}
        gpus: {training_gpus}
        profile: {profile}
        overrides: {overrides}

    Returns:
        checkpoint_uri: {checkpoint_uri(folder=captioner)}
        model_uri: {model_uri(name=sharegpt4v-captioner)}
        digest: {checkpoint_digest}
        version: {version}
        metrics: {training_metrics}
    """
    from sharegpt4v import stages as steps

    result = steps.train("captioner", dataset_uri, dataset_digest, captions, captions_digest, init, out_root, gpus,
                         profile, overrides, split=split)
    for key in ("steps", "final_loss", "samples_seen", "flagged_samples"):
        metrics.log_metric(key, result[key])
    outputs = NamedTuple("Outputs", [("checkpoint_uri", str), ("model_uri", str), ("digest", str), ("version", str)])
    return outputs(result["checkpoint_uri"], result["model_uri"], result["digest"], result["version"])


@component(
    reads="the dataset's images of `split`, the corpus caption set and the `init` model, if any (S3)",
    writes="checkpoints at `<out_root>/pretrain-<key>` (S3); an MLflow run; the registered model "
           "sharegpt4v-pretrained (alias candidate)",
    gpu=True,
    trainjob=True
)
def pretrain(dataset_uri: str, dataset_digest: str, captions: str, captions_digest: str, init: str, split: str,
             out_root: str, gpus: int, profile: str, overrides: list,
             metrics: Output[Metrics]) -> NamedTuple("Outputs", [("checkpoint_uri", str), ("model_uri", str),
                                                                 ("digest", str), ("version", str)]):
    """Pretrain the LMM on the corpus split with its detailed captions; register it (sharegpt4v-pretrained).

    A retried task resumes from its newest checkpoint; a finished one returns at once.

    Args:
        dataset_uri: {dataset_uri}
        dataset_digest: {dataset_digest}
        captions: The corpus caption set (the captioner's), e.g.
            "s3://sharegpt4v/pipeline/captions/corpus-0123456789ab".
        captions_digest: {captions_digest}
        init: Where pretraining starts: a registered version or checkpoint, e.g. "models:/sharegpt4v-base/1";
            "" builds the model from the recipe's vision encoder and language model.
        split: The images whose captions it trains on, e.g. "train"; "" for every image.
        out_root: {out_root(folder=pretrain, area=models)}
        gpus: {training_gpus}
        profile: {profile}
        overrides: {overrides}

    Returns:
        checkpoint_uri: {checkpoint_uri(folder=pretrain)}
        model_uri: {model_uri(name=sharegpt4v-pretrained)}
        digest: {checkpoint_digest}
        version: {version}
        metrics: {training_metrics}
    """
    from sharegpt4v import stages as steps

    result = steps.train("pretrain", dataset_uri, dataset_digest, captions, captions_digest, init, out_root, gpus,
                         profile, overrides, split=split)
    for key in ("steps", "final_loss", "samples_seen", "flagged_samples"):
        metrics.log_metric(key, result[key])
    outputs = NamedTuple("Outputs", [("checkpoint_uri", str), ("model_uri", str), ("digest", str), ("version", str)])
    return outputs(result["checkpoint_uri"], result["model_uri"], result["digest"], result["version"])


@component(
    reads="the dataset's SFT questions of `split` and the pretrained `init` model (S3)",
    writes="checkpoints at `<out_root>/sft-<key>` (S3); an MLflow run; the registered model sharegpt4v-chat (alias "
           "candidate)",
    gpu=True,
    trainjob=True
)
def sft(dataset_uri: str, dataset_digest: str, init: str, split: str, out_root: str, gpus: int, profile: str,
        overrides: list, metrics: Output[Metrics]) -> NamedTuple("Outputs", [("checkpoint_uri", str),
                                                                            ("model_uri", str), ("digest", str),
                                                                            ("version", str)]):
    """Instruction-tune the pretrained LMM on the SFT mix of `split`; register it (sharegpt4v-chat, alias candidate).

    A retried task resumes from its newest checkpoint; a finished one returns at once.

    Args:
        dataset_uri: {dataset_uri}
        dataset_digest: {dataset_digest}
        init: The pretrained LMM: a registered version or checkpoint, e.g. "models:/sharegpt4v-pretrained/2".
        split: The images whose questions it trains on, e.g. "val"; "" for every image.
        out_root: {out_root(folder=sft, area=models)}
        gpus: {training_gpus}
        profile: {profile}
        overrides: {overrides}

    Returns:
        checkpoint_uri: {checkpoint_uri(folder=sft)}
        model_uri: {model_uri(name=sharegpt4v-chat)}
        digest: {checkpoint_digest}
        version: {version}
        metrics: {training_metrics}
    """
    from sharegpt4v import stages as steps

    result = steps.train("sft", dataset_uri, dataset_digest, "", "", init, out_root, gpus, profile, overrides,
                         split=split)
    for key in ("steps", "final_loss", "samples_seen", "flagged_samples"):
        metrics.log_metric(key, result[key])
    outputs = NamedTuple("Outputs", [("checkpoint_uri", str), ("model_uri", str), ("digest", str), ("version", str)])
    return outputs(result["checkpoint_uri"], result["model_uri"], result["digest"], result["version"])


# evaluation, registry, serving --------------------------------------------------------------------


@component(
    reads="the model (S3, through the MLflow registry for models:/) and the dataset's benchmark questions",
    writes="answers, results.json, results.md and results.png at `<out_root>/eval-<key>` (S3); a nested MLflow run",
    gpu=True
)
def evaluate(model: str, model_digest: str, dataset_uri: str, out_root: str, metric: str, gpus: int, profile: str,
             overrides: list, metrics: Output[Metrics],
             table: Output[HTML]) -> NamedTuple("Outputs", [("score", float), ("results", dict), ("out", str)]):
    """Answer and score the benchmarks of `eval.benchmarks`; `score` is the champion metric.

    Args:
        model: The model to evaluate: a registered version or checkpoint, e.g. "models:/sharegpt4v-chat/4".
        model_digest: Digest of the model's checkpoint (12 hex digits): only part of the cache key, so a new checkpoint
            under the same reference is evaluated again.
        dataset_uri: {dataset_uri}
        out_root: {out_root(folder=eval, area=eval)}
        metric: The champion metric, "<benchmark>.<metric>", e.g. "world-vqa.overall" (accuracy, 0 to 1); the task
            fails when the benchmarks do not measure it.
        gpus: {task_gpus}
        profile: {profile}
        overrides: {overrides}

    Returns:
        score: The value of `metric` (what the promotion gate compares with the threshold).
        results: Every metric measured, {"<benchmark>.<metric>": value}.
        out: The folder of the answers and results.
        metrics: Every metric measured (the KFP UI's metrics tab).
        table: The results table (HTML).
    """
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


@component(
    reads="nothing but its inputs",
    writes="nothing"
)
def champion_score(results: dict, metric: str) -> float:
    """The metric the promotion gate compares (one output: kfp.local's If reads only a task's single output).

    Args:
        results: `evaluate`'s results, {"<benchmark>.<metric>": value}.
        metric: The champion metric, e.g. "world-vqa.overall"; the task fails when `results` lacks it.

    Returns:
        Output: `results[metric]`, a float (accuracy metrics: 0 to 1).
    """
    if metric not in results:
        raise ValueError(f"champion metric {metric!r} was not measured (have: {', '.join(sorted(results))})")
    return float(results[metric])


@component(
    reads="the registered version behind `model` (MLflow)",
    writes="the MLflow registry: alias `alias` on the version, tags eval.<metric> and promoted_by; a nested MLflow run"
)
def promote(model: str, results: dict, metric: str, threshold: float, alias: str) -> str:
    """Alias the registered version `alias` (champion) in MLflow, tagged with its evaluation.

    Args:
        model: The registered version to promote, "models:/<name>/<version>", e.g. "models:/sharegpt4v-chat/4";
            a plain checkpoint fails the task.
        results: `evaluate`'s results, {"<benchmark>.<metric>": value}; each becomes a tag `eval.<metric>`.
        metric: The champion metric the version was gated on, e.g. "world-vqa.overall".
        threshold: The value `metric` cleared (e.g. 0.5), recorded in the tag `promoted_by`; the gate itself is
            the pipeline's `dsl.If`.
        alias: The registry alias to set, e.g. "champion" (the serving and caption-corpus default).

    Returns:
        Output: The promoted model, "models:/<name>@<alias>", e.g. "models:/sharegpt4v-chat@champion".
    """
    from sharegpt4v import stages as steps

    return steps.promote(model, results, metric, threshold, alias)["uri"]


@component(
    reads="the chat model's and the captioner's checkpoints (S3, through the MLflow registry for models:/)",
    writes="a Triton model repository at `<out_root>/repository-<key>` (S3; the KServe storageUri); a nested MLflow run"
)
def export_model_repository(chat_model: str, captioner_model: str, out_root: str, kind: str, profile: str,
                            overrides: list) -> NamedTuple("Outputs", [("uri", str), ("digest", str)]):
    """Export the chat model and the captioner as a Triton model repository (KServe storageUri) in S3.

    Args:
        chat_model: The chat model: a registered version or checkpoint, e.g. "models:/sharegpt4v-chat/4"; "" leaves
            it out.
        captioner_model: The captioner, e.g. "models:/sharegpt4v-captioner/2"; "" leaves it out.
        out_root: {out_root(folder=repository, area=serving)}
        kind: The Triton instance kind: "KIND_GPU" (the cluster) or "KIND_CPU" (local, dev); "" keeps the recipe's
            `serving.instance_kind`.
        profile: {profile}
        overrides: {overrides}

    Returns:
        uri: The model repository folder (what an InferenceService's storageUri points at).
        digest: Digest of the repository (16 hex digits).
    """
    from sharegpt4v import stages as steps

    models = {name: ref for name, ref in (("chat", chat_model), ("captioner", captioner_model)) if ref}
    result = steps.export_repository(models, out_root, kind, profile, overrides)
    outputs = NamedTuple("Outputs", [("uri", str), ("digest", str)])
    return outputs(result["uri"], result["digest"])


@component(
    reads="nothing in S3: the InferenceService points KServe at `storage_uri`",
    writes="the KServe InferenceService of `model` in `namespace` (Kubernetes API; nothing with `dry_run`); a nested "
           "MLflow run",
    needs="RBAC to get, create and patch KServe InferenceServices in `namespace` (the pipeline runner's service "
          "account, manifests/)"
)
def deploy(model: str, storage_uri: str, serving_profile: str, namespace: str, dry_run: bool,
           manifest: Output[HTML]) -> str:
    """Create or patch the KServe InferenceService of `model` through the Kubernetes API (dry run: print it).

    Args:
        model: Which model's InferenceService: "chat" or "captioner".
        storage_uri: The Triton model repository it serves, e.g.
            "s3://sharegpt4v/pipeline/serving/repository-0123456789ab".
        serving_profile: Serving resources: "prod" (one A100 80GB per replica, autoscaled) or "dev" (CPU, one
            replica).
        namespace: Kubernetes namespace of the InferenceService, e.g. "sharegpt4v"; "" uses the pod's own.
        dry_run: true: only render the object (shown in `manifest`), call nothing; false: create or patch it.

    Returns:
        Output: What happened: "created", "patched" or "dry-run".
        manifest: The InferenceService as YAML (HTML).
    """
    import html

    from sharegpt4v import stages as steps

    result = steps.deploy(model, storage_uri, serving_profile, namespace, dry_run)
    with open(manifest.path, "w") as f:
        f.write(f"<h3>{html.escape(result['name'])}: {result['action']}</h3><pre>{html.escape(result['yaml'])}</pre>")
    return result["action"]

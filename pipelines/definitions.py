"""The ShareGPT4V pipelines: the end-to-end `sharegpt4v` and one per part.

    sharegpt4v        data (synthetic world or ingest) -> seed captions (teacher) -> captioner ->
                      corpus captioning (ParallelFor over shard groups, Collected fan-in) ->
                      pretraining -> SFT -> evaluation -> If score >= threshold: champion, export,
                      deploy
    caption-corpus    caption a corpus with a trained captioner (fan-out / fan-in + report)
    train-captioner   seed captions from the teacher, then the captioner
    train-lmm         pretraining + SFT + evaluation (+ champion over the threshold)

Every pipeline runs inside an ExitHandler: the first task creates the pipeline's MLflow run
(KFP run id, parameters), the exit task marks it FINISHED or FAILED. Tasks get their resources,
secrets, retries and caching from `components.resources`; outputs are content-keyed folders
under `output_root`, so resubmitting a pipeline with the same parameters resumes its work.

A parameter several pipelines share is described once, in `components.catalog.SHARED_DOCS`: its
`Args:` entry names it, e.g. `profile: {pipeline.profile}`, and `@catalog.document` (under
`@dsl.pipeline`, which reads the docstring) writes it out.
"""


import contextlib
from collections.abc import Iterator
from typing import Any

from kfp import dsl

from components import catalog
from components import stages as c
from components.resources import cpu_task, gpu_task, light_task, train_sizes, train_task
from sharegpt4v.cluster import A100_PRODUCT, NAMESPACE

DEFAULT_ROOT = "s3://sharegpt4v/pipeline"
DEFAULT_PROFILE = "a100-7b"


@contextlib.contextmanager
def tracked(pipeline: str, params: dict[str, Any], overrides: Any, experiment: Any, gpu_product: Any) -> Iterator[Any]:
    """ExitHandler + the pipeline's MLflow run; yields the start task (its `gpu_node_selector` output
    is the node selector of the GPU tasks; its `train_gpus`, `train_cpu` and `train_memory` outputs are
    the train tasks' resources, from the recipe and `components.resources.SIZES`)."""
    finish = light_task(c.finish_run(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), display_name="mlflow: end run")
    with dsl.ExitHandler(finish, name=f"{pipeline}-run"):
        start = c.start_run(pipeline=pipeline, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                            kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, params=params, overrides=overrides,
                            experiment=experiment, gpu_product=gpu_product, **train_sizes())
        light_task(start, display_name="mlflow: start run")
        yield start


# parts, shared by the pipelines ---------------------------------------------------------------------


def data_part(source_uri: Any, source_kind: Any, out_root: str, world_images: Any, world_seed: Any, profile: Any,
              overrides: Any) -> tuple[Any, Any]:
    """(dataset URI, digest): ingest `source_uri`, or render a synthetic world when it is empty."""
    with dsl.If(source_uri == "", name="synthetic-world"):
        world = cpu_task(c.synthetic_world(out_root=out_root, images=world_images, seed=world_seed, profile=profile,
                                           overrides=overrides), cache=True, retries=False)
    with dsl.Else(name="ingest"):
        ingested = cpu_task(c.ingest(source_uri=source_uri, out_root=out_root, kind=source_kind, source_name="",
                                     profile=profile, overrides=overrides), cache=False, retries=False)
    return (dsl.OneOf(world.outputs["uri"], ingested.outputs["uri"]),
            dsl.OneOf(world.outputs["digest"], ingested.outputs["digest"]))


def foundations_part(dataset_uri: Any, dataset_digest: Any, out_root: str, profile: Any, overrides: Any) -> Any:
    """The overrides every later task uses (`c.foundations`): the CLIP and Vicuna stand-ins of a model built
    from config are trained here once; a checkpoint-based recipe passes through unchanged."""
    return cpu_task(c.foundations(dataset_uri=dataset_uri, dataset_digest=dataset_digest, out_root=f"{out_root}/models",
                                  profile=profile, overrides=overrides), cache=True, display_name="foundations")


def captioner_part(dataset_uri: Any, dataset_digest: Any, out_root: str, seed_split: Any, base_split: Any,
                   captioner_base: Any, teacher_endpoint: Any, teacher_model: Any, teacher_budget_usd: Any, gpus: Any,
                   start: Any, profile: Any, overrides: Any) -> tuple[Any, Any]:
    """(seed captions task, captioner task): the teacher's seed captions of `seed_split`, and the captioner
    fine-tuned on them from a pretrained LMM: `captioner_base`, or when it is empty an LMM pretrained here
    on the brief captions of `base_split` (LLaVA-1.5's stage; Share-Captioner starts from a pretrained LMM).
    The train tasks' resources are the start task's outputs (`train_task`)."""
    seed = cpu_task(c.seed_captions(dataset_uri=dataset_uri, out_root=f"{out_root}/captions", split=seed_split,
                                    teacher_endpoint=teacher_endpoint, teacher_model=teacher_model,
                                    budget_usd=teacher_budget_usd, profile=profile, overrides=overrides),
                    cache=False, teacher=True, display_name="seed captions (teacher)")
    with dsl.If(captioner_base == "", name="pretrain-base"):
        base = train_task(c.train_base(dataset_uri=dataset_uri, dataset_digest=dataset_digest, split=base_split,
                                       out_root=f"{out_root}/models", gpus=gpus, profile=profile, overrides=overrides),
                          start, cache=True, display_name="pretrain base (brief captions)")
    with dsl.Else(name="given-base"):
        given = light_task(c.given_model(model=captioner_base), display_name="captioner base")
    init = dsl.OneOf(base.outputs["model_uri"], given.outputs["model_uri"])
    captioner = train_task(c.train_captioner(dataset_uri=dataset_uri, dataset_digest=dataset_digest,
                                             captions=seed.outputs["uri"], captions_digest=seed.outputs["digest"],
                                             init=init, split=seed_split, out_root=f"{out_root}/models", gpus=gpus,
                                             profile=profile, overrides=overrides),
                           start, cache=True, display_name="train captioner")
    return seed, captioner


def caption_corpus_part(dataset_uri: Any, dataset_digest: Any, model: Any, reference: Any, out_root: str, split: Any,
                        groups: Any, gpus: Any, selector: Any, profile: Any, overrides: Any) -> Any:
    """The merge task: corpus captioning fanned out over shard groups, fanned in with Collected."""
    plan = light_task(c.shard_groups(dataset_uri=dataset_uri, dataset_digest=dataset_digest, model=model,
                                     groups=groups, overrides=overrides), display_name="shard groups")
    with dsl.ParallelFor(plan.output, name="caption-shard-groups") as job:
        part = gpu_task(c.caption_shard_group(job=job, out_root=f"{out_root}/captions", split=split, gpus=gpus,
                                              profile=profile),
                        gpus, selector, size="caption", cache=True, display_name="caption shard group")
    return cpu_task(c.merge_captions(dataset_uri=dataset_uri, split=split, groups=dsl.Collected(part.output),
                                     reference=reference, report_root=f"{out_root}/reports"),
                    cache=True, display_name="merge + report captions")


def lmm_part(dataset_uri: Any, dataset_digest: Any, captions: Any, captions_digest: Any, base_model: Any,
             corpus_split: Any, sft_split: Any, out_root: str, train_gpus: Any, eval_gpus: Any, start: Any,
             metric: Any, threshold: Any, profile: Any, overrides: Any) -> tuple[Any, Any]:
    """(SFT task, evaluation task): pretraining on the captioned corpus, SFT, evaluation, and the
    champion alias when the score clears the threshold. The train tasks' resources are the start task's
    outputs (`train_task`); evaluation runs in its pod on `eval_gpus` whatever the recipe."""
    pt = train_task(c.pretrain(dataset_uri=dataset_uri, dataset_digest=dataset_digest, captions=captions,
                               captions_digest=captions_digest, init=base_model, split=corpus_split,
                               out_root=f"{out_root}/models", gpus=train_gpus, profile=profile, overrides=overrides),
                    start, cache=True, display_name="pretrain")
    tuned = train_task(c.sft(dataset_uri=dataset_uri, dataset_digest=dataset_digest, init=pt.outputs["model_uri"],
                             split=sft_split, out_root=f"{out_root}/models", gpus=train_gpus, profile=profile,
                             overrides=overrides),
                       start, cache=True, display_name="sft")
    selector = start.outputs["gpu_node_selector"]
    ev = gpu_task(c.evaluate(model=tuned.outputs["model_uri"], model_digest=tuned.outputs["digest"],
                             dataset_uri=dataset_uri, out_root=f"{out_root}/eval", metric=metric, gpus=eval_gpus,
                             profile=profile, overrides=overrides),
                  eval_gpus, selector, size="eval", cache=True, display_name="evaluate")
    return tuned, ev


def champion_part(tuned: Any, ev: Any, metric: Any, threshold: Any) -> Any:
    return light_task(c.promote(model=tuned.outputs["model_uri"], results=ev.outputs["results"], metric=metric,
                                threshold=threshold, alias="champion"), display_name="register champion")


def serving_part(chat: Any, captioner: Any, out_root: str, kind: Any, serving_profile: Any, namespace: Any,
                 dry_run: Any, profile: Any, overrides: Any) -> Any:
    """Export both models as a Triton repository; create or patch the chat model's InferenceService."""
    export = cpu_task(c.export_model_repository(chat_model=chat, captioner_model=captioner,
                                                out_root=f"{out_root}/serving", kind=kind, profile=profile,
                                                overrides=overrides),
                      cache=False, display_name="export Triton repository")
    return light_task(c.deploy(model="chat", storage_uri=export.outputs["uri"], serving_profile=serving_profile,
                               namespace=namespace, dry_run=dry_run), display_name="deploy (KServe)")


# pipelines ------------------------------------------------------------------------------------------


@dsl.pipeline(name="sharegpt4v")
@catalog.document
def sharegpt4v(
    output_root: str = DEFAULT_ROOT,
    source_uri: str = "",
    source_kind: str = "auto",
    world_images: int = 6000,
    world_seed: int = 0,
    profile: str = DEFAULT_PROFILE,
    overrides: list = [],  # noqa: B006 - a pipeline parameter's default, compiled into the spec
    teacher_endpoint: str = "",
    teacher_model: str = "",
    teacher_budget_usd: float = 0.0,
    seed_split: str = "val",
    corpus_split: str = "train",
    sft_split: str = "val",
    captioner_base: str = "",
    shard_groups: int = 4,
    base_model: str = "",
    train_gpus: int = 8,
    caption_gpus: int = 1,
    eval_gpus: int = 1,
    gpu_product: str = A100_PRODUCT,
    champion_metric: str = "world-vqa.overall",
    champion_threshold: float = 0.5,
    export_kind: str = "KIND_GPU",
    serving_profile: str = "prod",
    deploy_namespace: str = NAMESPACE,
    deploy_dry_run: bool = False,
    mlflow_experiment: str = "sharegpt4v",
):
    """ShareGPT4V end to end: seed captions, captioner, corpus captions, pretraining, SFT, evaluation, champion.

    Data (a synthetic world, or `source_uri` ingested) -> the teacher's seed captions -> the captioner
    -> corpus captioning (shard groups in parallel) -> pretraining -> SFT -> evaluation; when the score clears
    `champion_threshold`: champion alias, Triton repository export, KServe deploy.

    Args:
        output_root: {pipeline.output_root}
        source_uri: The images to ingest: a folder of images (s3:// prefix, searched recursively), img2dataset
            WebDataset shards, or a ShareGPT4V/LLaVA conversation JSON, e.g. "s3://datasets/coco/train2017/";
            "" renders a synthetic world of `world_images` images instead.
        source_kind: What `source_uri` is: "auto" (detected), "folder", "wds" (WebDataset shards) or "json"
            (LLaVA conversations).
        world_images: Images of the synthetic world rendered when `source_uri` is "" (count), e.g. 6000.
        world_seed: Random seed of the synthetic world (integer, e.g. 0): the same seed gives the same images.
        profile: {pipeline.profile}
        overrides: {overrides}
        teacher_endpoint: {pipeline.teacher_endpoint}
        teacher_model: {pipeline.teacher_model}
        teacher_budget_usd: {pipeline.teacher_budget_usd}
        seed_split: {pipeline.seed_split}
        corpus_split: The images the captioner captions for pretraining (disjoint from `seed_split`), e.g.
            "train"; with `captioner_base` "", also the brief captions the captioner's base is pretrained on.
        sft_split: {pipeline.sft_split}
        captioner_base: {pipeline.captioner_base(split=corpus_split)}
        shard_groups: {pipeline.shard_groups}
        base_model: {pipeline.base_model}
        train_gpus: {pipeline.train_gpus}
        caption_gpus: {pipeline.caption_gpus}
        eval_gpus: {pipeline.eval_gpus}
        gpu_product: {pipeline.gpu_product}
        champion_metric: {pipeline.champion_metric}
        champion_threshold: Promote the SFT model to champion, export and deploy it only when `champion_metric` is at
            least this (the metric's unit, e.g. 0.5 = 50% accuracy); 0 always promotes.
        export_kind: Triton instance kind of the exported model repository: "KIND_GPU" (the cluster) or
            "KIND_CPU".
        serving_profile: Resources of the InferenceService: "prod" (one A100 80GB per replica, autoscaled) or
            "dev" (CPU, one replica).
        deploy_namespace: Kubernetes namespace of the InferenceService, e.g. "sharegpt4v".
        deploy_dry_run: true: only render the InferenceService (the deploy task's `manifest` shows it); false:
            create or patch it.
        mlflow_experiment: {pipeline.mlflow_experiment}
    """
    params = {"output_root": output_root, "source_uri": source_uri, "world_images": world_images,
              "world_seed": world_seed, "profile": profile, "teacher_endpoint": teacher_endpoint,
              "teacher_model": teacher_model, "seed_split": seed_split, "corpus_split": corpus_split,
              "sft_split": sft_split, "captioner_base": captioner_base, "shard_groups": shard_groups,
              "base_model": base_model,
              "train_gpus": train_gpus, "caption_gpus": caption_gpus, "gpu_product": gpu_product,
              "champion_metric": champion_metric, "champion_threshold": champion_threshold,
              "serving_profile": serving_profile, "deploy_dry_run": deploy_dry_run}
    with tracked("sharegpt4v", params, overrides, mlflow_experiment, gpu_product) as start:
        selector = start.outputs["gpu_node_selector"]
        dataset_uri, dataset_digest = data_part(source_uri, source_kind, f"{output_root}/data", world_images, world_seed,
                                                profile, overrides)
        recipe = foundations_part(dataset_uri, dataset_digest, output_root, profile, overrides).outputs["Output"]
        seed, captioner = captioner_part(dataset_uri, dataset_digest, output_root, seed_split, corpus_split,
                                         captioner_base, teacher_endpoint, teacher_model, teacher_budget_usd,
                                         train_gpus, start, profile, recipe)
        merged = caption_corpus_part(dataset_uri, dataset_digest, captioner.outputs["model_uri"], seed.outputs["uri"],
                                     output_root, corpus_split, shard_groups, caption_gpus, selector, profile,
                                     recipe)
        tuned, ev = lmm_part(dataset_uri, dataset_digest, merged.outputs["uri"], merged.outputs["digest"], base_model,
                             corpus_split, sft_split, output_root, train_gpus, eval_gpus, start, champion_metric,
                             champion_threshold, profile, recipe)
        score = light_task(c.champion_score(results=ev.outputs["results"], metric=champion_metric),
                           display_name="champion metric")
        with dsl.If(score.output >= champion_threshold, name="score-clears-threshold"):
            champion = champion_part(tuned, ev, champion_metric, champion_threshold)
            served = serving_part(tuned.outputs["model_uri"], captioner.outputs["model_uri"], output_root, export_kind,
                                  serving_profile, deploy_namespace, deploy_dry_run, profile, overrides)
            served.after(champion)


@dsl.pipeline(name="caption-corpus")
@catalog.document
def caption_corpus(
    dataset_uri: str,
    captioner: str = "models:/sharegpt4v-captioner@champion",
    output_root: str = DEFAULT_ROOT,
    split: str = "",
    reference: str = "",
    shard_groups: int = 4,
    caption_gpus: int = 1,
    gpu_product: str = A100_PRODUCT,
    profile: str = DEFAULT_PROFILE,
    overrides: list = [],  # noqa: B006
    mlflow_experiment: str = "sharegpt4v",
):
    """Caption a corpus with a trained captioner: shard groups in parallel, one caption set, its quality report.

    Args:
        dataset_uri: {pipeline.dataset_uri}
        captioner: The trained captioner: a registered version or alias, or a checkpoint, e.g.
            "models:/sharegpt4v-captioner@champion" (the default) or "models:/sharegpt4v-captioner/2".
        output_root: {pipeline.output_root}
        split: The images to caption, e.g. "train"; "" for every image.
        reference: A caption set the quality report compares with, e.g. the teacher's seed captions
            "s3://sharegpt4v/pipeline/captions/seed-0123456789ab"; "" for none.
        shard_groups: {pipeline.shard_groups}
        caption_gpus: {pipeline.caption_gpus}
        gpu_product: {pipeline.gpu_product}
        profile: {pipeline.profile}
        overrides: {overrides}
        mlflow_experiment: {pipeline.mlflow_experiment}
    """
    params = {"dataset_uri": dataset_uri, "captioner": captioner, "output_root": output_root, "split": split,
              "shard_groups": shard_groups, "caption_gpus": caption_gpus, "gpu_product": gpu_product,
              "profile": profile}
    with tracked("caption-corpus", params, overrides, mlflow_experiment, gpu_product) as start:
        info = light_task(c.dataset_digest(uri=dataset_uri), display_name="dataset digest")
        caption_corpus_part(dataset_uri, info.output, captioner, reference, output_root, split, shard_groups,
                            caption_gpus, start.outputs["gpu_node_selector"], profile, overrides)


@dsl.pipeline(name="train-captioner")
@catalog.document
def train_captioner(
    dataset_uri: str,
    output_root: str = DEFAULT_ROOT,
    seed_split: str = "val",
    base_split: str = "train",
    captioner_base: str = "",
    teacher_endpoint: str = "",
    teacher_model: str = "",
    teacher_budget_usd: float = 0.0,
    train_gpus: int = 8,
    gpu_product: str = A100_PRODUCT,
    profile: str = DEFAULT_PROFILE,
    overrides: list = [],  # noqa: B006
    mlflow_experiment: str = "sharegpt4v",
):
    """Seed captions from the teacher VLM, then the captioner.

    Args:
        dataset_uri: {pipeline.dataset_uri}
        output_root: {pipeline.output_root}
        seed_split: {pipeline.seed_split}
        base_split: With `captioner_base` "", the images whose brief captions the captioner's base is
            pretrained on, e.g. "train" (disjoint from `seed_split`).
        captioner_base: {pipeline.captioner_base(split=base_split)}
        teacher_endpoint: {pipeline.teacher_endpoint}
        teacher_model: {pipeline.teacher_model}
        teacher_budget_usd: {pipeline.teacher_budget_usd}
        train_gpus: {pipeline.train_gpus}
        gpu_product: {pipeline.gpu_product}
        profile: {pipeline.profile}
        overrides: {overrides}
        mlflow_experiment: {pipeline.mlflow_experiment}
    """
    params = {"dataset_uri": dataset_uri, "output_root": output_root, "seed_split": seed_split,
              "base_split": base_split, "captioner_base": captioner_base, "teacher_endpoint": teacher_endpoint,
              "teacher_model": teacher_model, "train_gpus": train_gpus, "gpu_product": gpu_product, "profile": profile}
    with tracked("train-captioner", params, overrides, mlflow_experiment, gpu_product) as start:
        info = light_task(c.dataset_digest(uri=dataset_uri), display_name="dataset digest")
        recipe = foundations_part(dataset_uri, info.output, output_root, profile, overrides).outputs["Output"]
        captioner_part(dataset_uri, info.output, output_root, seed_split, base_split, captioner_base,
                       teacher_endpoint, teacher_model, teacher_budget_usd, train_gpus, start, profile, recipe)


@dsl.pipeline(name="train-lmm")
@catalog.document
def train_lmm(
    dataset_uri: str,
    captions: str,
    output_root: str = DEFAULT_ROOT,
    base_model: str = "",
    corpus_split: str = "train",
    sft_split: str = "val",
    train_gpus: int = 8,
    eval_gpus: int = 1,
    gpu_product: str = A100_PRODUCT,
    champion_metric: str = "world-vqa.overall",
    champion_threshold: float = 0.5,
    profile: str = DEFAULT_PROFILE,
    overrides: list = [],  # noqa: B006
    mlflow_experiment: str = "sharegpt4v",
):
    """Pretraining on a captioned corpus, SFT, evaluation; champion over the threshold.

    Args:
        dataset_uri: {pipeline.dataset_uri}
        captions: The corpus caption set pretraining learns from (from `caption-corpus`), e.g.
            "s3://sharegpt4v/pipeline/captions/corpus-0123456789ab".
        output_root: {pipeline.output_root}
        base_model: {pipeline.base_model}
        corpus_split: The images whose captions pretraining trains on, e.g. "train"; "" for every image.
        sft_split: {pipeline.sft_split}
        train_gpus: {pipeline.train_gpus}
        eval_gpus: {pipeline.eval_gpus}
        gpu_product: {pipeline.gpu_product}
        champion_metric: {pipeline.champion_metric}
        champion_threshold: Promote the SFT model to champion only when `champion_metric` is at
            least this (the metric's unit, e.g. 0.5 = 50% accuracy); 0 always promotes.
        profile: {pipeline.profile}
        overrides: {overrides}
        mlflow_experiment: {pipeline.mlflow_experiment}
    """
    params = {"dataset_uri": dataset_uri, "captions": captions, "output_root": output_root, "base_model": base_model,
              "corpus_split": corpus_split, "sft_split": sft_split, "train_gpus": train_gpus, "eval_gpus": eval_gpus,
              "gpu_product": gpu_product, "champion_metric": champion_metric,
              "champion_threshold": champion_threshold, "profile": profile}
    with tracked("train-lmm", params, overrides, mlflow_experiment, gpu_product) as start:
        data = light_task(c.dataset_digest(uri=dataset_uri), display_name="dataset digest")
        caps = light_task(c.dataset_digest(uri=captions), display_name="captions digest")
        recipe = foundations_part(dataset_uri, data.output, output_root, profile, overrides).outputs["Output"]
        tuned, ev = lmm_part(dataset_uri, data.output, captions, caps.output, base_model, corpus_split, sft_split,
                             output_root, train_gpus, eval_gpus, start, champion_metric, champion_threshold, profile,
                             recipe)
        score = light_task(c.champion_score(results=ev.outputs["results"], metric=champion_metric),
                           display_name="champion metric")
        with dsl.If(score.output >= champion_threshold, name="score-clears-threshold"):
            champion_part(tuned, ev, champion_metric, champion_threshold)


PIPELINES = {"sharegpt4v": sharegpt4v, "caption-corpus": caption_corpus, "train-captioner": train_captioner,
             "train-lmm": train_lmm}

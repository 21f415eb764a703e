"""The compiled pipelines: up to date, valid KFP IR, GPU tasks placed and provisioned, fan-out/fan-in, no secrets."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines import runner
from sharegpt4v.cli import main
from sharegpt4v.cluster import A100_PRODUCT, GPU_PRODUCT_LABEL, GPU_RESOURCE, MLFLOW_SECRET, S3_SECRET, TEACHER_SECRET

PIPELINES = ("sharegpt4v", "caption-corpus", "train-captioner", "train-lmm")
GPU_TASKS = {"sharegpt4v": {"train-base", "train-captioner", "caption-shard-group", "pretrain", "sft", "evaluate"},
             "caption-corpus": {"caption-shard-group"}, "train-captioner": {"train-base", "train-captioner"},
             "train-lmm": {"pretrain", "sft", "evaluate"}}


def load(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all((runner.COMPILED_DIR / f"{name}.yaml").read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks(spec: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every task of every DAG: name -> (the DAG's component name, task spec)."""
    found = {"root": spec["root"]}
    found.update(spec["components"])
    return {name: (comp, task) for comp, body in found.items() for name, task in body.get("dag", {}).get("tasks", {}).items()}


def executor(spec: dict[str, Any], task: dict[str, Any]) -> str | None:
    """The task's executor label; None for a DAG (ExitHandler, If, ParallelFor)."""
    return spec["components"][task["componentRef"]["name"]].get("executorLabel")


def test_committed_yaml_is_up_to_date_and_parses_as_pipeline_and_platform_spec(capsys) -> None:
    assert sorted(p.stem for p in runner.COMPILED_DIR.glob("*.yaml")) == sorted(PIPELINES)
    assert runner.check_compiled() == []
    assert main(["pipeline", "compile", "--check"]) == 0
    assert "up to date" in capsys.readouterr().out
    spec, platform = runner.parse_ir(runner.COMPILED_DIR / "sharegpt4v.yaml")
    assert spec.pipeline_info.name == "sharegpt4v" and "kubernetes" in platform.platforms
    from kfp import components

    assert components.load_component_from_file(str(runner.COMPILED_DIR / "sharegpt4v.yaml")).name == "sharegpt4v"


def test_check_reports_stale_and_missing_files(tmp_path: Path) -> None:
    runner.compile_all(tmp_path)
    stale = tmp_path / "train-lmm.yaml"
    stale.write_text(stale.read_text().replace("champion_threshold", "threshold"))
    broken = tmp_path / "train-captioner.yaml"
    broken.write_text(broken.read_text().replace("pipelineInfo:", "pipelineInformation:"))  # not a spec field
    (tmp_path / "caption-corpus.yaml").unlink()
    (tmp_path / "old.yaml").write_text("{}\n")
    problems = runner.check_compiled(tmp_path)
    assert len(problems) == 5, problems
    assert any("train-lmm.yaml: out of date" in p for p in problems)
    assert any("train-captioner.yaml: not a valid PipelineSpec" in p and "pipelineInformation" in p for p in problems)
    assert any("caption-corpus.yaml: missing" in p for p in problems)
    assert any("old.yaml: no pipeline of that name" in p for p in problems)


@pytest.mark.parametrize("name", PIPELINES)
def test_every_gpu_task_asks_for_a100_gpus_with_toleration_shm_and_secrets(name: str, monkeypatch) -> None:
    spec, platform = load(name)
    gpu = {}
    for task_name, (_, task) in tasks(spec).items():
        label = executor(spec, task)
        if label is None:
            continue
        resources = spec["deploymentSpec"]["executors"][label]["container"].get("resources", {})
        if "accelerator" in resources:
            gpu[task_name] = (label, resources)
    assert set(gpu) == GPU_TASKS[name]
    root_params = spec["root"]["inputDefinitions"]["parameters"]
    assert root_params["gpu_product"]["defaultValue"] == A100_PRODUCT
    for task_name, (label, resources) in gpu.items():
        accelerator = resources["accelerator"]
        assert accelerator["resourceType"] == GPU_RESOURCE
        channel = accelerator["resourceCount"]  # a pipeline parameter or the start task's output, not a constant
        assert channel.startswith("{{$.inputs.parameters['pipelinechannel--") and channel.endswith("_gpus']}}")
        # CPU and memory: fixed, or for a train task the start task's outputs (test_train_tasks_take_...)
        assert task_name in TRAIN_TASKS or (float(resources["resourceCpuRequest"]) >= 8
                                            and resources["resourceMemoryRequest"].endswith("Gi"))
        k8s = platform[label]
        selector = k8s["nodeSelector"]["nodeSelectorJson"]  # {gpu.product: <gpu_product>} from the start task
        assert (selector.get("taskOutputParameter", {}).get("producerTask") == "start-run"
                or selector.get("componentInputParameter") == "pipelinechannel--start-run-gpu_node_selector"), selector
        assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
        assert {"mountPath": "/dev/shm", "medium": "Memory"}.items() <= k8s["emptyDirMounts"][0].items()
        secrets = {s["secretName"] for s in k8s["secretAsEnv"]}
        assert {S3_SECRET, MLFLOW_SECRET} <= secrets
        envs = {e["envVar"] for s in k8s["secretAsEnv"] for e in s["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"} <= envs
        assert task_name in {t for t, (_, s) in tasks(spec).items() if s.get("retryPolicy", {}).get("maxRetryCount")}
    # the selector the GPU tasks get: what the start task returns for the gpu_product parameter
    from components.resources import train_sizes
    from components.stages import start_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    outputs = start_run.python_func(pipeline=name, kfp_run_id="r", kfp_run_name="n", params={"profile": "tiny"},
                                    overrides=[], experiment="e", gpu_product=root_params["gpu_product"]["defaultValue"],
                                    **train_sizes())
    assert outputs.gpu_node_selector == {GPU_PRODUCT_LABEL: A100_PRODUCT}


# the train tasks' resources: from the start task, which knows whether the recipe trains in the pod ----------------

TRAIN_TASKS = {"train-base", "train-captioner", "pretrain", "sft"}
START_OUTPUTS = {"accelerator": "train_gpus", "resourceCpuRequest": "train_cpu",
                 "resourceMemoryRequest": "train_memory", "resourceMemoryLimit": "train_memory"}


def source(spec: dict[str, Any], graph: str, task: dict[str, Any], key: str) -> dict[str, Any]:
    """Where input `key` of `task` (in DAG component `graph`) comes from, followed up through the enclosing DAGs
    (ExitHandler, If, ParallelFor) to a task output or a pipeline parameter: {"task": ..., "output": ...} or
    {"parameter": ...}."""
    wiring = task["inputs"]["parameters"][key]
    if "taskOutputParameter" in wiring:
        found = wiring["taskOutputParameter"]
        return {"task": found["producerTask"], "output": found["outputParameterKey"]}
    name = wiring["componentInputParameter"]
    if graph == "root":
        return {"parameter": name}
    [(parent, outer)] = [(g, t) for g, t in tasks(spec).values() if t["componentRef"]["name"] == graph]
    return source(spec, parent, outer, name)


def placeholder_input(value: str) -> str:
    match = re.fullmatch(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}", value)
    assert match, value
    return match.group(1)


@pytest.mark.parametrize("name", PIPELINES)
def test_train_tasks_take_gpus_cpu_and_memory_from_the_start_task(name: str) -> None:
    spec, platform = load(name)
    everything = tasks(spec)
    executors = spec["deploymentSpec"]["executors"]
    trains = {n for n in everything if n in TRAIN_TASKS}
    assert trains == GPU_TASKS[name] & TRAIN_TASKS
    for task_name, (graph, task) in everything.items():
        label = executor(spec, task)
        if label is None or task_name not in GPU_TASKS[name]:
            continue
        resources = executors[label]["container"]["resources"]
        values = {"accelerator": resources["accelerator"]["resourceCount"],
                  **{key: resources[key] for key in START_OUTPUTS if key != "accelerator"}}
        origins = {key: source(spec, graph, task, placeholder_input(value)) for key, value in values.items()
                   if value.startswith("{{")}
        if task_name in TRAIN_TASKS:
            # count, CPU and memory: placeholders filled in from the start task's outputs (through If DAGs)
            assert origins == {key: {"task": "start-run", "output": output} for key, output in START_OUTPUTS.items()}, \
                (task_name, origins)
            assert resources["accelerator"]["resourceType"] == GPU_RESOURCE
            assert {"mountPath": "/dev/shm", "medium": "Memory"}.items() <= platform[label]["emptyDirMounts"][0].items()
        else:
            # captioning and evaluation run in their pod whatever the recipe: a GPU-count parameter, fixed sizes
            gpus = {"caption-shard-group": "caption_gpus", "evaluate": "eval_gpus"}[task_name]
            assert origins == {"accelerator": {"parameter": gpus}}, (task_name, origins)
            assert float(resources["resourceCpuRequest"]) >= 8 and resources["resourceMemoryRequest"].endswith("Gi")
    # the sizes the start task chooses between are components.resources.SIZES, compiled in as its inputs
    from components.resources import SIZES

    start = everything["start-run"][1]["inputs"]["parameters"]
    for size in ("train", "follow"):
        assert start[f"{size}_size"]["runtimeValue"]["constant"] == {"cpu": SIZES[size].cpu, "memory": SIZES[size].memory}


def test_the_start_task_gives_a_multi_node_recipes_train_tasks_no_gpu(monkeypatch) -> None:
    from components.resources import SIZES, train_sizes
    from components.stages import start_run
    from sharegpt4v.stages import train_task_resources

    train = {"cpu": SIZES["train"].cpu, "memory": SIZES["train"].memory}
    follow = {"cpu": SIZES["follow"].cpu, "memory": SIZES["follow"].memory}
    assert (train, follow) == (train_sizes()["train_size"], train_sizes()["follow_size"])
    assert follow == {"cpu": "1", "memory": "2Gi"} and train == {"cpu": "64", "memory": "800Gi"}
    # a100-7b: 2 nodes x 8 GPUs, a TrainJob the task only follows: no GPU, the follow size
    assert train_task_resources("a100-7b", [], 8, train, follow) == {"train_gpus": 0, "train_cpu": "1",
                                                                    "train_memory": "2Gi"}
    assert train_task_resources("a100-7b", ["compute.gpus_per_node=4"], 4, train, follow)["train_gpus"] == 0
    # one node: trains in the task's pod on train_gpus GPUs with the train size
    assert train_task_resources("a100-7b", ["compute.num_nodes=1"], 8, train, follow) == {
        "train_gpus": 8, "train_cpu": "64", "train_memory": "800Gi"}
    assert train_task_resources("tiny", [], 1, train, follow) == {"train_gpus": 1, "train_cpu": "64",
                                                                 "train_memory": "800Gi"}
    # the component: the same, from the pipeline parameters it records (profile, train_gpus) and its overrides
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def start(profile: str, overrides: list[str], **params: Any) -> Any:
        return start_run.python_func(pipeline="sharegpt4v", kfp_run_id="r", kfp_run_name="n",
                                     params={"profile": profile, **params}, overrides=overrides, experiment="e",
                                     gpu_product=A100_PRODUCT, **train_sizes())

    multi = start("a100-7b", [], train_gpus=8)
    assert (multi.train_gpus, multi.train_cpu, multi.train_memory) == (0, "1", "2Gi")
    one = start("a100-7b", ["compute.num_nodes=1"], train_gpus=8)
    assert (one.train_gpus, one.train_cpu, one.train_memory) == (8, "64", "800Gi")
    assert start("tiny", [], train_gpus=1).train_gpus == 1
    assert start("tiny", [], train_gpus="1.0").train_gpus == 1  # an integer parameter inside a dict, as kfp.local passes it
    assert start("tiny", []).train_gpus == 0  # caption-corpus has no train_gpus (and no train task)


@pytest.mark.parametrize("name", ["sharegpt4v", "caption-corpus"])
def test_corpus_captioning_fans_out_with_parallelfor_and_in_with_collected(name: str) -> None:
    spec, _ = load(name)
    everything = tasks(spec)
    loop_component, caption_task = everything["caption-shard-group"]
    loop_task = next(t for _, t in everything.values() if t["componentRef"]["name"] == loop_component)
    iterator = loop_task["parameterIterator"]
    assert iterator["items"]["inputParameter"].endswith("shard-groups-Output")
    assert caption_task["inputs"]["parameters"]["job"]["componentInputParameter"] == iterator["itemInput"]
    collected = spec["components"][loop_component]["dag"]["outputs"]["parameters"]
    [(output_name, output)] = collected.items()
    assert output["valueFromParameter"]["producerSubtask"] == "caption-shard-group"
    _, merge = everything["merge-captions"]
    source = merge["inputs"]["parameters"]["groups"]["taskOutputParameter"]
    assert source["outputParameterKey"] == output_name
    assert everything[source["producerTask"]][1]["componentRef"]["name"] == loop_component


def test_caching_and_retries_follow_the_policy() -> None:
    spec, platform = load("sharegpt4v")
    everything = tasks(spec)
    cached = {n for n, (_, t) in everything.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert {"synthetic-world", "train-captioner", "caption-shard-group", "merge-captions", "pretrain", "sft",
            "evaluate"} <= cached
    assert not cached & {"seed-captions", "ingest", "start-run", "finish-run", "promote", "deploy",
                         "export-model-repository"}
    retried = {n for n, (_, t) in everything.items() if t.get("retryPolicy", {}).get("maxRetryCount")}
    assert {"seed-captions", "train-captioner", "caption-shard-group", "pretrain", "sft", "deploy"} <= retried
    assert everything["seed-captions"][1]["retryPolicy"]["backoffFactor"] == 2
    teacher = platform[executor(spec, everything["seed-captions"][1])]["secretAsEnv"]
    assert {"secretName": TEACHER_SECRET} .items() <= next(s for s in teacher if s["secretName"] == TEACHER_SECRET).items()


def test_pipeline_run_is_tracked_by_an_exit_handler_and_gated_on_the_score() -> None:
    spec, _ = load("sharegpt4v")
    everything = tasks(spec)
    finish = spec["root"]["dag"]["tasks"]["finish-run"]
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert finish["inputs"]["parameters"]["status"]["taskFinalStatus"]["producerTask"] == "exit-handler-1"
    assert everything["start-run"][1]["inputs"]["parameters"]["kfp_run_id"]["runtimeValue"]["constant"] == \
        "{{$.pipeline_job_uuid}}"
    condition_component, _ = everything["promote"]
    gate = next(t for _, t in everything.values() if t["componentRef"]["name"] == condition_component)
    condition = gate["triggerPolicy"]["condition"]
    assert "champion-score-Output" in condition and ">=" in condition and "champion_threshold" in condition
    assert everything["champion-score"][1]["inputs"]["parameters"]["results"]["taskOutputParameter"] == {
        "producerTask": "evaluate", "outputParameterKey": "results"}
    assert everything["deploy"][0] == condition_component and everything["export-model-repository"][0] == condition_component
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"output_root", "source_uri", "teacher_endpoint", "teacher_model", "profile", "overrides", "train_gpus",
            "caption_gpus", "eval_gpus", "gpu_product", "shard_groups", "champion_threshold"} <= set(params)


def test_no_secret_value_reaches_the_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {"AWS_ACCESS_KEY_ID": "FAKEACCESSKEY0123", "AWS_SECRET_ACCESS_KEY": "fake-secret-key-6f1d2",
            "OPENAI_API_KEY": "sk-fake-teacher-key-93ab", "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-71",
            "MLFLOW_TRACKING_URI": "http://user:fake-uri-password-55@mlflow:5000"}
    for key, value in fake.items():
        monkeypatch.setenv(key, value)
    texts = [p.read_text() for p in runner.compile_all(tmp_path).values()]
    texts += [p.read_text() for p in runner.COMPILED_DIR.glob("*.yaml")]
    for text in texts:
        for value in fake.values():
            assert value not in text
        assert "fake-uri-password" not in text


# descriptions, the image, the component reference ------------------------------------------------------------

DIGEST_REF = "registry.example/sharegpt4v@sha256:" + "0123456789abcdef" * 4


def definitions(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every input and output definition, parameters and artifacts, of the root and every component:
    "<component>.<inputs|outputs>.<name>" -> definition."""
    found = {}
    for comp_name, comp in [("root", spec["root"]), *spec["components"].items()]:
        for side, key in (("inputs", "inputDefinitions"), ("outputs", "outputDefinitions")):
            for kind in ("parameters", "artifacts"):
                for name, value in comp.get(key, {}).get(kind, {}).items():
                    found[f"{comp_name}.{side}.{name}"] = value
    return found


@pytest.mark.parametrize("name", PIPELINES)
def test_every_parameter_of_every_pipeline_and_component_has_a_description(name: str) -> None:
    spec, _ = load(name)
    assert spec["pipelineInfo"]["description"].strip()
    everything = definitions(spec)
    assert len(everything) > 20
    missing = sorted(key for key, value in everything.items() if not str(value.get("description", "")).strip())
    assert missing == [], missing
    root = spec["root"]["inputDefinitions"]["parameters"]
    assert "nvidia.com/gpu.product" in root["gpu_product"]["description"]
    assert "count" in root[next(p for p in root if p.endswith("_gpus"))]["description"]
    # the DAG components (ExitHandler, If, ParallelFor) pass the pipeline parameter's description on
    exit_handler = spec["components"]["comp-exit-handler-1"]["inputDefinitions"]["parameters"]
    assert exit_handler["pipelinechannel--gpu_product"]["description"] == root["gpu_product"]["description"]



def test_shared_descriptions_are_written_out_in_the_docstrings_and_in_the_source_the_container_runs() -> None:
    import ast
    import inspect

    from components import catalog
    from pipelines import definitions

    root = Path(__file__).resolve().parents[2]
    placeholders = "".join((root / path).read_text() for path in ("components/stages.py", "pipelines/definitions.py"))
    uses = [match.group(1) for match in catalog._PLACEHOLDER.finditer(placeholders)]
    # each shared description serves two docstrings at least (one used once belongs in its docstring)
    assert {name: uses.count(name) for name in catalog.SHARED_DOCS if uses.count(name) < 2} == {}
    for pipeline in definitions.PIPELINES.values():
        doc = pipeline.pipeline_func.__doc__
        assert catalog.expand(doc) == doc and not re.search(r"\{pipeline\.\w+", doc)
    for name, (component, _) in catalog.CATALOG.items():
        doc = component.python_func.__doc__ or ""
        assert catalog.expand(doc) == doc, name  # nothing left to fill in
        source = component.component_spec.implementation.container.command[-1]
        node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
        assert inspect.cleandoc(ast.get_docstring(node, clean=False) or "") == inspect.cleandoc(doc), name
    profile = catalog.CATALOG["sft"][0].component_spec.inputs["profile"].description
    assert profile == catalog.SHARED_DOCS["profile"]  # the IR description: the shared text as it stands


def test_expand_fills_in_fields_keeps_the_indentation_and_refuses_an_unknown_or_malformed_placeholder() -> None:
    from components import catalog

    doc = "Do it.\n\n    Args:\n        out_root: {out_root(folder=x, area=models)}\n        gpus: {task_gpus}\n    "
    text = catalog.expand(doc)
    assert ("        out_root: S3 prefix (or local folder) of the output, written to `<out_root>/x-<key>` (the key: 12 "
            "hex\n            digits of the inputs") in text
    assert 'e.g.\n            "s3://sharegpt4v/pipeline/models".\n        gpus: GPUs the task is given' in text
    plain = '{"uri": the set} {{$.pipeline_job_uuid}} [{group, groups}] {"<benchmark>.<metric>": value}'
    assert catalog.expand(plain) == plain
    for bad, message in [("{nope}", "no 'nope' in components.catalog.SHARED_DOCS"),
                         ("{out_root}", "'out_root' takes area, folder, got none"),
                         ("{out_root(folder=x)}", "takes area, folder, got folder"),
                         ("{profile(area=x)}", "takes no fields, got area"),
                         ("{out_root(folder, area=x)}", "field=value"),
                         ("{out_root(folder=x, area=y}", "malformed")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            catalog.expand(f"        out_root: {bad}")

UNDOCUMENTED = '''
from kfp import dsl


@dsl.component(base_image="python:3.11")
def documented(count: int, note: str) -> int:
    """Count.

    Args:
        count: Items (count), e.g. 3.

    Returns:
        Output: The count.
    """
    return count


@dsl.pipeline(name="tiny")
def tiny(count: int = 3, note: str = ""):
    """A pipeline.

    Args:
        count: Items (count), e.g. 3.
        note: A note, e.g. "x".
    """
    documented(count=count, note=note)
'''


def test_a_parameter_without_a_description_fails_compile_and_check(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    source = tmp_path / "undocumented_pipeline.py"  # a module of its own: kfp reads the component's source
    source.write_text(UNDOCUMENTED)
    spec = importlib.util.spec_from_file_location("undocumented_pipeline", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(runner, "_pipelines", lambda: {"tiny": module.tiny})
    out = tmp_path / "compiled"
    with pytest.raises(runner.PipelineError, match=r"comp-documented\.inputs\.note"):
        runner.compile_all(out)
    problems = runner.check_compiled(out)
    assert len(problems) == 1 and "no description for comp-documented.inputs.note" in problems[0]


def test_compile_image_sets_every_executor_and_nothing_else(tmp_path: Path, capsys) -> None:
    assert main(["pipeline", "compile", "--image", DIGEST_REF, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert sorted(p.stem for p in tmp_path.glob("*.yaml")) == sorted(PIPELINES)
    for name in PIPELINES:
        spec, platform = yaml.safe_load_all((tmp_path / f"{name}.yaml").read_text())
        executors = spec["deploymentSpec"]["executors"]
        assert executors and {e["container"]["image"] for e in executors.values()} == {DIGEST_REF}
        committed, committed_platform = yaml.safe_load_all((runner.COMPILED_DIR / f"{name}.yaml").read_text())
        assert {e["container"]["image"] for e in committed["deploymentSpec"]["executors"].values()} == {
            runner.default_image()}  # the committed files: the documented default
        for executor in committed["deploymentSpec"]["executors"].values():
            executor["container"]["image"] = DIGEST_REF
        assert spec == committed and platform == committed_platform
    # the files compiled for the image are what --check --image expects; against the default they are stale
    assert main(["pipeline", "compile", "--check", "--image", DIGEST_REF, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["pipeline", "compile", "--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "out of date" in err and "4 problems" in err


@pytest.mark.parametrize("ref", ["", " ", "not an image", "registry.example/sharegpt4v@sha256:0123",
                                 "registry.example/sharegpt4v", "registry.example/ShareGPT4V:0.1.0",
                                 "registry.example/sharegpt4v@md5:" + "0" * 32, "registry.example/sharegpt4v:"])
def test_a_malformed_image_is_a_usage_error(ref: str, tmp_path: Path, capsys) -> None:
    assert main(["pipeline", "compile", "--image", ref, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--image" in err and "not an image reference" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("ref", [DIGEST_REF, "ghcr.io/org/sharegpt4v-train:0.1.0", "sharegpt4v/train:0.1.0",
                                 "localhost:5000/sharegpt4v/train:0.1.0@sha256:" + "a" * 64])
def test_image_references_with_a_tag_or_digest_are_accepted(ref: str) -> None:
    assert runner.image_reference(ref) == ref


def test_component_reference_is_generated_from_the_components_and_checked(tmp_path: Path) -> None:
    from components import catalog

    reference = catalog.REFERENCE_PATH
    text = reference.read_text()
    assert text == runner.render_reference({name: runner.COMPILED_DIR / f"{name}.yaml" for name in PIPELINES})
    assert runner.default_image() in text and "--image" in text
    for secret in (S3_SECRET, MLFLOW_SECRET, TEACHER_SECRET):
        assert f"| `{secret}` |" in text
    assert len(catalog.CATALOG) >= 20
    for name, (component, card) in catalog.CATALOG.items():
        section = text.split(f"\n## {name.replace('_', '-')}\n", 1)[1].split("\n## ", 1)[0]
        assert f"| Reads | {card.reads} |" in section and f"| Writes | {card.writes} |" in section
        for key in [*(component.component_spec.inputs or {}), *(component.component_spec.outputs or {})]:
            assert f"| `{key}` |" in section
        assert ("| GPUs | `nvidia.com/gpu`" in section) == card.gpu
        assert (f"`{TEACHER_SECRET}`" in section) == card.teacher
        # the same card ends the component's description
        assert component.component_spec.description.endswith(card.text())
    # stale or missing: --check says so
    stale = tmp_path / "COMPONENTS.md"
    stale.write_text(text.replace("| Reads |", "| Read |", 1))
    assert any("COMPONENTS.md: out of date" in p for p in runner.check_compiled(reference=stale))
    assert any("none.md: missing" in p for p in runner.check_compiled(reference=tmp_path / "none.md"))


def test_cards_agree_with_what_the_pipelines_give_each_task(monkeypatch) -> None:
    from dataclasses import replace

    from components import catalog, stages  # noqa: F401  (importing stages registers the cards)

    compiled = runner.load_compiled({name: runner.COMPILED_DIR / f"{name}.yaml" for name in PIPELINES})
    assert catalog.check_cards(compiled) == []
    component, card = catalog.CATALOG["train_captioner"]
    monkeypatch.setitem(catalog.CATALOG, "train_captioner", (component, replace(card, gpu=False, teacher=True)))
    problems = catalog.check_cards(compiled)
    assert any("train-captioner" in p and "declares gpu=False" in p for p in problems)
    assert any("declares Secrets" in p and TEACHER_SECRET in p for p in problems)
    # a train task's card says its resources come from the start task; an evaluation's does not
    for name, trainjob in (("pretrain", False), ("evaluate", True)):
        component, card = catalog.CATALOG[name]
        monkeypatch.setitem(catalog.CATALOG, name, (component, replace(card, trainjob=trainjob)))
    problems = catalog.check_cards(compiled)
    assert any("task 'pretrain'" in p and "does not declare trainjob=True" in p for p in problems), problems
    assert any("task 'evaluate'" in p and "declares trainjob=True" in p and "eval_gpus" in p for p in problems)

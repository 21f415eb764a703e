"""The model repository: one config template (KIND_GPU in cluster, KIND_CPU locally), thin adapters,
and an exporter that writes every file before the manifest and replaces an earlier export cleanly."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from sharegpt4v import storage
from sharegpt4v.config import load_recipe
from sharegpt4v.errors import PlatformError
from sharegpt4v.modeling.builder import save_model
from sharegpt4v.provenance import OutputMismatch
from sharegpt4v.serving.export import export_model_repository
from sharegpt4v.serving.protocol import ServingOptions
from sharegpt4v.serving.repository import ADAPTER, RepositoryError, committed_files, model_configs, serving_dir
from tests.modeling.fixtures import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())  # Triton's own schema, strictly


def test_one_template_renders_cluster_and_local_configs() -> None:
    recipe = load_recipe("a100-7b")
    gpu, cpu = model_configs(recipe), model_configs(recipe, kind="KIND_CPU")
    assert set(gpu) == {"captioner", "chat", "chat_stream"}
    for name in gpu:
        g, c = parse(gpu[name]), parse(cpu[name])
        assert g.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert c.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        g.ClearField("instance_group"), c.ClearField("instance_group")
        assert g == c  # nothing else differs
    chat = parse(gpu["chat"])
    assert chat.backend == "python" and chat.max_batch_size == 16
    assert chat.dynamic_batching.max_queue_delay_microseconds == 10_000
    assert [i.name for i in chat.input] == ["image", "messages", "max_tokens", "temperature"]
    assert [i.optional for i in chat.input] == [False, False, True, True]
    assert [o.name for o in chat.output] == ["text", "finish_reason", "prompt_tokens", "completion_tokens"]
    options = ServingOptions.from_parameters({k: v.string_value for k, v in chat.parameters.items()})
    assert (options.task, options.weights, options.max_new_tokens, options.max_tokens_limit) == ("chat", "weights", 512, 1024)
    stream = parse(gpu["chat_stream"])
    assert stream.model_transaction_policy.decoupled and not chat.model_transaction_policy.decoupled
    assert stream.parameters["weights"].string_value == "../../chat/1/weights"
    captioner = parse(gpu["captioner"])
    assert captioner.parameters["default_prompt"].string_value == "Describe this image comprehensively and in detail."
    assert captioner.parameters["repetition_penalty"].string_value == "1.05"  # captioning settings of the profile

    tiny = load_recipe("tiny", ["serving.max_batch_size=1", "serving.instance_count=2", "serving.streaming=false"])
    configs = model_configs(tiny, ["captioner"])
    single = parse(configs["captioner"])
    assert list(configs) == ["captioner"] and single.max_batch_size == 1 and single.instance_group[0].count == 2
    with pytest.raises(RepositoryError, match="model 'detector': not a served model"):
        model_configs(tiny, ["detector"])


def test_committed_configs_and_adapters_are_the_rendered_ones() -> None:
    files = committed_files()
    assert {p.relative_to(serving_dir()).as_posix() for p in files} == {
        f"{m}/{f}" for m in ("captioner", "chat", "chat_stream") for f in ("config.pbtxt", "1/model.py")}
    stale = [str(path) for path, text in files.items() if not path.is_file() or path.read_text() != text]
    assert not stale, f"run `python -m sharegpt4v.serving.repository` to rewrite {stale}"


def _imports(code: str) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_adapter_is_thin_and_only_it_imports_triton() -> None:
    adapter = ROOT / "sharegpt4v" / "serving" / "triton_model.py"
    # every model.py is the same import: config parameters say what it serves
    assert _imports(ADAPTER) == ["sharegpt4v.serving.triton_model"]
    assert "TritonPythonModel" in ADAPTER
    code = adapter.read_text()
    assert set(_imports(code)) == {"json", "pathlib", "triton_python_backend_utils", "sharegpt4v.serving.engine"}
    assert "generate(" not in code and "tokenizer" not in code  # no generation or prompt logic of its own
    for module in (ROOT / "sharegpt4v").rglob("*.py"):
        if module != adapter:  # the rest of the core imports neither Triton's stub module, nor the adapter, nor kfp
            banned = ("triton_python_backend_utils", "kfp", "sharegpt4v.serving.triton_model")
            assert not any(n.startswith(banned) for n in _imports(module.read_text())), module


def test_the_serving_folder_lints() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run([str(ruff), "check", "serving", "bench/bench_triton.py"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def checkpoint(tmp_path: Path) -> str:
    model, processor = tiny_model()
    save_model(model, processor, str(tmp_path / "checkpoint"))
    return str(tmp_path / "checkpoint")


def test_export_writes_the_manifest_last_and_replaces_an_earlier_export(
    checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []
    original = storage.LocalStore.writer

    def recording(self: storage.LocalStore, key: str):  # type: ignore[no-untyped-def]
        written.append(key)
        return original(self, key)

    monkeypatch.setattr(storage.LocalStore, "writer", recording)
    recipe = load_recipe("tiny")
    out = str(tmp_path / "repo")
    result = export_model_repository({"captioner": checkpoint, "chat": checkpoint}, out, recipe)
    manifest = storage.open_store(out).read_manifest()
    assert written[-1] == "manifest.json" and sorted(written[:-1]) == sorted(f["path"] for f in manifest["files"])
    assert storage.open_store(out).verify_folder() == []
    assert result["instance_kind"] == "KIND_CPU" and manifest["kind"] == "triton-model-repository"
    assert result["models"]["captioner"]["checkpoint"] == checkpoint and "version" not in result["models"]["captioner"]

    # The same export again keeps the repository as it is (nothing rewritten under a live server) ...
    written.clear()
    assert export_model_repository({"captioner": checkpoint, "chat": checkpoint}, out, recipe) == result
    assert written == []
    # ... another one is refused in one line, naming what differs ...
    with pytest.raises(OutputMismatch, match=r"repository made from something else \(configs\.chat: [0-9a-f]{12} -> [0-9a-f]{12}.*--replace") as err:
        export_model_repository({"chat": checkpoint}, out, dataclasses.replace(recipe), kind="KIND_GPU")
    assert "\n" not in str(err.value) and storage.open_store(out).read_manifest() == manifest
    # ... unless asked: the second export then replaces the first, nothing of the captioner is left to be served.
    again = export_model_repository({"chat": checkpoint}, out, dataclasses.replace(recipe), kind="KIND_GPU",
                                    replace=True)
    files = {p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file()}
    assert not any(f.startswith("captioner/") for f in files) and "chat/1/weights/model.safetensors" in files
    assert again["digest"] != result["digest"] and "kind: KIND_GPU" in (Path(out) / "chat" / "config.pbtxt").read_text()

    # An interrupted export (no manifest) is replaced too; a folder of other data is not touched.
    (Path(out) / "manifest.json").unlink()
    export_model_repository({"captioner": checkpoint}, out, recipe)
    assert sorted(p.name for p in Path(out).iterdir()) == ["captioner", "manifest.json"]
    with pytest.raises(PlatformError, match="no manifest.json; the checkpoint is incomplete"):
        export_model_repository({"chat": str(tmp_path / "nothing")}, str(tmp_path / "repo2"), recipe)


def test_export_refuses_the_vllm_engine_and_says_what_serves_it(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="serve vllm") as err:
        export_model_repository({"chat": str(tmp_path / "checkpoint")}, str(tmp_path / "repo"),
                                load_recipe("tiny", ["serving.engine=vllm"]))
    assert "\n" not in str(err.value) and not (tmp_path / "repo").exists()

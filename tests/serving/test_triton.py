"""The real Triton server on an exported repository, called with tritonclient over HTTP and gRPC.

Once per module: a tiny checkpoint in S3 is registered in MLflow (chat @champion, captioner by
version number), exported to an S3 prefix, downloaded with KServe's own storage-initializer code
(`kserve_storage.Storage.download`) and served from the download by `tritonserver` from the
nvidia-pytriton wheel.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from mlflow.tracking import MlflowClient
from tritonclient.utils import InferenceServerException

from sharegpt4v import services, storage
from sharegpt4v.modeling.builder import save_model
from sharegpt4v.serving import client
from sharegpt4v.serving.export import TAG_REPOSITORY, export_model_repository
from sharegpt4v.serving.triton import LocalTriton, start_triton
from sharegpt4v.tracking import register_checkpoint
from tests.conftest import TEST_BUCKET
from tests.modeling.fixtures import recipe, tiny_model, world

TOKENS = 6  # keep generation short: this is about serving, not the model


@dataclass
class Served:
    triton: LocalTriton
    export: dict[str, Any]
    download: Path
    versions: dict[str, dict[str, str]]
    tracking_uri: str


@pytest.fixture(scope="module")
def served(s3_server: services.LocalS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("triton")
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_server.env.items():
            env.setenv(key, value)
        mlflow = services.start_mlflow(tmp / "mlflow")
        for key, value in mlflow.env.items():
            env.setenv(key, value)
        env.setenv("SHAREGPT4V_CACHE", str(tmp / "cache"))
        root = f"s3://{TEST_BUCKET}/serving-{uuid.uuid4().hex[:8]}"
        model, processor = tiny_model()
        save_model(model, processor, f"{root}/checkpoint")
        chat = register_checkpoint("sft", f"{root}/checkpoint", aliases=("champion",))
        captioner = register_checkpoint("captioner", f"{root}/checkpoint")
        export = export_model_repository(
            {"chat": "models:/sharegpt4v-chat@champion", "captioner": f"models:/sharegpt4v-captioner/{captioner['version']}"},
            f"{root}/model-repo", recipe(), kind="KIND_CPU",
        )
        download = tmp / "mnt-models"
        kserve_storage_initializer(export["uri"], download)
        # Explicit model control, every model loaded at start as in the default mode: lets the internal-failure
        # test load a misconfigured model beside the served ones (the repository on disk stays the export's).
        with start_triton(download, tmp / "work", extra_args=["--model-control-mode=explicit", "--load-model=*"]) as triton:
            yield Served(triton, export, download, {"chat": chat, "captioner": captioner}, mlflow.tracking_uri)


def kserve_storage_initializer(uri: str, destination: Path) -> None:
    """Run KServe's storage-initializer code in its own process, as its init container does.

    `Storage.download` forks a multiprocessing pool; forking this test process (torch and boto
    threads alive) can deadlock a child, which hung a CI run, so it gets a fresh interpreter.
    """
    code = "import sys; from kserve_storage import Storage; Storage.download(sys.argv[1], sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, uri, str(destination)], check=True, timeout=300)


def rows(module: Any, name: str, values: list[Any], dtype: str) -> Any:
    array = np.array(values, dtype=object if dtype == "BYTES" else {"INT32": np.int32, "FP32": np.float32}[dtype])
    array = array.reshape(len(values), 1) if array.ndim == 1 else array
    tensor = module.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def images(n: int) -> list[bytes]:
    return [s.image for s in world(n)]


# the exported repository -----------------------------------------------------------------------


def test_export_is_complete_verified_and_linked_to_the_registry(served: Served) -> None:
    export = served.export
    assert export["uri"].endswith("/model-repo/")
    assert set(export["models"]) == {"captioner", "chat", "chat_stream"}
    assert export["models"]["chat"]["name"] == "sharegpt4v-chat" and export["models"]["chat"]["version"] == "1"
    assert export["models"]["captioner"]["version"] == served.versions["captioner"]["version"]
    # KServe's download holds exactly the manifest's files, each matching its sha256.
    manifest = json.loads((served.download / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    downloaded = {p.relative_to(served.download).as_posix() for p in served.download.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts}  # the stub compiles model.py in place
    assert downloaded == listed | {"manifest.json"}
    assert storage.open_store(str(served.download)).verify_folder() == []
    assert {"captioner/1/weights/model.safetensors", "chat/1/weights/model.safetensors", "chat/1/model.py",
            "chat_stream/config.pbtxt"} <= listed
    assert "chat_stream/1/weights/model.safetensors" not in listed  # the stream model shares chat's weights
    config = (served.download / "chat" / "config.pbtxt").read_text()
    assert "kind: KIND_CPU" in config and "max_queue_delay_microseconds: 20000" in config and "max_batch_size: 8" in config
    assert 'key: "lineage.version" value: { string_value: "1" }' in config
    registry = MlflowClient(tracking_uri=served.tracking_uri)
    for name, version in (("sharegpt4v-chat", "1"), ("sharegpt4v-captioner", served.versions["captioner"]["version"])):
        assert registry.get_model_version(name, version).tags[TAG_REPOSITORY] == export["uri"]


# answers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_captions_and_answers_come_back_for_a_batch(served: Served, protocol: str) -> None:
    module = httpclient if protocol == "http" else grpcclient
    url = served.triton.http_url.removeprefix("http://") if protocol == "http" else served.triton.grpc_url
    triton = module.InferenceServerClient(url)
    batch = images(3)
    # One request carrying three images...
    result = triton.infer("captioner", [rows(module, "image", batch, "BYTES"), rows(module, "max_tokens", [TOKENS] * 3, "INT32")])
    captions = [t.decode() for t in result.as_numpy("text")[:, 0]]
    assert len(captions) == 3 and all(captions)
    assert set(result.as_numpy("finish_reason")[:, 0]) <= {b"stop", b"length"}
    assert all(0 < n <= TOKENS for n in result.as_numpy("completion_tokens")[:, 0])
    questions = [json.dumps(q).encode() for q in ("What colour is the circle?", "How many shapes?", "Is there text?")]
    result = triton.infer("chat", [rows(module, "image", batch, "BYTES"), rows(module, "messages", questions, "BYTES"),
                                   rows(module, "max_tokens", [TOKENS] * 3, "INT32")])
    assert all(t for t in result.as_numpy("text")[:, 0])
    # ...and separate requests from the client library, a multi-turn chat among them.
    url = served.triton.http_url if protocol == "http" else served.triton.grpc_url
    answer = client.chat(url, batch[0], [{"role": "user", "content": "What is left of the square?"},
                                         {"role": "assistant", "content": "a red circle"},
                                         {"role": "user", "content": "And right of it?"}], protocol=protocol, max_tokens=TOKENS)
    single = client.chat(url, batch[0], "And right of it?", protocol=protocol, max_tokens=TOKENS)
    assert answer["text"] and answer["prompt_tokens"] > single["prompt_tokens"]
    caption = client.caption(url, base64.b64encode(batch[1]), protocol=protocol, max_tokens=TOKENS)
    assert caption["text"] == captions[1]  # base64 or raw bytes: the same image, the same greedy caption


def test_sixteen_concurrent_clients_all_succeed_and_get_batched(served: Served) -> None:
    pictures = images(16)
    start = threading.Barrier(16)
    before = {m: _counts(served, m) for m in ("captioner", "chat")}

    def one(i: int) -> dict[str, Any]:
        protocol = "http" if i % 2 else "grpc"
        url = served.triton.http_url if protocol == "http" else served.triton.grpc_url
        connection = client.connect(url, protocol)  # each client its own connection
        start.wait()
        if i % 4 < 2:
            return client.caption(url, pictures[i], protocol=protocol, max_tokens=TOKENS, client=connection)
        return client.chat(url, pictures[i], "What shapes are there?", protocol=protocol, max_tokens=TOKENS, client=connection)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len(results) == 16 and all(r["text"] and r["completion_tokens"] > 0 for r in results)
    requests, executions = _new_counts(served, before, expected_requests=16)
    assert requests == 16
    assert executions < requests  # the dynamic batcher put several requests into one model call


def _new_counts(served: Served, before: dict[str, tuple[int, int]], expected_requests: int,
                timeout_s: float = 15.0) -> tuple[int, int]:
    """(requests, executions) since `before`, summed over the models. Triton records a request's statistics
    after its response is on the wire, so a client can have every answer before the counts show it: poll."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = {model: _counts(served, model) for model in before}
        requests = sum(after[m][0] - before[m][0] for m in before)
        executions = sum(after[m][1] - before[m][1] for m in before)
        if requests >= expected_requests or time.monotonic() > deadline:
            return requests, executions
        time.sleep(0.2)


def _counts(served: Served, model: str) -> tuple[int, int]:
    stats = httpclient.InferenceServerClient(served.triton.http_url.removeprefix("http://")).get_inference_statistics(model)
    entry = stats["model_stats"][0]
    return int(entry["inference_count"]), int(entry["execution_count"])


# bad requests -----------------------------------------------------------------------------------

B64 = base64.b64encode


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_each_bad_request_gets_its_own_error_and_the_batch_is_served(served: Served, protocol: str) -> None:
    module = httpclient if protocol == "http" else grpcclient
    url = served.triton.http_url.removeprefix("http://") if protocol == "http" else served.triton.grpc_url
    good, other = images(2)
    question = json.dumps("What colour is the square?").encode()
    cases: list[tuple[str, str, list[Any], str | None]] = [
        ("good caption", "captioner", [rows(module, "image", [good], "BYTES")], None),
        ("corrupt image", "captioner", [rows(module, "image", [good[:60]], "BYTES")], "image: bytes are not a decodable image"),
        ("non-image bytes", "chat", [rows(module, "image", [b"\x00\x01binary, not a picture"], "BYTES"),
                                     rows(module, "messages", [question], "BYTES")], "image: bytes are not a decodable image"),
        ("bad base64", "captioner", [rows(module, "image", [B64(good)[:-3]], "BYTES")], "not valid base64"),
        ("good chat", "chat", [rows(module, "image", [other], "BYTES"), rows(module, "messages", [question], "BYTES")], None),
        ("empty prompt", "captioner", [rows(module, "image", [good], "BYTES"), rows(module, "prompt", [b"  "], "BYTES")],
         "prompt: empty"),
        ("over-long prompt", "captioner", [rows(module, "image", [good], "BYTES"), rows(module, "prompt", [b"a" * 2001], "BYTES")],
         "prompt: 2001 characters is over the limit of 2000"),
        ("empty messages", "chat", [rows(module, "image", [good], "BYTES"), rows(module, "messages", [b"[]"], "BYTES")],
         "messages: empty list"),
        ("messages not JSON", "chat", [rows(module, "image", [good], "BYTES"), rows(module, "messages", [b"hi there"], "BYTES")],
         "messages: not valid JSON"),
        ("max_tokens 0", "captioner", [rows(module, "image", [good], "BYTES"), rows(module, "max_tokens", [0], "INT32")],
         "max_tokens: 0 is out of range (1..128)"),
        ("max_tokens huge", "chat", [rows(module, "image", [good], "BYTES"), rows(module, "messages", [question], "BYTES"),
                                     rows(module, "max_tokens", [100_000], "INT32")], "max_tokens: 100000 is out of range"),
        ("messages blank", "chat", [rows(module, "image", [good], "BYTES"), rows(module, "messages", [b"  "], "BYTES")],
         "messages: empty"),
        ("messages wrong role", "chat", [rows(module, "image", [good], "BYTES"),
                                         rows(module, "messages", [b'[{"role": "assistant", "content": "hi"}]'], "BYTES")],
         "messages[0].role: expected 'user'"),
        ("temperature", "captioner", [rows(module, "image", [good], "BYTES"), rows(module, "temperature", [9.0], "FP32")],
         "temperature: 9.0 is out of range"),
        ("temperature negative", "chat", [rows(module, "image", [good], "BYTES"), rows(module, "messages", [question], "BYTES"),
                                          rows(module, "temperature", [-1.0], "FP32")], "temperature: -1.0 is out of range"),
        ("no messages", "chat", [rows(module, "image", [good], "BYTES")],
         "missing required input(s) ['messages']"),  # Triton's own check
        ("the captioner's prompt to chat", "chat", [rows(module, "image", [good], "BYTES"), rows(module, "messages", [question], "BYTES"),
                                                    rows(module, "prompt", [b"Describe."], "BYTES")],
         "unexpected inference input 'prompt'"),  # Triton's own check
        ("wrong shape", "captioner", [rows(module, "image", [[good, other]], "BYTES")], "image: wrong shape [1, 2]"),
        ("rows disagree", "chat", [rows(module, "image", [good, other], "BYTES"), rows(module, "messages", [question], "BYTES")],
         "batch size does not match other inputs"),  # Triton checks this one itself, per request
        ("good caption 2", "captioner", [rows(module, "image", [other], "BYTES"), rows(module, "max_tokens", [3], "INT32")], None),
    ]
    start = threading.Barrier(len(cases))

    def send(case: tuple[str, str, list[Any], str | None]) -> tuple[str, Any]:
        connection = module.InferenceServerClient(url)
        start.wait()  # all at once: good and bad requests share dynamic batches
        try:
            return "ok", connection.infer(case[1], case[2]).as_numpy("text")
        except InferenceServerException as exc:
            return exc.status(), exc.message()

    with ThreadPoolExecutor(len(cases)) as pool:
        outcomes = list(pool.map(send, cases))
    # a client's mistake is a client error: HTTP 400 / gRPC INVALID_ARGUMENT, never 500 / INTERNAL
    bad_request = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
    for (name, _, _, expected), (status, value) in zip(cases, outcomes):
        if expected is None:
            assert status == "ok" and value[0, 0], name
        else:
            assert status == bad_request and expected in value, f"{name}: {status} {value}"
    triton = module.InferenceServerClient(url)
    assert triton.is_server_ready() and triton.is_model_ready("captioner") and triton.is_model_ready("chat")
    assert triton.infer("captioner", cases[0][2]).as_numpy("text")[0, 0]


def test_a_bad_request_is_http_400_for_any_http_client(served: Served) -> None:
    def post(image: str) -> tuple[int, dict[str, Any]]:
        body = {"id": "raw-1", "inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [image]},
                                          {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [TOKENS]}]}
        request = urllib.request.Request(f"{served.triton.http_url}/v2/models/captioner/infer", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    status, answer = post("not an image, and not base64 either!")
    assert status == 400 and answer["error"].startswith("image: not image bytes, and not base64 either")
    status, answer = post(B64(images(1)[0]).decode())
    assert status == 200 and answer["id"] == "raw-1" and answer["outputs"]


# streaming --------------------------------------------------------------------------------------


def test_chat_streams_tokens_over_grpc_from_the_decoupled_model(served: Served) -> None:
    picture = images(3)[2]
    pieces = list(client.stream_chat(served.triton.grpc_url, picture, "Describe the picture.", max_tokens=TOKENS))
    text = [p["text"] for p in pieces if "finish_reason" not in p]
    final = pieces[-1]
    assert len(text) >= 2 and final["finish_reason"] in ("stop", "length") and final["completion_tokens"] > 0
    whole = client.chat(served.triton.grpc_url, picture, "Describe the picture.", protocol="grpc", max_tokens=TOKENS)
    assert "".join(text).strip() == whole["text"]
    with pytest.raises(client.ServingClientError, match="image: not image bytes"):
        list(client.stream_chat(served.triton.grpc_url, b"plain text, not an image", "hi", max_tokens=TOKENS))
    # (a gRPC stream's error carries its message only, no status code; over HTTP generate_stream it is a 400)
    status, events = _generate_stream(served, {"image": "plain text, not an image", "messages": json.dumps("hi")})
    assert status == 400 and events[0]["error"].startswith("image: not image bytes")
    # The same stream as server-sent events from Triton's HTTP generate_stream endpoint (base64 image in JSON).
    body = {"image": base64.b64encode(picture).decode(), "messages": json.dumps("Describe the picture."), "max_tokens": TOKENS}
    status, events = _generate_stream(served, body)
    assert status == 200
    assert "".join(e["text"] for e in events).strip() == whole["text"] and events[-1]["finish_reason"] == final["finish_reason"]
    assert httpclient.InferenceServerClient(served.triton.http_url.removeprefix("http://")).is_server_ready()


def _generate_stream(served: Served, body: dict[str, Any], model: str = "chat_stream") -> tuple[int, list[dict[str, Any]]]:
    """Triton's HTTP generate_stream: (status, the server-sent events' JSON)."""
    request = urllib.request.Request(f"{served.triton.http_url}/v2/models/{model}/generate_stream",
                                     data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    return status, [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


# internal failures ------------------------------------------------------------------------------


def test_an_internal_failure_is_500_with_a_request_id_in_the_message_and_the_server_log(served: Served) -> None:
    """A server-side fault (here a deployment error: a model configured with a template that does not
    exist, which fails every request after the model loaded) stays HTTP 500 / gRPC INTERNAL; the client
    gets a request id and no traceback, the server log has the same id with the exception."""
    from sharegpt4v.serving.repository import ADAPTER

    http = httpclient.InferenceServerClient(served.triton.http_url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(served.triton.grpc_url)

    def load_broken(source: str) -> str:
        config = http.get_model_config(source)
        config["name"] = name = f"broken_{source}"
        config["parameters"]["template"] = {"string_value": "no-such-template"}
        config["parameters"]["weights"] = {"string_value": str(served.download / "chat" / "1" / "weights")}
        http.load_model(name, config=json.dumps(config), files={"file:1/model.py": ADAPTER.encode()})
        return name

    good = images(1)[0]
    question = json.dumps("What colour is the square?").encode()
    broken, broken_stream = load_broken("chat"), load_broken("chat_stream")  # (one tritonclient HTTP client: one thread)
    try:
        messages: dict[str, str] = {}
        for module, triton, internal in ((httpclient, http, "500"), (grpcclient, grpc, "StatusCode.INTERNAL")):
            inputs = [rows(module, "image", [good], "BYTES"), rows(module, "messages", [question], "BYTES")]
            for request_id in (f"{module.__name__}-7", ""):
                with pytest.raises(InferenceServerException) as err:
                    triton.infer(broken, inputs, request_id=request_id)
                assert err.value.status() == internal, err.value
                messages[request_id or module.__name__] = err.value.message()
        ids = {}
        for key, message in messages.items():
            match = re.fullmatch(r"internal error \(request id (\S+)\); see the server log", message)
            assert match, message  # the id, and nothing of the exception
            ids[key] = match.group(1)
        assert ids["tritonclient.http-7"] == "tritonclient.http-7" and ids["tritonclient.grpc-7"] == "tritonclient.grpc-7"
        assert len(ids["tritonclient.http"]) == 12 and len(set(ids.values())) == 4  # none sent: a new one each
        # The decoupled model: the error is the stream's final response, over gRPC and HTTP.
        with pytest.raises(client.ServingClientError, match=r"internal error \(request id \w+\); see the server log"):
            list(client.stream_chat(served.triton.grpc_url, good, "hi", model=broken_stream, max_tokens=TOKENS))
        # (Triton 2.51's HTTP generate_stream answers any error from the model with 400: only the message tells)
        status, events = _generate_stream(served, {"image": B64(good).decode(), "messages": json.dumps("hi")}, broken_stream)
        assert status != 200 and re.fullmatch(r"internal error \(request id \w+\); see the server log", events[0]["error"])
        log = served.triton.log_tail(400_000)
        for request_id in ids.values():
            assert f"internal error (request id {request_id}): ValueError: template: unknown 'no-such-template'" in log
        assert "Traceback (most recent call last)" in log
    finally:
        for name in (broken, broken_stream):
            http.unload_model(name)
    # the served models were not disturbed
    inputs = [rows(grpcclient, "image", [good], "BYTES"), rows(grpcclient, "messages", [question], "BYTES"),
              rows(grpcclient, "max_tokens", [TOKENS], "INT32")]
    assert grpc.infer("chat", inputs).as_numpy("text")[0, 0]


def test_a_model_that_cannot_load_fails_the_start_with_the_reason(tmp_path: Path) -> None:
    from sharegpt4v.serving.repository import ADAPTER, model_configs
    from sharegpt4v.serving.triton import TritonError

    repo = tmp_path / "repo"
    (repo / "captioner" / "1").mkdir(parents=True)
    (repo / "captioner" / "config.pbtxt").write_text(model_configs(recipe(), ["captioner"], kind="KIND_CPU")["captioner"])
    (repo / "captioner" / "1" / "model.py").write_text(ADAPTER)  # but no weights/
    with pytest.raises(TritonError) as err:
        start_triton(repo, tmp_path / "work", timeout=120)
    first_line = str(err.value).splitlines()[0]
    assert "tritonserver exited" in first_line and "captioner" in first_line and "weights: no such folder" in first_line
    assert "log tail:" in str(err.value)

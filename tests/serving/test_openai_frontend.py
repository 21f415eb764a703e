"""The OpenAI API in front of the real Triton, called with the official `openai` client.

Once per module: a tiny captioner is trained for a few steps on brief captions (so that it ends its
answers, as a real captioner does), exported as the repository's `chat` and `captioner`, served by
`tritonserver` from the nvidia-pytriton wheel, and `sharegpt4v serve openai` (the CLI, as the
InferenceService's transformer runs it) is started in front of it, allowed to fetch images from a
prefix of the test S3 server and from a local HTTP server. Every answer is checked against what
Triton itself answers for the same image and prompt (greedy), so nothing is taken on trust.

The README's snippet (the `openai` client call) and its next-round teacher command are run from the
README's own text.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from sharegpt4v import services, storage
from sharegpt4v.captioning.job import iter_caption_records
from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
from sharegpt4v.config import WorldConfig, load_recipe
from sharegpt4v.data.shards import open_dataset, sample_image, sample_meta
from sharegpt4v.serving import client
from sharegpt4v.serving.export import export_model_repository
from sharegpt4v.serving.image_fetch import BLANK_RGB, blank_image_base64, url_allowed
from sharegpt4v.serving.openai_frontend import create_app
from sharegpt4v.serving.triton import LocalTriton, start_triton
from sharegpt4v.training.data import StageInputs
from sharegpt4v.training.run import launch
from sharegpt4v.world.generate import generate_world
from tests.conftest import TEST_BUCKET
from tests.json_http import JsonHandler
from tests.modeling.fixtures import world

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TOKENS = 8
CHAT, CAPTIONER = "sharegpt4v-chat", "sharegpt4v-captioner"
QUESTION = "Describe the picture."


class Images(http.server.ThreadingHTTPServer):
    """A local web server with a few image URLs: /ok/... (allow-listed), a redirect, a private one."""

    def __init__(self, picture: bytes):
        routes = {"/ok/picture.png": (200, {"Content-Type": "image/png"}, picture),
                  "/ok/moved.png": (302, {"Location": "/private/picture.png"}, b""),
                  "/ok/missing.png": (404, {}, b"not found"),
                  "/private/picture.png": (200, {"Content-Type": "image/png"}, picture)}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, headers, body = routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@dataclass
class Served:
    triton: LocalTriton
    base_url: str  # the OpenAI API: <base_url>/v1
    images: Images
    s3_ok: str  # an allow-listed S3 prefix
    teacher_world: str
    log: Path

    def openai(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="any-key", max_retries=0, timeout=120, **kw)


def _train_captioner(root: Path) -> str:
    """A captioner trained for 30 steps on brief captions (~30 s): its answers end with a stop."""
    generate_world(str(root / "world"), 64, 0, WorldConfig(samples_per_shard=16), progress=False)
    recipe = load_recipe("tiny", ["captioner.max_steps=30", "captioner.mix.vqa=0", "captioner.mix.captions=1",
                                  "captioner.caption_field=brief_caption"])
    return launch("captioner", recipe, StageInputs([str(root / "world")], split="train"), str(root / "captioner")).checkpoint_uri


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve openai exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"serve openai not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(s3_server: services.LocalS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("openai")
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_server.env.items():
            env.setenv(key, value)
        env.setenv("SHAREGPT4V_CACHE", str(tmp / "cache"))
        checkpoint = _train_captioner(tmp)
        export = export_model_repository({"chat": checkpoint, "captioner": checkpoint}, str(tmp / "repo"),
                                         load_recipe("tiny"), kind="KIND_CPU", tag_versions=False)
        teacher_world = str(tmp / "round-2")
        generate_world(teacher_world, 6, 7, WorldConfig(samples_per_shard=3), progress=False)  # images never seen
        images = Images(world(3)[2].image)
        s3_ok = f"s3://{TEST_BUCKET}/openai-{uuid.uuid4().hex[:8]}/ok"
        port, log = services.free_port(), tmp / "serve-openai.log"
        with start_triton(export["uri"], tmp / "work") as triton, open(log, "wb") as sink:
            # The README's command line (tests below run its other entry points from its text).
            command = [sys.executable, "-m", "sharegpt4v", "serve", "openai", "--triton-url", triton.http_url,
                       "--port", str(port), "--fetch-allow", f"{s3_ok}/", "--fetch-allow", f"{images.url}/ok/"]
            proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                    env={**os.environ})
            try:
                base_url = f"http://127.0.0.1:{port}"
                _wait_ready(base_url, proc, log)
                yield Served(triton, base_url, images, s3_ok, teacher_world, log)
            finally:
                services.stop_process_group(proc)
                images.shutdown()


def data_url(image: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


def user(text: str | None, image_url: str | None = None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    if image_url is not None:
        parts.append({"type": "image_url", "image_url": {"url": image_url}})
    if text is not None:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def picture(i: int = 0) -> bytes:
    return world(3)[i].image


# models, answers, usage ------------------------------------------------------------------------


def test_both_models_are_listed_and_an_unknown_one_is_404(served: Served) -> None:
    api = served.openai()
    assert sorted(m.id for m in api.models.list()) == [CAPTIONER, CHAT]
    assert api.models.retrieve(CHAT).owned_by == "sharegpt4v"
    with pytest.raises(openai.NotFoundError) as err:
        api.models.retrieve("gpt-4o")
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"


def test_chat_about_an_image_is_tritons_answer_with_usage(served: Served) -> None:
    answer = served.openai().chat.completions.create(
        model=CHAT, messages=[user(QUESTION, data_url(picture()))], max_tokens=TOKENS, temperature=0)
    triton = client.chat(served.triton.http_url, picture(), QUESTION, max_tokens=TOKENS, temperature=0.0)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == CHAT and answer.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == triton["text"] and triton["text"]
    assert choice.finish_reason == triton["finish_reason"] in ("stop", "length")
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (triton["prompt_tokens"], triton["completion_tokens"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and 0 < usage.completion_tokens <= TOKENS
    # Just an image: the models' trained instruction asks for a description.
    answer = served.openai().chat.completions.create(model=CHAT, messages=[user(None, data_url(picture()))],
                                                     max_tokens=TOKENS)
    assert answer.choices[0].message.content == client.chat(served.triton.http_url, picture(), CAPTION_INSTRUCTION,
                                                            max_tokens=TOKENS)["text"]


def test_text_only_chat_is_asked_about_a_blank_image(served: Served) -> None:
    from sharegpt4v.modeling.images import CLIP_MEAN

    assert BLANK_RGB == tuple(round(m * 255) for m in CLIP_MEAN)  # the mean colour: zero after normalisation
    answer = served.openai().chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "What is in the picture?"}], max_tokens=TOKENS)
    blank = base64.b64decode(blank_image_base64())
    triton = client.chat(served.triton.http_url, blank, "What is in the picture?", max_tokens=TOKENS)
    assert answer.choices[0].message.content == triton["text"] and answer.usage.prompt_tokens == triton["prompt_tokens"]


def test_a_multi_turn_chat_with_a_system_message(served: Served) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, user("What shapes are there?", data_url(picture(1))),
                {"role": "assistant", "content": "A few shapes."}, {"role": "user", "content": "Which colours?"}]
    answer = served.openai().chat.completions.create(model=CHAT, messages=messages, max_tokens=TOKENS)  # type: ignore[arg-type]
    turns = [{"role": "user", "content": "Answer briefly.\n\nWhat shapes are there?"},
             {"role": "assistant", "content": "A few shapes."}, {"role": "user", "content": "Which colours?"}]
    assert answer.choices[0].message.content == client.chat(served.triton.http_url, picture(1), turns,
                                                            max_tokens=TOKENS)["text"]


def test_the_captioner_captions_with_its_own_instruction(served: Served) -> None:
    api = served.openai()
    triton = client.caption(served.triton.http_url, picture(2))
    for text in (None, "", "Describe this image in great detail, every object and its position."):
        answer = api.chat.completions.create(model=CAPTIONER, messages=[user(text, data_url(picture(2)))])
        assert answer.choices[0].message.content == triton["text"] and answer.choices[0].finish_reason == "stop"
        assert answer.usage.prompt_tokens == triton["prompt_tokens"]
    chunks = list(api.chat.completions.create(model=CAPTIONER, messages=[user(None, data_url(picture(2)))], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == triton["text"]  # one chunk: no streaming twin
    assert chunks[-1].choices[0].finish_reason == "stop"


# streaming --------------------------------------------------------------------------------------


def test_streamed_tokens_add_up_to_the_answer_and_the_usage(served: Served) -> None:
    api = served.openai()
    messages = [user(QUESTION, data_url(picture()))]
    whole = api.chat.completions.create(model=CHAT, messages=messages, max_tokens=TOKENS)
    stream = api.chat.completions.create(model=CHAT, messages=messages, max_tokens=TOKENS, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # token by token from chat_stream, not one piece
    assert "".join(pieces).strip() == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # The wire format: server-sent events ending with [DONE].
    body = json.dumps({"model": CHAT, "messages": messages, "max_tokens": 3, "stream": True}).encode()
    request = urllib.request.Request(f"{served.base_url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


# bad requests -----------------------------------------------------------------------------------

NOT_AN_IMAGE = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
UNDECODABLE = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()

BAD_REQUESTS: list[tuple[str, dict[str, Any], str, str | None]] = [
    ("non-image data URL", {"messages": [user("hi", NOT_AN_IMAGE)]}, "is not an image", "messages[0].content[0].image_url"),
    ("undecodable image", {"messages": [user("hi", UNDECODABLE)]}, "image: base64 text decodes to bytes that are not a "
                                                                    "decodable image", "messages[0].content[0].image_url"),
    ("captioner without image", {"model": CAPTIONER, "messages": [{"role": "user", "content": "describe it"}]},
     "captions an image", "messages"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens: 0 is out of range (1..128)", "max_tokens"),
    ("max_tokens over the limit", {"max_completion_tokens": 1000}, "max_completion_tokens: 1000 is out of range",
     "max_completion_tokens"),
    ("temperature", {"temperature": 2.5}, "temperature: 2.5 is out of range", "temperature"),
    ("two images", {"messages": [user("hi", data_url(picture())), user("and?", data_url(picture(1)))]},
     "one image per conversation", "messages[1].content[0].image_url"),
    ("n=2", {"n": 2}, "n: not supported", "n"),
    ("ends with the assistant", {"messages": [user("hi", data_url(picture())), {"role": "assistant", "content": "x"}]},
     "the last message must be the user's", "messages"),
    ("tool role", {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "'tool' is not supported",
     "messages[0].role"),
    ("<image> in the text", {"messages": [user("<image> what?", data_url(picture()))]}, "must not contain <image>",
     "messages[0].content"),
    ("prompt too long", {"messages": [user("x" * 2001, data_url(picture()))]}, "2001 characters in total is over the "
                                                                             "limit of 2000", "messages"),
    ("URL off the allow-list", {"messages": [user("hi", "http://169.254.169.254/latest/meta-data")]},
     "is not on this server's fetch allow-list", "messages[0].content[0].image_url"),
    ("file URL", {"messages": [user("hi", "file:///etc/passwd")]}, "unsupported URL", "messages[0].content[0].image_url"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_are_400_with_the_reason_and_the_server_answers_after(
        served: Served, case: tuple[str, dict[str, Any], str, str | None]) -> None:
    _, change, message, param = case
    api = served.openai()
    kwargs: dict[str, Any] = {"model": CHAT, "messages": [user(QUESTION, data_url(picture()))], "max_tokens": TOKENS,
                              **change}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            result = api.chat.completions.create(**kwargs, stream=stream)
            list(result) if stream else None
        error = err.value.body
        assert err.value.status_code == 400 and message in error["message"], error
        assert error["type"] == "invalid_request_error" and error["param"] == param
    assert api.chat.completions.create(model=CHAT, messages=[user("Hi", data_url(picture()))], max_tokens=2).choices


def test_an_unknown_model_is_404_and_a_bad_body_is_400(served: Served) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        served.openai().chat.completions.create(model="gpt-4o", messages=[user("hi", data_url(picture()))])
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    for body in (b"{not json", b"[1, 2]", json.dumps({"messages": []}).encode()):
        request = urllib.request.Request(f"{served.base_url}/v1/chat/completions", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(request, timeout=30)
        assert http.value.code == 400 and json.loads(http.value.read())["error"]["type"] == "invalid_request_error"


# image URLs -------------------------------------------------------------------------------------


def test_allow_listed_s3_and_http_images_are_fetched_and_nothing_else(served: Served) -> None:
    api = served.openai()
    expected = api.chat.completions.create(model=CHAT, messages=[user(QUESTION, data_url(picture(2)))],
                                           max_tokens=TOKENS).choices[0].message.content
    storage.open_store(served.s3_ok).put_bytes("picture.png", picture(2))
    for url in (f"{served.s3_ok}/picture.png", f"{served.images.url}/ok/picture.png"):
        answer = api.chat.completions.create(model=CHAT, messages=[user(QUESTION, url)], max_tokens=TOKENS)
        assert answer.choices[0].message.content == expected, url
    refused = {
        f"{served.s3_ok}/missing.png": "no such object",
        f"{served.s3_ok}-other/picture.png": "not on this server's fetch allow-list",  # a prefix is not a name prefix
        f"{served.s3_ok}/../picture.png": "not on this server's fetch allow-list",
        f"{served.images.url}/private/picture.png": "not on this server's fetch allow-list",
        f"{served.images.url}/ok/moved.png": "answered HTTP 302 (redirects are not followed)",
        f"{served.images.url}/ok/missing.png": "answered HTTP 404",
        f"{served.images.url}.evil.example/ok/picture.png": "not on this server's fetch allow-list",
    }
    for url, message in refused.items():
        with pytest.raises(openai.BadRequestError) as err:
            api.chat.completions.create(model=CHAT, messages=[user(QUESTION, url)], max_tokens=TOKENS)
        assert message in err.value.body["message"], (url, err.value.body)


def test_url_allow_list_matching() -> None:
    allow = ("s3://bucket/images/", "https://cdn.example.com/public/", "http://10.0.0.1:8080")
    assert url_allowed("s3://bucket/images/a/b.png", allow) and url_allowed("https://CDN.example.com/public/x.png", allow)
    assert url_allowed("http://10.0.0.1:8080/any.png", allow)
    for url in ("s3://bucket/images-private/a.png", "s3://bucket/images/../secret.png", "s3://bucket/images/%2e%2e/x",
                "https://cdn.example.com.evil.io/public/x.png", "https://user@cdn.example.com/public/x.png",
                "http://cdn.example.com/public/x.png", "http://10.0.0.1/any.png", "http://10.0.0.1:80801/x"):
        assert not url_allowed(url, allow), url


# errors of the server side ----------------------------------------------------------------------


class FakeTriton(http.server.ThreadingHTTPServer):
    """Answers a model config, then fails every inference as Triton's adapter does (500 with the request id)."""

    def __init__(self) -> None:
        seen: list[str] = []
        self.seen = seen

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                if self.path == "/v2/models/chat/config":
                    self._reply(200, {"name": "chat", "parameters": {"task": {"string_value": "chat"}}})
                else:
                    self._reply(400, {"error": f"Request for unknown model: '{self.path}' is not found"})

            def do_POST(self) -> None:
                request_id = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["id"]
                seen.append(request_id)
                self._reply(500, {"error": f"internal error (request id {request_id}); see the server log"})

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_triton_failure_is_500_with_the_request_id_and_an_unreachable_triton_503() -> None:
    from starlette.testclient import TestClient

    fake = FakeTriton()
    try:
        body = {"model": CHAT, "messages": [user("hi", data_url(picture()))]}
        with TestClient(create_app(f"127.0.0.1:{fake.server_address[1]}")) as http:
            response = http.post("/v1/chat/completions", json=body)
            error = response.json()["error"]
            assert response.status_code == 500 and error["type"] == "server_error"
            assert len(fake.seen) == 1  # the id Triton got is the one its log and the message carry
            assert error["message"] == f"{CHAT}: internal error (request id {fake.seen[0]}); see the server log"
            assert response.headers["x-request-id"] == fake.seen[0]
            response = http.post("/v1/chat/completions", json={**body, "model": CAPTIONER})
            assert response.status_code == 503 and "does not serve model 'captioner'" in response.json()["error"]["message"]
    finally:
        fake.shutdown()
    with TestClient(create_app(f"127.0.0.1:{services.free_port()}")) as http:
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 503 and "cannot be reached" in response.json()["error"]["message"]
        assert http.get("/ready").status_code == 503 and http.get("/health").status_code == 200


def test_an_api_key_when_one_is_configured() -> None:
    from starlette.testclient import TestClient

    with TestClient(create_app("127.0.0.1:9", api_key="s3cret")) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# V2 clients at the same address -----------------------------------------------------------------


def test_v2_requests_pass_through_to_triton(served: Served) -> None:
    direct = client.caption(served.triton.http_url, picture(1), max_tokens=TOKENS)
    assert client.caption(served.base_url, picture(1), max_tokens=TOKENS) == direct  # tritonclient, binary outputs
    with pytest.raises(client.ServingClientError, match="image: not image bytes"):
        client.caption(served.base_url, b"plain text, not an image")


# the README's entry points ----------------------------------------------------------------------


def _readme_serving() -> str:
    text = README.read_text()
    return text[text.index("## Serving (Triton, KServe)"):text.index("## Deploying to a cluster")]


def test_the_readme_openai_client_snippet_runs(served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    snippet = re.search(r"```python\n(.*?)```", _readme_serving(), re.DOTALL)
    assert snippet is not None and "openai.OpenAI(" in snippet[1]
    code = snippet[1].replace("http://127.0.0.1:8080/v1", f"{served.base_url}/v1")
    (tmp_path / "scene.png").write_bytes(picture())
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    expected = client.chat(served.triton.http_url, picture(), "What is left of the red circle?", max_tokens=32)
    assert printed.startswith(expected["text"]) and printed.split()[-1] == str(
        expected["prompt_tokens"] + expected["completion_tokens"])


def _teacher_command() -> tuple[dict[str, str], list[str]]:
    """The README's next-round teacher command: (its environment assignments, its arguments after `sharegpt4v`)."""
    block = re.search(r"```bash\n(OPENAI_BASE_URL=.*?)```", _readme_serving(), re.DOTALL)
    assert block is not None, "the README shows the next-round teacher command"
    words = shlex.split(block[1].replace("\\\n", " "))
    env = dict(w.split("=", 1) for w in words[:words.index("sharegpt4v")])
    return env, words[words.index("sharegpt4v") + 1:]


def _inferences(served: Served, model: str) -> int:
    with urllib.request.urlopen(f"{served.triton.http_url}/v2/models/{model}/stats", timeout=10) as response:
        return int(json.loads(response.read())["model_stats"][0]["inference_count"])


def test_the_served_captioner_is_the_teacher_of_the_next_round(served: Served, tmp_path: Path) -> None:
    """`caption teacher` (the README's command) pointed at the captioner's OpenAI route: every image
    of a new world gets exactly one record, with the served captioner's own caption."""
    readme_env, args = _teacher_command()
    assert args[:2] == ["caption", "teacher"] and f"teacher.model={CAPTIONER}" in args
    assert readme_env["OPENAI_BASE_URL"] == "http://127.0.0.1:8080/v1"
    out = str(tmp_path / "captions")
    args[args.index("--input") + 1], args[args.index("--out") + 1] = served.teacher_world, out
    env = {**os.environ, **readme_env, "OPENAI_BASE_URL": f"{served.base_url}/v1"}
    before = _inferences(served, "captioner")
    run = subprocess.run([sys.executable, "-m", "sharegpt4v", *args], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    samples = {sample_meta(s)["id"]: sample_image(s)[1] for s in open_dataset(served.teacher_world).samples()}
    records = list(iter_caption_records(out))
    assert Counter(r["id"] for r in records) == Counter(list(samples))  # every image, exactly once
    max_tokens = int(next(a for a in args if a.startswith("teacher.max_tokens=")).split("=")[1])
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) >= len(records) - 1, [r.get("detail") for r in records if r["status"] != "ok"]
    for record in records:
        expected = client.caption(served.triton.http_url, samples[record["id"]], max_tokens=max_tokens, temperature=0.0)
        if record["status"] == "ok":
            assert record["caption"] == expected["text"]
            assert record["captioner"].startswith(f"teacher:{CAPTIONER}@127.0.0.1:")
            assert (record["prompt_tokens"], record["completion_tokens"]) == (expected["prompt_tokens"],
                                                                           expected["completion_tokens"])
        else:
            assert record["reason"] and record["detail"]
    assert _inferences(served, "captioner") - before == 2 * len(samples)  # the teacher's, then the checks above
    # A rerun finds the caption set complete and asks the served captioner nothing.
    before = _inferences(served, "captioner")
    rerun = subprocess.run([sys.executable, "-m", "sharegpt4v", *args], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert _inferences(served, "captioner") == before and sorted(map(str, iter_caption_records(out))) == sorted(
        map(str, records))


def test_serve_openai_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from sharegpt4v.cli import main

    monkeypatch.delenv("SHAREGPT4V_TEST_UNSET_KEY", raising=False)
    for extra, message in ((["--fetch-allow", "ftp://host/x"], "expected s3://bucket/prefix or http(s)://"),
                           (["--fetch-allow", "http://user@host/x"], "expected s3://bucket/prefix or http(s)://"),
                           (["--model", "sharegpt4v-chat"], "expected OPENAI_ID=TRITON_MODEL"),
                           (["--api-key-env", "SHAREGPT4V_TEST_UNSET_KEY"], "is not set")):
        assert main(["serve", "openai", "--triton-url", "127.0.0.1:9", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["serve", "openai", "--triton-url", "grpc://127.0.0.1:9"]) == 2
    assert "expected http://host:port" in capsys.readouterr().err

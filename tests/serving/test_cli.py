"""`sharegpt4v serve export|local` and `sharegpt4v client caption|chat`, as a user runs them.

`serve local` runs as its own process (started, called, then stopped with Ctrl-C = SIGINT);
the client commands go to it directly over HTTP and gRPC, and through a small Host-routing
proxy standing in for a KServe ingress (which routes on the InferenceService's hostname).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sharegpt4v import storage
from sharegpt4v.cli import main
from sharegpt4v.modeling.builder import save_model
from sharegpt4v.services import free_port
from tests.modeling.fixtures import tiny_model, world

ISVC_HOST = "captioner.sharegpt4v.example.com"


@pytest.fixture
def checkpoint(s3_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SHAREGPT4V_CACHE", str(tmp_path / "cache"))
    model, processor = tiny_model()
    save_model(model, processor, f"{s3_uri}/checkpoint")
    return f"{s3_uri}/checkpoint"


@pytest.fixture
def ingress(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    """A reverse proxy that forwards only requests whose Host header names a known service."""
    routes: dict[str, str] = {}  # Host -> backend host:port

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            backend = routes.get((self.headers.get("Host") or "").split(":")[0])
            if backend is None:
                body = b'{"error": "no InferenceService for this host"}'
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            upstream = http.client.HTTPConnection(backend, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            upstream.request(self.command, self.path, body=data or None, headers=headers)
            response = upstream.getresponse()
            body = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _forward

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", routes
    server.shutdown()


def _read_lines(stream: object, lines: queue.Queue) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)


def _wait_for(lines: queue.Queue, text: str, proc: subprocess.Popen, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            assert proc.poll() is None, f"serve local exited with {proc.returncode}: {''.join(seen)}"
            continue
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"no {text!r} within {timeout}s: {''.join(seen)}")


def _closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_export_serve_local_and_client_commands(
    checkpoint: str, s3_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture, ingress: tuple[str, dict[str, str]]
) -> None:
    repo = f"{s3_uri}/model-repo"
    code = main(["serve", "export", "--model", f"captioner={checkpoint}", "--model", f"chat={checkpoint}", "--out", repo,
                 "--kind", "KIND_CPU", "--json", "serving.streaming=false"])
    exported = json.loads(capsys.readouterr().out)
    assert code == 0 and exported["uri"] == repo + "/" and set(exported["models"]) == {"captioner", "chat"}
    assert storage.open_store(repo).read_manifest()["instance_kind"] == "KIND_CPU"

    ports = {name: free_port() for name in ("http", "grpc", "metrics")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sharegpt4v", "serve", "local", "--model-repo", repo, "--http-port", str(ports["http"]),
         "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]), "--workdir", str(tmp_path / "triton")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy(),
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        ready = _wait_for(lines, "Triton ready", proc, timeout=180)[-1]
        assert f"HTTP http://127.0.0.1:{ports['http']}" in ready and "models: captioner, chat" in ready

        image = tmp_path / "scene.png"
        image.write_bytes(world(1)[0].image)
        assert main(["client", "caption", str(image), "--url", f"http://127.0.0.1:{ports['http']}", "--max-tokens", "5"]) == 0
        caption = capsys.readouterr().out.strip()
        assert caption
        assert main(["client", "chat", str(image), "What colour is the circle?", "--url", f"127.0.0.1:{ports['grpc']}",
                     "--protocol", "grpc", "--max-tokens", "5", "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["text"] and answer["finish_reason"] in ("stop", "length") and 0 < answer["completion_tokens"] <= 5

        # Through an ingress that routes on the Host header, like a KServe InferenceService URL.
        proxy, routes = ingress
        routes[ISVC_HOST] = f"127.0.0.1:{ports['http']}"
        assert main(["client", "caption", str(image), "--url", proxy, "--host", ISVC_HOST, "--max-tokens", "5"]) == 0
        assert capsys.readouterr().out.strip() == caption
        assert main(["client", "caption", str(image), "--url", proxy, "--max-tokens", "5"]) == 1
        assert "captioner:" in capsys.readouterr().err  # no Host: the ingress has no service for it

        # A bad request is one line on stderr and exit 1; the server keeps serving.
        text_file = tmp_path / "notes.txt"
        text_file.write_bytes(b"\x00\x01 not a picture")
        assert main(["client", "caption", str(text_file), "--url", f"http://127.0.0.1:{ports['http']}"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "image: bytes are not a decodable image" in err
        assert main(["client", "chat", str(image), "x", "--url", f"http://127.0.0.1:{ports['http']}",
                     "--max-tokens", "999"]) == 1
        assert "max_tokens: 999 is out of range (1..128)" in capsys.readouterr().err
        assert main(["client", "caption", str(image), "--url", f"http://127.0.0.1:{ports['http']}", "--max-tokens", "5"]) == 0
        assert capsys.readouterr().out.strip() == caption

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
        assert all(_closed(port) for port in ports.values())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_local_refuses_an_incomplete_repository(s3_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    storage.open_store(f"{s3_uri}/half").put_bytes("chat/config.pbtxt", b'name: "chat"\n')  # no manifest yet
    assert main(["serve", "local", "--model-repo", f"{s3_uri}/half", "--workdir", str(tmp_path)]) == 1
    assert "no manifest.json; the model repository is incomplete" in capsys.readouterr().err


def test_export_refuses_unknown_models_and_foreign_prefixes(
    checkpoint: str, s3_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["serve", "export", "--model", f"detector={checkpoint}", "--out", f"{s3_uri}/r"]) == 2  # usage errors
    assert "'detector' is not a served model (known: captioner, chat)" in capsys.readouterr().err
    assert main(["serve", "export", "--model", "chat", "--out", f"{s3_uri}/r"]) == 2
    assert "expected NAME=REF" in capsys.readouterr().err
    storage.open_store(f"{s3_uri}/data").put_bytes("shard-0000.tar", b"not yours")
    assert main(["serve", "export", "--model", f"chat={checkpoint}", "--out", f"{s3_uri}/data"]) == 1
    assert "holds other files (shard-0000.tar, ...)" in capsys.readouterr().err
    assert storage.open_store(f"{s3_uri}/data").exists("shard-0000.tar")  # untouched


def test_client_reports_an_unreachable_server(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "scene.png"
    image.write_bytes(world(1)[0].image)
    port = free_port()
    assert main(["client", "caption", str(image), "--url", f"http://127.0.0.1:{port}", "--timeout", "5"]) == 1
    assert "cannot reach the server" in capsys.readouterr().err
    assert main(["client", "chat", str(tmp_path / "missing.png"), "hi"]) == 1
    assert "missing.png: no such image file" in capsys.readouterr().err

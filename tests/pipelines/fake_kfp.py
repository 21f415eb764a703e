"""A small fake of the KFP v2beta1 REST API on 127.0.0.1: records every request, answers like the server.

Enough for `kfp.Client`: healthz, experiments (create, list by name), runs (create), recurring
runs (create). Bodies of POSTs are kept as parsed JSON so a test can check what was sent.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.json_http import JsonHandler


class FakeKFP:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.experiments: dict[str, dict[str, Any]] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeKFP":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def posted(self, path: str) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if r["method"] == "POST" and r["path"] == path]

    def _handler(self) -> type[JsonHandler]:
        fake = self

        class Handler(JsonHandler):

            def _record(self) -> tuple[str, dict[str, list[str]], Any]:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                fake.requests.append({"method": self.command, "path": parts.path, "query": parse_qs(parts.query),
                                      "body": body, "headers": dict(self.headers)})
                return parts.path, parse_qs(parts.query), body

            def do_GET(self) -> None:  # noqa: N802 - http.server's method name
                path, query, _ = self._record()
                if path == "/apis/v2beta1/healthz":
                    return self._reply(200, {"commit_sha": "fake", "tag_name": "2.17.0", "multi_user": False})
                if path == "/apis/v2beta1/experiments":
                    wanted = json.loads(query.get("filter", ["{}"])[0] or "{}")
                    names = [p.get("stringValue", p.get("string_value")) for p in wanted.get("predicates", [])]
                    found = [e for e in fake.experiments.values() if not names or e["display_name"] in names]
                    return self._reply(200, {"experiments": found, "total_size": len(found)} if found else {})
                return self._reply(404, {"error": f"no route {path}"})

            def do_POST(self) -> None:  # noqa: N802
                path, _, body = self._record()
                if path == "/apis/v2beta1/experiments":
                    experiment = {**body, "experiment_id": f"exp-{uuid.uuid4().hex[:8]}", "storage_state": "AVAILABLE"}
                    fake.experiments[experiment["experiment_id"]] = experiment
                    return self._reply(200, experiment)
                if path == "/apis/v2beta1/runs":
                    return self._reply(200, {**body, "run_id": f"run-{uuid.uuid4().hex[:8]}", "state": "PENDING"})
                if path == "/apis/v2beta1/recurringruns":
                    return self._reply(200, {**body, "recurring_run_id": f"rr-{uuid.uuid4().hex[:8]}",
                                             "status": "ENABLED"})
                return self._reply(404, {"error": f"no route {path}"})

        return Handler

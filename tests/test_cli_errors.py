"""Every failure of the `sharegpt4v` command is one line on stderr; every usage error exits 2.

One table of bad invocations: usage errors (argparse's own, bad argument values, malformed `models:/`
references, NAME=REF syntax) exit 2, runtime failures (a missing input, an unreachable server, a model
that is not registered) exit 1, and neither prints a traceback, a credential or leaves `./mlflow.db` /
`./mlruns` behind. The cases that involve MLflow, KFP or the process boundary itself (warnings, logging,
the exit status) run as a real `python -m sharegpt4v`; the rest call `main()` in this process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import pytest

from sharegpt4v.cli import data as data_commands
from sharegpt4v.cli import main
from tests.json_http import JsonHandler

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cret-pw"  # in URLs of some cases: must never be printed
FORMS = "expected models:/<name>@<alias> or models:/<name>/<version>"


class Case(NamedTuple):
    argv: tuple[str, ...]
    code: int  # 2: usage error, 1: failure
    needle: str  # the cause, as the one line on stderr names it
    env: dict[str, str] = {}
    sub: bool = False  # run as `python -m sharegpt4v` (else `main(argv)` in this process)


def usage(*argv: str, needle: str, sub: bool = False) -> Case:
    return Case(argv, 2, needle, sub=sub)


def failure(*argv: str, needle: str, env: dict[str, str] | None = None, sub: bool = False) -> Case:
    return Case(argv, 1, needle, env or {}, sub)


# {port}: a closed port on 127.0.0.1; {registry}: a sqlite MLflow registry holding one model, "exists",
# with no versions and no aliases.
NO_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
REGISTRY = {"MLFLOW_TRACKING_URI": "{registry}"}
EVAL = ("eval", "run", "--data", "w", "--model")
CASES: dict[str, Case] = {
    # argparse's own errors, one line
    "no-command": usage(needle="the following arguments are required"),
    "unknown-action": usage("config", "frobnicate", needle="invalid choice: 'frobnicate'"),
    "required-option-missing": usage("world", "generate", "--images", "3", needle="required: --out"),
    # counts and ranges, checked by argparse before any work
    "world-images-zero": usage("world", "generate", "--out", "w", "--images", "0",
                               needle="argument --images: must be >= 1, got 0", sub=True),
    "world-images-not-a-number": usage("world", "generate", "--out", "w", "--images", "many",
                                       needle="argument --images: expected an integer, got 'many'"),
    "world-workers-negative": usage("world", "generate", "--out", "w", "--images", "3", "--workers", "-1",
                                    needle="argument --workers: must be >= 0, got -1"),
    "demo-images-zero": usage("demo", "--images", "0", needle="argument --images: must be >= 1"),
    "pipeline-run-shard-groups-zero": usage("pipeline", "run", "--local", "--shard-groups", "0",
                                            needle="argument --shard-groups: must be >= 1"),
    "ablation-lanes-zero": usage("experiment", "ablation", "--lanes", "0", needle="argument --lanes: must be >= 1"),
    "caption-num-workers-zero": usage("caption", "run", "--input", "in", "--out", "o", "--model", "m",
                                      "--num-workers", "0", needle="argument --num-workers: must be >= 1"),
    "client-max-tokens-zero": usage("client", "caption", "img.png", "--max-tokens", "0",
                                    needle="argument --max-tokens: must be >= 1"),
    "serve-local-port-range": usage("serve", "local", "--model-repo", "r", "--http-port", "70000",
                                    needle="a TCP port is 1..65535, got 70000"),
    "teacher-sim-port-range": usage("teacher-sim", "serve", "--world", "w", "--port", "-3",
                                    needle="argument --port: must be >= 1"),
    "deploy-apply-timeout-zero": usage("deploy", "apply", "--model", "chat", "--timeout", "0",
                                       needle="argument --timeout: must be > 0"),
    # argument values the commands check before any work (UsageError)
    "ablation-unknown-arm": usage("experiment", "ablation", "--arms", "A,Z", needle="unknown arm(s) ['Z']"),
    "ablation-seeds-not-integers": usage("experiment", "ablation", "--seeds", "0,x",
                                         needle="--seeds: comma-separated integers"),
    "ablation-world-too-small": usage("experiment", "ablation", "--images", "5", needle="at least 10 images"),
    "caption-worker-outside-range": usage("caption", "teacher", "--input", "in", "--out", "o", "--worker", "2",
                                          "--num-workers", "2", needle="--worker 2: outside 0..1"),
    "caption-negative-budget": usage("caption", "teacher", "--input", "in", "--out", "o", "--budget-usd", "-1",
                                     needle="--budget-usd: must be >= 0"),
    "caption-report-records-syntax": usage("caption", "report", "--records", "x", "--out", "r",
                                           needle="--records 'x': expected NAME=URI"),
    "caption-report-nothing": usage("caption", "report", "--out", "r", needle="nothing to report"),
    "caption-report-world-captions-without-input": usage("caption", "report", "--world-captions", "--out", "r",
                                                         needle="--world-captions needs --input"),
    "eval-unknown-benchmark": usage(*EVAL, "ckpt", "--out", "o", "--benchmark", "bogus=dir",
                                    needle="--benchmark: unknown benchmark 'bogus'", sub=True),
    "eval-benchmark-syntax": usage(*EVAL, "ckpt", "--out", "o", "--benchmark", "mme",
                                   needle="--benchmark 'mme': expected NAME=PATH"),
    "eval-unknown-benchmark-in-list": usage(*EVAL, "ckpt", "--out", "o", "--benchmarks",
                                            "mme,nope", needle="--benchmarks: unknown benchmark 'nope'"),
    "eval-without-a-data-source": usage("eval", "run", "--model", "ckpt", "--out", "o",
                                        needle="world-vqa needs --data"),
    "eval-without-a-benchmark-folder": usage("eval", "run", "--model", "ckpt", "--out", "o", "--benchmarks", "mme",
                                             needle="mme needs --benchmark mme=PATH"),
    "eval-promote-needs-a-registered-model": usage(*EVAL, "ckpt", "--out", "o", "--promote",
                                                   needle="--promote needs --model models:/"),
    "eval-score-unknown-benchmark": usage("eval", "score", "--benchmark", "nope", "--answers", "a.jsonl",
                                          needle="--benchmark: unknown benchmark 'nope'"),
    "models-ref-without-alias-or-version": usage(*EVAL, "models:/foo", "--out", "o",
                                                 needle=f"models:/foo: not a registered model reference; {FORMS}",
                                                 sub=True),
    "models-ref-empty": usage(*EVAL, "models:/", "--out", "o", needle="models:/: not a registered model reference"),
    "models-ref-too-deep": usage(*EVAL, "models:/a/b/c", "--out", "o", needle=FORMS),
    "models-ref-empty-alias": usage(*EVAL, "models:/chat@", "--out", "o", needle=FORMS),
    "models-ref-version-not-a-number": usage("serve", "vllm", "--model", "models:/chat/v1", needle=FORMS),
    "serve-export-ref-syntax": usage("serve", "export", "--model", "chat", "--out", "o",
                                     needle="--model 'chat': expected NAME=REF"),
    "serve-export-unknown-model": usage("serve", "export", "--model", "detector=ckpt", "--out", "o",
                                        needle="'detector' is not a served model"),
    "serve-export-malformed-ref": usage("serve", "export", "--model", "chat=models:/foo", "--out", "o",
                                        needle=FORMS, sub=True),
    "train-trainjob-without-image": usage("train", "sft", "--data", "x", "--out", "y", "--trainjob",
                                          needle="--trainjob needs --image"),
    "pipeline-param-syntax": usage("pipeline", "submit", "--host", "http://127.0.0.1:{port}", "--param", "novalue",
                                   needle="--param 'novalue': expected NAME=VALUE"),
    "pipeline-unknown-pipeline": usage("pipeline", "submit", "--host", "http://127.0.0.1:{port}", "--pipeline",
                                       "nope", needle="no compiled pipeline 'nope'"),
    "pipeline-cron-fields": usage("pipeline", "submit", "--host", "http://127.0.0.1:{port}", "--recurring",
                                  "0 3 * * *", needle="expected a 6-field cron expression"),
    "teacher-sim-unknown-fault": usage("teacher-sim", "serve", "--world", "w", "--fault-kinds", "boom",
                                       needle="unknown fault kind(s) ['boom']"),
    "teacher-sim-fault-rate": usage("teacher-sim", "serve", "--world", "w", "--fault-rate", "2",
                                    needle="fault rate must be within [0, 1]"),
    "deploy-storage-uri-syntax": usage("deploy", "render", "--storage-uri", "chat",
                                       needle="--storage-uri 'chat': expected MODEL=s3://"),
    "deploy-storage-uri-unknown-model": usage("deploy", "render", "--storage-uri", "detector=s3://b/d",
                                              needle="not a served model"),
    "client-stream-needs-grpc": usage("client", "chat", "img.png", "hi", "--stream",
                                      needle="token streaming uses gRPC"),
    # recipe errors (ConfigError) exit 2 too
    "recipe-unknown-key": usage("config", "show", "world.bogus=1", needle="config key 'world.bogus'"),
    "recipe-unknown-profile": usage("config", "show", "--profile", "nope", needle="profile 'nope' not found"),
    # runtime failures: exit 1
    "models-ref-without-tracking-uri": failure(*EVAL, "models:/sharegpt4v-chat@champion", "--out",
                                               "o", needle="set MLFLOW_TRACKING_URI", sub=True),
    "serve-export-without-tracking-uri": failure("serve", "export", "--model", "chat=models:/sharegpt4v-chat/3",
                                                 "--out", "o", needle="set MLFLOW_TRACKING_URI", sub=True),
    "models-ref-not-registered": failure(*EVAL, "models:/nosuch@champion", "--out", "o",
                                         env=REGISTRY, needle="models:/nosuch@champion: not in the MLflow registry",
                                         sub=True),
    "models-ref-alias-not-set": failure("serve", "export", "--model", "chat=models:/exists@champion", "--out", "o",
                                        env=REGISTRY, needle="alias champion not found", sub=True),
    "models-ref-no-such-version": failure(*EVAL, "models:/exists/7", "--out", "o", env=REGISTRY,
                                          needle="Model Version (name=exists, version=7) not found", sub=True),
    "mlflow-server-unreachable": failure(*EVAL, "models:/chat@champion", "--out", "o",
                                         env={"MLFLOW_TRACKING_URI": f"http://mlflow-user:{SECRET}@127.0.0.1:{{port}}",
                                              **NO_RETRIES},
                                         needle="cannot reach the MLflow server at http://127.0.0.1:{port}: "
                                                "Connection refused", sub=True),
    "kfp-unreachable": failure("pipeline", "submit", "--host", f"http://kfp-admin:{SECRET}@127.0.0.1:{{port}}",
                               needle="cannot reach the Kubeflow Pipelines API at http://127.0.0.1:{port}: "
                                      "Connection refused", sub=True),
    "ingest-missing-folder": failure("data", "ingest", "--from", "nowhere", "--out", "o",
                                     needle="nowhere: not a readable folder", sub=True),
    "inspect-missing-dataset": failure("data", "inspect", "nowhere", needle="nowhere: no manifest.json"),
    "caption-import-missing-json": failure("caption", "import", "--from", "missing.json", "--out", "o",
                                           needle="missing.json: no such file"),
    "client-missing-image": failure("client", "caption", "missing.png", needle="missing.png: no such image file"),
    "deploy-check-not-manifests": failure("deploy", "render", "--check", "--manifests", ".",
                                          needle="not the manifests/ folder"),
}


@pytest.fixture(scope="module")
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: connections are refused


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_registered_model("exists")
    return uri


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "SHAREGPT4V_DEBUG"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _run(case: Case, values: dict[str, str], cwd: Path, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture) -> tuple[int, str]:
    argv = [arg.format(**values) for arg in case.argv]
    env = {k: v.format(**values) for k, v in case.env.items()}
    if case.sub:
        result = subprocess.run([sys.executable, "-m", "sharegpt4v", *argv], cwd=cwd, env=_clean_env(env),
                                capture_output=True, text=True, timeout=180)
        return result.returncode, result.stderr
    monkeypatch.chdir(cwd)
    for key in [k for k in os.environ if k.startswith("MLFLOW_")] + ["SHAREGPT4V_DEBUG"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_invocation_is_one_line_and_the_right_exit_code(
    name: str, tmp_path: Path, closed_port: int, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    case = CASES[name]
    values = {"port": str(closed_port)}
    if "{registry}" in str(case.env):
        values["registry"] = request.getfixturevalue("registry")
    code, err = _run(case, values, tmp_path, monkeypatch, capsys)
    assert err.count("\n") == 1 and err.endswith("\n") and err.strip(), f"not one line:\n{err}"
    assert case.needle.format(**values) in err, err
    assert "Traceback" not in err and SECRET not in err, err
    assert code == case.code, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_the_table_covers_enough_invocations() -> None:
    assert len(CASES) >= 25
    assert sum(c.sub for c in CASES.values()) >= 5
    assert {c.code for c in CASES.values()} == {1, 2}


def test_an_unexpected_error_is_one_line_naming_its_type(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    class ThirdPartyError(Exception):
        pass

    def explode(args: object) -> int:
        raise ThirdPartyError(f"handshake with https://user:{SECRET}@store.example/x failed\nsecond line\nthird")

    monkeypatch.delenv("SHAREGPT4V_DEBUG", raising=False)
    monkeypatch.setattr(data_commands, "cmd_config_show", explode)
    assert main(["config", "show"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "ThirdPartyError: handshake with https://store.example/x failed" in err and SECRET not in err
    assert "SHAREGPT4V_DEBUG=1" in err

    monkeypatch.setenv("SHAREGPT4V_DEBUG", "1")  # developers get the exception itself
    with pytest.raises(ThirdPartyError):
        main(["config", "show"])


def test_a_kfp_api_that_refuses_is_one_line(capsys: pytest.CaptureFixture) -> None:
    class Refusing(JsonHandler):
        def do_GET(self) -> None:
            if self.path.endswith("/healthz"):
                self._reply(200, {"multi_user": False})
            else:
                self._reply(403, {"error_message": "user alice may not create runs\ndetails...", "code": 7})

        do_POST = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"http://alice:{SECRET}@127.0.0.1:{server.server_port}"
        assert main(["pipeline", "submit", "--host", host]) == 1
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and SECRET not in err, err
    assert f"Pipelines API at http://127.0.0.1:{server.server_port} answered HTTP 403 Forbidden: user alice" in err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sharegpt4v", "data", "inspect", "nowhere"], cwd=tmp_path,
                            env=_clean_env({"SHAREGPT4V_DEBUG": "1"}), capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "nowhere: no manifest.json" in result.stderr

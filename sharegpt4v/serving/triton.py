"""The real Triton Inference Server, run locally from the `nvidia-pytriton` wheel (CPU, loopback).

The wheel ships a complete Triton server: the `tritonserver` binary, the Python backend and
per-Python-version stubs, with their shared libraries in `nvidia_pytriton.libs/`. To serve a
model repository with it (TOOLCHAIN.md):

1. the wheel's `tritonserver/` folder is copied once into the cache, with the stub for this
   Python version put into `backends/python/`;
2. `LD_LIBRARY_PATH` names the wheel's libraries and this Python's `libpython`;
3. `PATH` starts with this environment's `bin/`: the stub imports packages (numpy<2, torch, the
   platform) from the first `python3` on PATH;
4. `tritonserver --model-repository=...` on loopback ports.

An `s3://` repository is downloaded first (every file checked against the manifest written
last by the exporter), like KServe's storage initializer does into `/mnt/models`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharegpt4v.errors import PlatformError
from sharegpt4v.services import free_port, stop_process_group

LOOPBACK = "127.0.0.1"


class TritonError(PlatformError):
    """The local Triton server cannot start or serve the repository."""


def _wheel_dirs() -> tuple[Path, Path]:
    """(the wheel's tritonserver/ folder, its bundled shared libraries)."""
    try:
        import pytriton
    except ImportError:
        raise TritonError("nvidia-pytriton is not installed: it carries the Triton server binary") from None
    package = Path(pytriton.__file__).resolve().parent
    server, libs = package / "tritonserver", package.parent / "nvidia_pytriton.libs"
    if not (server / "bin" / "tritonserver").is_file():
        raise TritonError(f"{server}: no bin/tritonserver in the nvidia-pytriton wheel")
    return server, libs


def server_dir() -> Path:
    """A writable copy of the wheel's server with this Python's backend stub (made once, cached)."""
    from sharegpt4v.modeling.builder import cache_root

    source, _ = _wheel_dirs()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonError(f"the nvidia-pytriton wheel has no Python-backend stub for Python {python}")
    try:
        from importlib.metadata import version

        tag = version("nvidia-pytriton")
    except Exception:
        tag = "unknown"
    target = cache_root() / f"tritonserver-{tag}-py{python}"
    if (target / "backends" / "python" / "triton_python_backend_stub").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        shutil.copy2(stub, tmp / "backends" / "python" / "triton_python_backend_stub")
        try:
            os.replace(tmp, target)
        except OSError:  # another process made the same copy first
            if not (target / "backends" / "python" / "triton_python_backend_stub").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver and its Python stubs need."""
    env = dict(os.environ if base is None else base)
    _, libs = _wheel_dirs()
    libdirs = [str(libs), sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")]
    if env.get("LD_LIBRARY_PATH"):
        libdirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs)
    # The stub runs the first `python3` on PATH: this environment's, with the platform installed.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def fetch_repository(uri: str, dest: str | Path) -> Path:
    """A local copy of a model repository: an `s3://` prefix is downloaded (checked against its
    manifest); a local folder is used in place."""
    from sharegpt4v.storage import IncompleteFolder, is_s3, open_store

    if not is_s3(uri):
        folder = Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser().resolve()
        if not folder.is_dir():
            raise TritonError(f"{uri}: no such model repository folder")
        return folder
    store = open_store(uri)
    try:
        manifest = store.read_manifest()
    except IncompleteFolder:
        raise TritonError(f"{uri}: no manifest.json; the model repository is incomplete or still being written") from None
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    for entry in manifest.get("files", []):
        store.get_file(entry["path"], dest / entry["path"])
    (dest / "manifest.json").write_bytes(store.get_bytes("manifest.json"))
    problems = open_store(str(dest)).verify_folder()
    if problems:
        raise TritonError(f"{uri}: downloaded files do not match the manifest: {'; '.join(problems[:5])}")
    return dest


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _first_failure(triton: "LocalTriton") -> str:
    """`: <why>` from the first model that failed to load, as Triton logged it (one line for the CLI)."""
    for line in triton.log_tail(200_000).splitlines():
        if "failed to load" in line or "Invalid argument" in line:
            return ": " + line.split('"', 1)[-1].rstrip('"').split("\\n")[0][:400]  # Triton escapes newlines
    return ""


@dataclass
class LocalTriton:
    """A running tritonserver. Use as a context manager, or call `stop()`."""

    repository: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    log: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def is_ready(self) -> bool:
        return self.process.poll() is None and _ready(self.http_url)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM to the server's process group (Triton unloads its models, the stubs exit), then SIGKILL."""
        proc = self.process
        stop_process_group(proc, timeout)
        # Python-backend stubs share the group; make sure none outlives the server.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode

    def __enter__(self) -> "LocalTriton":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_triton(
    model_repo: str | Path,
    workdir: str | Path,
    http_port: int | None = None,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    timeout: float = 180,
    log_verbose: int = 0,
    extra_args: list[str] | tuple[str, ...] = (),
) -> LocalTriton:
    """Serve a model repository (local folder or `s3://` prefix) with the real Triton on loopback.

    Returns once `/v2/health/ready` answers 200 (every model loaded); raises `TritonError` with
    the server's log tail if it exits or does not become ready within `timeout` seconds.
    `extra_args` go to `tritonserver` as they are (e.g. `--http-thread-count=16`).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    repository = fetch_repository(str(model_repo), workdir / "model-repo")
    if not any((d / "config.pbtxt").is_file() for d in repository.iterdir() if d.is_dir()):
        raise TritonError(f"{model_repo}: not a Triton model repository (no <model>/config.pbtxt)")
    server = server_dir()
    ports = {"http": http_port or free_port(), "grpc": grpc_port or free_port(), "metrics": metrics_port or free_port()}
    args = [
        str(server / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={server / 'backends'}",
        f"--http-address={LOOPBACK}",
        f"--http-port={ports['http']}",
        f"--grpc-address={LOOPBACK}",
        f"--grpc-port={ports['grpc']}",
        f"--metrics-address={LOOPBACK}",
        f"--metrics-port={ports['metrics']}",
        "--allow-gpu-metrics=false",
        "--strict-readiness=true",
        "--exit-timeout-secs=15",
        f"--log-verbose={log_verbose}",
        *extra_args,
    ]
    log = workdir / "tritonserver.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=server_env(), cwd=workdir, start_new_session=True
        )
    triton = LocalTriton(repository, ports["http"], ports["grpc"], ports["metrics"], log, proc)
    deadline = time.monotonic() + timeout
    try:
        while not _ready(triton.http_url):
            if proc.poll() is not None:
                raise TritonError(
                    f"tritonserver exited with {proc.returncode} while loading {model_repo}{_first_failure(triton)} "
                    f"(log: {log}); log tail:\n{triton.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TritonError(
                    f"tritonserver not ready after {timeout:.0f}s serving {model_repo} (log: {log}); "
                    f"log tail:\n{triton.log_tail()}"
                )
            time.sleep(0.2)
    except BaseException:
        triton.stop()
        raise
    return triton

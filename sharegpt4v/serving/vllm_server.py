"""Serving on vLLM (`serving.engine=vllm`): vLLM's own OpenAI-compatible server on a llava-hf checkpoint.

Why not Triton's Python backend, as NVIDIA's vLLM backend does: in the engine environment the
stub of the `nvidia-pytriton` wheel cannot run vLLM. Measured here (2026-12-07) with a one-model
repository served from `.venv-engine`: `import vllm` in `initialize` fails with
`UnicodeDecodeError: 'ascii' codec can't decode byte 0xe2 in position 602` (the embedded
interpreter keeps an ASCII locale whatever LANG/LC_ALL/PYTHONUTF8 say, and torch reads its
templates as text), and without vLLM the first BYTES input aborts the stub (`terminate called
after throwing an instance of 'pybind11::error_already_set' ... unpack_from requires a buffer of at
least 84215049 bytes`): the stub wants numpy<2, vLLM's dependencies need numpy 2. So the vLLM
engine serves through `vllm.entrypoints.openai.api_server` (continuous batching, streaming, the
OpenAI chat-completions protocol with images), behind the same KServe objects
(`cluster.build_vllm_serving_runtime`); Triton keeps serving the transformers engine.

The command line is built in one place (`server_args`) for the local server and the cluster runtime.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharegpt4v.engines.vllm_client import checkpoint_dtype, engine_env, engine_python, max_model_len, root_cause
from sharegpt4v.errors import PlatformError
from sharegpt4v.services import free_port, stop_process_group

LOOPBACK = "127.0.0.1"
CPU_KV_CACHE_BYTES = 2 << 30  # on CPU vLLM would otherwise reserve 92% of the machine's memory


class VllmServerError(PlatformError):
    """The vLLM server cannot start or serve the checkpoint."""


def server_args(model_dir: str, served_name: str, port: int, dtype: str, max_len: int, *, host: str = "0.0.0.0",
                cpu: bool = False) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server` arguments for a llava-hf checkpoint folder.

    The checkpoint's chat template (tokenizer) writes the prompt it was trained on; `dtype` is the
    checkpoint's own (vLLM's `auto` would run an fp32 checkpoint in bf16 on CPU).
    """
    args = ["-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name", served_name,
            "--host", host, "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_len),
            "--limit-mm-per-prompt", json.dumps({"image": 1}), "--no-enable-log-requests"]
    if cpu:  # graph capture costs minutes on CPU; the KV cache gets a fixed size
        args += ["--enforce-eager", "--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    return args


@dataclass
class LocalVllmServer:
    """A running vLLM OpenAI server. Use as a context manager, or call `stop()`."""

    model_dir: Path
    served_name: str
    port: int
    log: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    def is_ready(self) -> bool:
        return self.process.poll() is None and _healthy(self.url)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, timeout: float = 30) -> int | None:
        stop_process_group(self.process, timeout)
        return self.process.returncode

    def __enter__(self) -> LocalVllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_vllm_server(checkpoint_uri: str, served_name: str = "chat", port: int | None = None,
                      workdir: str | Path | None = None, timeout: float = 600) -> LocalVllmServer:
    """Serve a checkpoint (folder or s3:// prefix written by `save_model`) with vLLM's OpenAI server on
    loopback; returns once /health answers 200, or raises with the log's root cause."""
    from sharegpt4v.engines.vllm_client import EngineUnavailable
    from sharegpt4v.modeling.builder import materialize
    from sharegpt4v.modeling.hf_layout import llava_hf_folder

    try:
        python = engine_python()
    except EngineUnavailable as exc:
        raise VllmServerError(str(exc)) from None
    folder = llava_hf_folder(materialize(checkpoint_uri, require_manifest=True)).resolve()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="sharegpt4v-vllm-server-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = workdir / "vllm-server.log"
    cpu = not _has_gpu(python)
    args = server_args(str(folder), served_name, port, checkpoint_dtype(folder), max_model_len(folder),
                       host=LOOPBACK, cpu=cpu)
    env = engine_env()
    with open(log, "wb") as sink:
        process = subprocess.Popen([str(python), *args], stdout=sink, stderr=subprocess.STDOUT, env=env,
                                   cwd=workdir, start_new_session=True)
    server = LocalVllmServer(folder, served_name, port, log, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise VllmServerError(f"the vLLM server exited ({process.returncode}): {root_cause(server.log_tail(20000))}")
        if _healthy(server.url):
            return server
        time.sleep(0.5)
    server.stop()
    raise VllmServerError(f"the vLLM server was not ready within {timeout:.0f} s: {root_cause(server.log_tail(20000))}")


def _has_gpu(python: Path) -> bool:
    probe = subprocess.run([str(python), "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=120)
    return probe.stdout.strip() == "True"


def openai_image_message(text: str, image_png: bytes) -> dict[str, Any]:
    """One user message with an image (a base64 data URL) and text, as OpenAI chat completions take it."""
    import base64

    url = "data:image/png;base64," + base64.b64encode(image_png).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}

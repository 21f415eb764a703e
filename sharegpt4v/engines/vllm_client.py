"""vLLM from the platform's environment: a `VllmEngine` drives `vllm_worker.py` in the engine environment.

The engine environment is `.venv-engine` beside the repository (scripts/setup_engine.sh makes it),
or any Python with vLLM named by `SHAREGPT4V_ENGINE_PYTHON` (the GPU image sets it). Images travel
as raw RGB already padded/cropped and resized by the platform, so both engines see the same pixels.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from sharegpt4v.engines import vllm_worker
from sharegpt4v.errors import PlatformError

ENGINE_PYTHON_ENV = "SHAREGPT4V_ENGINE_PYTHON"
REPO_ENGINE_PYTHON = Path(__file__).resolve().parents[2] / ".venv-engine" / "bin" / "python"


_EXCEPTION_LINE = re.compile(r"\b[A-Z]\w*(Error|Exception): ")
_LOG_PREFIX = re.compile(r"^(\([^)]*\)\s*)?(ERROR|WARNING|INFO)\s+[\d-]+ [\d:]+ \[[^\]]*\]\s*")


class EngineUnavailable(PlatformError):
    """The vLLM engine environment is missing or does not start."""


class EngineError(PlatformError):
    """The running engine failed a request or died."""


def root_cause(log: str) -> str:
    """The root cause in a vLLM log: the last exception line that is not vLLM's generic "see root
    cause above", without its log prefix; else the last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    causes = [line for line in lines if _EXCEPTION_LINE.search(line) and "See root cause above" not in line]
    return _LOG_PREFIX.sub("", (causes or lines or ["(no output)"])[-1])[:1000]


def engine_python() -> Path:
    """The Python of the engine environment, or a one-line error saying how to make it."""
    named = os.environ.get(ENGINE_PYTHON_ENV)
    python = Path(named) if named else REPO_ENGINE_PYTHON
    if not python.is_file():
        where = f"{ENGINE_PYTHON_ENV}={named}" if named else str(python)
        raise EngineUnavailable(
            f"the vllm engine environment is missing ({where} not found): run scripts/setup_engine.sh "
            f"(make test does), set {ENGINE_PYTHON_ENV} to a Python with vllm, or use the transformers backend"
        )
    return python


def engine_env() -> dict[str, str]:
    """The environment of a process in the engine environment: no usage reports, no PYTHONPATH
    (the platform's packages must not shadow the engine's)."""
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    return env


def checkpoint_dtype(folder: Path) -> str:
    """The dtype a checkpoint was saved in (config.json), e.g. "float32"; vLLM must not guess it."""
    config = json.loads((folder / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    return str(dtype or "float32")


def max_model_len(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    return int(config.get("text_config", config).get("max_position_embeddings", 4096))


def rgb_payload(image: Image.Image) -> dict[str, Any]:
    image = image.convert("RGB")
    return {"width": image.width, "height": image.height, "rgb": base64.b64encode(image.tobytes()).decode()}


class VllmEngine:
    """One vLLM engine in a worker process; `generate` batches go to `vllm.LLM.generate` whole.

    `close()` (or the context manager) stops the worker; a worker that dies is reported with the
    last line of its log.
    """

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str | None = None,
        seed: int = 0,
        enforce_eager: bool | None = None,
        engine_args: dict[str, Any] | None = None,
        start_timeout_s: float = 900.0,
    ):
        folder = Path(model_dir).resolve()  # the worker runs in another directory
        self.dtype = dtype or checkpoint_dtype(folder)
        python = engine_python()
        self._log = tempfile.NamedTemporaryFile(prefix="sharegpt4v-vllm-", suffix=".log", delete=False)  # noqa: SIM115
        env = {**engine_env(), "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        self._process = subprocess.Popen(
            [str(python), vllm_worker.__file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            env=env, cwd=tempfile.gettempdir(), start_new_session=True,  # its own group: see vllm_worker
        )
        self._lock = threading.Lock()
        try:
            reply = self._call({"op": "init", "model": str(folder), "dtype": self.dtype,
                                "max_model_len": max_model_len(folder), "seed": seed, "enforce_eager": enforce_eager,
                                "engine_args": engine_args or {}}, timeout=start_timeout_s)
        except EngineError as exc:
            self.close()
            cause = self.log_tail() if "See root cause above" in str(exc) else str(exc)
            raise EngineUnavailable(f"vllm did not start on {folder}: {cause}") from None
        self.version, self.device = reply["vllm"], reply["device"]

    def log_tail(self) -> str:
        return root_cause(Path(self._log.name).read_text(errors="replace"))

    def _call(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        with self._lock:
            if self._process.poll() is not None:
                raise EngineError(f"the vllm worker exited ({self._process.returncode}): {self.log_tail()}")
            try:
                assert self._process.stdin is not None and self._process.stdout is not None
                vllm_worker.write_frame(self._process.stdin, message)
                reply = _read_with_timeout(self._process, timeout)
            except (BrokenPipeError, OSError):
                reply = None
            if reply is None:
                self._process.kill()
                raise EngineError(f"the vllm worker died: {self.log_tail()}")
            if not reply.get("ok"):
                raise EngineError(str(reply.get("error", "unknown error")))
            return reply

    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        max_tokens: int,
        temperature: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        min_tokens: int = 0,
    ) -> tuple[list[dict[str, Any]], float]:
        """(one output per prompt, in order; the engine's wall seconds). Prompts carry one `<image>`
        and no BOS (vLLM adds it, as the platform's tokenizer does)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not prompts:
            return [], 0.0
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature,
                                  "repetition_penalty": repetition_penalty, "skip_special_tokens": True,
                                  "min_tokens": min_tokens}
        if seed is not None:
            params["seed"] = seed
        reply = self._call({"op": "generate", "prompts": list(prompts), "images": [rgb_payload(i) for i in images],
                            "params": params})
        return reply["outputs"], float(reply["seconds"])

    def close(self) -> None:
        process = getattr(self, "_process", None)
        if process is None or process.poll() is not None:
            return
        try:
            assert process.stdin is not None
            process.stdin.close()  # end of input: the worker returns and vLLM shuts its engine down
            process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # any engine process left behind

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _read_with_timeout(process: subprocess.Popen, timeout: float | None) -> dict[str, Any] | None:
    """The next reply, or None when the worker dies or `timeout` passes before it starts answering."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return vllm_worker.read_frame(process.stdout) if ready else None

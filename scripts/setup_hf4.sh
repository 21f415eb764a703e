#!/usr/bin/env bash
# Create .venv-hf4: stock transformers 4.57 (and the CPU torch), only for the compatibility tests
# that load the platform's checkpoints with a 4.5x release. Pins: scripts/hf4-lock.txt.
# Idempotent: a second run with the same lock only checks a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
HF4_VENV=${HF4_VENV:-.venv-hf4}
lock=scripts/hf4-lock.txt
stamp_file="$HF4_VENV/.setup-stamp"
stamp=$(cat "$lock" scripts/setup_hf4.sh | sha256sum | cut -d' ' -f1)

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && [ -x "$HF4_VENV/bin/python" ]; then
  exit 0
fi
echo "setup: creating $HF4_VENV (transformers 4.57, for compatibility tests)" >&2
[ -x "$HF4_VENV/bin/python" ] || "$PYTHON" -m venv "$HF4_VENV"
"$HF4_VENV/bin/python" -m pip --disable-pip-version-check -q install --no-deps -r "$lock" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2 || true)
echo "$stamp" > "$stamp_file"
echo "setup: $HF4_VENV ready" >&2

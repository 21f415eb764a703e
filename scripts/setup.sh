#!/usr/bin/env bash
# Create .venv with the platform and its pinned dependencies. Idempotent: a second run
# with unchanged pins only checks a stamp (well under a second).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
stamp_file="$VENV/.setup-stamp"
stamp=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && [ -x "$VENV/bin/sharegpt4v" ]; then
  exit 0
fi

echo "setup: creating $VENV (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first: the CPU build is on this machine's disk; a bare "torch" would pull a CUDA build.
"${pip[@]}" install torch==2.13.0 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"${pip[@]}" install -c constraints.txt -e ".[dev]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "$stamp" > "$stamp_file"
echo "setup: $VENV ready" >&2

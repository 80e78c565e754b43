#!/usr/bin/env bash
# The project's one test command (README, .ci/run): installs what the tests need, then runs them all.
# Safe to re-run; on a fresh Debian/Ubuntu machine it needs root only for what later stages add
# (the single-node SLURM test cluster).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# torch first and pinned: a bare `torch` requirement would pull several GB of CUDA wheels.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e '.[test]'

set +e
"$PY" -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$rc"

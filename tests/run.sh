#!/usr/bin/env bash
# The project's one test command (README, .ci/run): installs what the tests need, then runs them all.
# Safe to re-run; on a fresh Debian/Ubuntu machine it needs root for the SLURM test clusters (slurm/up.sh
# and up.sh --nodes 2 install and start them; slurm/down.sh stops them).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# torch first and pinned: a bare `torch` requirement would pull several GB of CUDA wheels.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e '.[test]'

# Formatting and lint first: cheap, and a red here is the code's fault, never the machine's.
"$PY" -m ruff format --check --diff .
"$PY" -m ruff check .

# Beagle 5.4, the Debian package: tests/test_phase.py phases targets with the real one (it brings a JRE).
if ! command -v beagle >/dev/null && command -v apt-get >/dev/null; then
    apt_beagle() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@" >/dev/null; }
    apt_beagle install -y --no-install-recommends beagle || { apt_beagle update && apt_beagle install -y --no-install-recommends beagle; } ||
        echo "tests/run.sh: could not install beagle; tests/test_phase.py will fail under CI=true" >&2
fi

# The SLURM tests submit real jobs to a single-node cluster, tests/test_two_nodes.py to a two-node one
# beside it (its nodes in network namespaces of this machine); under CI they fail, not skip, without them.
for nodes in 1 2; do
    if ! bash slurm/up.sh --nodes "$nodes"; then
        bash slurm/status.sh --nodes "$nodes" --logs || true
        if [ "${CI:-}" = "true" ]; then
            echo "tests/run.sh: the $nodes-node SLURM test cluster did not come up (logs above)" >&2
            exit 1
        fi
        echo "tests/run.sh: no $nodes-node SLURM test cluster (needs root on Debian/Ubuntu); its tests will skip" >&2
    fi
done

set +e
"$PY" -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$rc"

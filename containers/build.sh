#!/usr/bin/env bash
# Build the rag_hpc Apptainer image from the repository root: bash containers/build.sh [OUT.sif] [TORCH_TAG]
# Needs apptainer (or singularity-ce) on the build host; --fakeroot where the build is unprivileged.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-rag_hpc.sif}
tag=${2:-}
bin=$(command -v apptainer || command -v singularity || true)
if [ -z "$bin" ]; then
    echo "containers/build.sh: apptainer is not installed on this host; build on a machine that has it" >&2
    exit 1
fi
args=(build)
[ "$(id -u)" -eq 0 ] || args+=(--fakeroot)
[ -z "$tag" ] || args+=(--build-arg "TORCH_TAG=$tag")
"$bin" "${args[@]}" "$out" containers/rag_hpc.def
"$bin" test "$out"
echo "built $out; run jobs in it with: python -m rag_hpc.launch --container $out ..."

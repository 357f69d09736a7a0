#!/usr/bin/env bash
# The main job on the local provider, from nothing: set up, launch 3 nodes, inject
# pkg-examples/hello, show status and logs, fetch every node's result, terminate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
export VTOOL_CLUSTER="${VTOOL_CLUSTER:-demo-$$}"   # its own cluster: never one you already have
trap 'vtool terminate --yes >/dev/null 2>&1 || true' EXIT   # never leave nodes behind

set -x
vtool launch 3
vtool inject pkg-examples/hello
VTOOL_TIMEOUT_COMMAND=60 vtool run 'while [ ! -f hello-result.txt ]; do sleep 0.2; done'   # wait for the launch scripts
vtool status
vtool logs
vtool scpgetall hello-result.txt out/hello-result
head out/hello-result.*
vtool terminate --yes
{ set +x; trap - EXIT; } 2>/dev/null

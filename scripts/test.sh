#!/usr/bin/env bash
# Set up everything the tests need (see bootstrap.sh), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"

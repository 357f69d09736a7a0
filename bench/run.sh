#!/usr/bin/env bash
# The benchmark in one command: a venv with this repository's vtool and the peers
# (parallel-ssh, Fabric, ansible-core; rsync from apt-get if missing), then bench/bench.py,
# which launches local nodes, measures vtool and the peers side by side and rewrites
# docs/benchmarks.md.
#
#   bash bench/run.sh                 # everything, 5 runs of every row
#   bash bench/run.sh --runs 3        # arguments go to bench/bench.py (--help lists them)
#
# The venv is $VTOOL_BENCH_VENV (default /tmp/vtool-bench-venv), outside the work tree.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VTOOL_BENCH_VENV:-/tmp/vtool-bench-venv}
python=${PYTHON:-python3}

for tool in ssh scp ssh-keygen xargs; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install openssh-client findutils)" >&2; exit 3; }
done
[ -x /usr/sbin/sshd ] || command -v sshd >/dev/null || { echo "bench: sshd is missing (apt-get install openssh-server)" >&2; exit 3; }
# rsync (a peer of the inject rows, on the client and, the same binary, on the local nodes),
# zstd (vtool's package format when the client and the nodes have it) and musl-gcc (vtool-connect
# as a static program); scripts/bootstrap.sh installs the last two as well.
for pair in rsync:rsync zstd:zstd musl-gcc:musl-tools; do
    tool=${pair%%:*}; pkg=${pair#*:}
    if ! command -v "$tool" >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "bench: installing $pkg" >&2
            apt-get install -y -q "$pkg" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$pkg" >/dev/null; }
        fi
        command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install $pkg)" >&2; exit 3; }
    fi
done

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
timeout 1200 "$venv/bin/python" -m pip install --quiet --upgrade pip
# vtool as users install it (README: `pip install .`), a copy built from this work tree at each
# run. Not editable: an editable install's import hook costs every Python start in the venv
# ~9 ms (measured: `python -c pass` 17 ms against 8 ms), peers included, and a copy keeps a
# running bench apart from edits to the tree.
rm -rf "$root/build"  # (setuptools builds there: no module deleted from the tree may linger in the copy)
timeout 1200 "$venv/bin/python" -m pip uninstall --quiet --yes vtool >/dev/null 2>&1 || true
timeout 1200 "$venv/bin/python" -m pip install --quiet "$root" parallel-ssh fabric ansible-core

# 64 sshd nodes and a client with a connection to each: lift the open-file limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true

cd "$root"
exec "$venv/bin/python" bench/bench.py --command "bash bench/run.sh${*:+ $*}" "$@"

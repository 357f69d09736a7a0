#!/usr/bin/env bash
# Set up everything vtool and its tests need on a fresh Debian/Ubuntu machine:
# OpenSSH server and client, screen, zstd (packages travel compressed with it, see
# inject.zstd), a C compiler and the C library's headers (for
# pkg-examples/compile and vtool-connect, see ssh.nodelay), musl-gcc (vtool-connect as a
# static program, which starts without glibc's start-up), Python's venv,
# and ./.venv with vtool installed (editable) plus its test dependencies.
# Idempotent: a second run only checks. Run as root, or as a user with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for cmd in sshd:openssh-server ssh:openssh-client ssh-keygen:openssh-client screen:screen zstd:zstd cc:gcc make:make musl-gcc:musl-tools; do
  bin=${cmd%%:*}; pkg=${cmd#*:}
  if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then need+=("$pkg"); fi
done
if [ ! -e /usr/include/stdio.h ]; then need+=(libc6-dev); fi  # (gcc only recommends it)
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then need+=(python3-venv); fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "bootstrap: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import vtool, pytest, boto3, moto.server' >/dev/null 2>&1 || [ setup.cfg -nt .venv/.vtool-installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test,dev]'
  touch .venv/.vtool-installed
fi

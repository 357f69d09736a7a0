"""Connecting while vtool starts: the SSH key exchanges of a node command overlap Python's
start-up.

A command such as ``vtool run hostname`` spends its first ~0.1 s importing Invoke, reading
the settings and the plugins, and only then opens its SSH connections, one key exchange per
node (most of it waiting on the network). ``start`` runs first thing in ``vtool.main``: it
opens those connections at once, in the background, as the shared connections (OpenSSH
ControlMaster) the command then uses. ``SshClient`` waits for a node's early connection
(``wait``) before it runs anything there, so no node gets two.

It only replays what an earlier command in the same context wrote down (``remember``): the
exact ``ssh`` command line of each node, filed under the working folder, the VTOOL_*
environment, the config files (their times and sizes) and the --cluster/--profile flags.
Anything unexpected (no such record, a cluster whose nodes changed since, a node list it
cannot read, --help) and it does nothing: the command then connects as it always does.
The connections it opens are the same ones the command would open; one that fails costs
nothing but the attempt.
"""

from __future__ import annotations

import atexit
import binascii
import json
import os
import re
from typing import Any

VERBS = frozenset({"run", "inject", "scpget", "scpgetall", "put", "logs"})
RECORD_NODES = 128  # a record names at most this many nodes (the first ones by index)
# At most this many connections are opened early. Measured on 2 cores that also run the
# nodes: with 8 nodes, a cold `run` takes 0.26 s instead of 0.34 s; with 32, opening all early
# was not faster than opening 8 (the key exchanges' CPU, not their latency, is the limit).
EARLY_MAX = 8
_VALUE_FLAGS = {"-c": "cluster", "--cluster": "cluster", "-p": "profile", "--profile": "profile"}
_NODE_FLAGS = ("-n", "--nodes", "--node")
_NOT_CONTEXT = frozenset({"VTOOL_DEBUG", "VTOOL_EARLY"})  # variables that change neither cluster nor SSH

_started: dict[str, Any] = {}  # control socket path -> the ssh process opening it
_key_now: str | None = None  # this command's context (set by start), for remember


def _flags(args: list[str]) -> dict[str, str] | None:
    """--cluster, --profile and --nodes as given (None: --help, or nothing to go on)."""
    found: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            return None
        if a[:2] in ("-c", "-p", "-n") and len(a) > 2:  # -cNAME: read by Invoke, not guessed here
            return None
        name, _, value = a.partition("=")
        key = _VALUE_FLAGS.get(name) or ("nodes" if name in _NODE_FLAGS else None)
        if key is not None:
            if not _:
                if i + 1 >= len(args):
                    return None
                value = args[i + 1]
                i += 1
            found[key] = value
        i += 1
    return found


def _home() -> str:
    return os.environ.get("VTOOL_HOME") or os.path.join(os.path.expanduser("~"), ".vtool")


def _key(flags: dict[str, str]) -> str:
    """What decides which cluster and which SSH settings a command uses (see the module), as
    text (a record holds it, and is used only for exactly the same)."""
    cwd = os.getcwd()
    stamps = []
    for base in ("/etc/vtool", os.path.join(os.path.expanduser("~"), ".vtool"), os.path.join(cwd, "vtool")):
        for ext in ("yaml", "yml", "json", "py"):
            try:
                st = os.stat(f"{base}.{ext}")
                stamps.append([f"{base}.{ext}", st.st_mtime_ns, st.st_size])
            except OSError:
                pass
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("VTOOL_") and k not in _NOT_CONTEXT)
    return json.dumps([cwd, env, stamps, flags.get("cluster"), flags.get("profile")])


def _record_path(key: str) -> str:
    # crc32: cheap to import (hashlib is not); the record's "context" decides, not its name.
    return os.path.join(_home(), "early", f"{binascii.crc32(key.encode()):08x}.json")


def _stamp(paths: list[str]) -> list[int]:
    out = []
    for p in paths:
        try:
            out.append(os.stat(p).st_mtime_ns)
        except OSError:
            out.append(0)
    return out


def _wanted(spec: str | None, indices: list[int]) -> list[int] | None:
    if spec is None or spec.strip() in ("", "all"):
        return indices
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if not m:
            return None
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        out.update(i for i in indices if lo <= i <= hi)
    return sorted(out)


def start(args: list[str]) -> int:
    """Open the connections the command ``vtool ARGS`` will use; return how many it started.
    Never raises: anything wrong means it opens none."""
    try:
        return _start(args)
    except Exception:  # an optimisation: never in the way of the command itself
        return 0


def _start(args: list[str]) -> int:
    if not args or args[0] not in VERBS or os.environ.get("VTOOL_EARLY", "1") in ("0", "no", "false", "off"):
        return 0
    flags = _flags(args[1:])
    if flags is None:
        return 0
    global _key_now
    _key_now = _key(flags)
    path = _record_path(_key_now)
    try:
        st = os.stat(path)
    except OSError:
        return 0
    if st.st_uid != os.getuid() or st.st_mode & 0o022:  # only a record the user wrote alone
        return 0
    with open(path) as f:
        record = json.load(f)
    if record.get("context") != _key_now or _stamp(record["stamp_paths"]) != record["stamps"]:
        return 0
    nodes = {int(i): n for i, n in record["nodes"].items()}
    wanted = _wanted(flags.get("nodes"), sorted(nodes))
    if not wanted:
        return 0
    import subprocess

    started = 0
    env = {**os.environ, "SHELL": "/bin/sh"}  # ssh runs a ProxyCommand with $SHELL: a fast one
    for i in wanted[: min(int(record["concurrency"]), EARLY_MAX)]:
        sock, argv = nodes[i]["socket"], nodes[i]["argv"]
        if os.path.exists(sock) or sock in _started:
            continue
        _started[sock] = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        started += 1
    if started:
        atexit.register(_stop_unfinished)
    return started


def wait(socket: str, timeout: float) -> None:
    """If ``start`` is opening the connection ``socket``, wait until it is open (or failed)."""
    proc = _started.pop(socket, None)
    if proc is None:
        return
    try:
        proc.wait(timeout=timeout)
    except Exception:  # not connected in time: the command connects by itself
        proc.kill()
        proc.wait()


def _stop_unfinished() -> None:
    """At exit (e.g. the command refused its input): connections still being opened stop."""
    for proc in list(_started.values()):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _started.clear()


def remembering() -> bool:
    """Whether this command was started by ``vtool`` for a verb ``start`` serves."""
    return _key_now is not None


def remember(stamp_paths: list[str], concurrency: int, nodes: dict[int, tuple[str, list[str]]]) -> None:
    """Write the record ``start`` reads for this command's context: per node index (socket,
    the ``ssh`` command that opens that shared connection in the background). Only when the
    record changed; never raises."""
    if _key_now is None:
        return
    try:
        data = {
            "context": _key_now,
            "stamp_paths": stamp_paths,
            "stamps": _stamp(stamp_paths),
            "concurrency": concurrency,
            "nodes": {str(i): {"socket": s, "argv": a} for i, (s, a) in sorted(nodes.items())[:RECORD_NODES]},
        }
        text = json.dumps(data, sort_keys=True)
        path = _record_path(_key_now)
        try:
            with open(path) as f:
                if f.read() == text:
                    return
        except OSError:
            pass
        folder = os.path.dirname(path)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except Exception:  # a cache: losing it only costs speed
        pass

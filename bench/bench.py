"""vtool against the tools a scientist would pick instead, on local sshd nodes.

    python bench/bench.py [--runs 5] [--output docs/benchmarks.md]

(``bash bench/run.sh`` sets up the venv with the peers and runs this.)

Launches nodes with vtool's local provider in a throwaway VTOOL_HOME, then measures, in the
same run and interleaved (the order of the tools rotates from one run to the next):

- workload 1: ``run hostname`` on N nodes, cold (no shared SSH connection open) and warm (the
  second command in a row), and the second command on the same client inside one process,
  beside a reference row that is neither vtool nor a peer: the floor under ``vtool run``
  (bench/floor.py: Python's start-up plus vtool's connections, none of vtool's own code);
- workload 2: ``inject`` of a 20 MB incompressible package into 8 and 32 nodes, against
  uploading the same .tar.gz and unpacking it (parallel-ssh, Fabric, ansible ``unarchive``,
  ``xargs -P`` + ssh) and ``rsync -az`` of the folder per node (what SkyPilot does); every run
  starts from nodes without the package and is checked on disk (SHA-256 of every file);
- workload 3: the same with a generated source tree (900 .py files, 14 MB) into 32 nodes;
- workload 4: re-inject of that tree into 32 nodes, unchanged and with one file changed, the
  nodes holding the original (put there untimed by the same tool before every run);
- workload 5: ``scpgetall`` of a 5 MB file (different random bytes on each node) from N nodes;
- workload 6: the bytes the client sends for the injects of workloads 2 and 4, counted at the
  TCP level by a forwarder per node in this process (vtool is pointed at it by the plugin
  bench/vtool_bench_proxy.py, the peers by their configuration); the nodes' relay traffic
  between themselves is not the client's and goes around it;
- workload 7: ``vtool --help`` against ``inv --help``;
- workload 8 (scale): ``run true`` on 256 nodes, vtool cold and warm, parallel-ssh and
  ``xargs -P`` + ssh; the cluster grows to 256 nodes for this row only, after the others.

Every tool runs as a child process. Wall time is the child's; CPU time is user+sys of the
child and everything it waited for (``os.wait4``), plus what OpenSSH connection masters left
behind by the child (ControlPersist daemons, adopted by this process as a child subreaper)
used meanwhile. Memory comes from one more run of every row (cold and warm where a row has
both), untimed, that samples the PSS of the child's process tree and those masters every 10 ms (``ru_maxrss`` of
a child of this Python process is useless: Linux counts the parent's pages the child had
before exec). Every run's result is checked (all N nodes answered, every fetched file has the
node's bytes, every node has the whole package); failures are counted in the table, never
dropped silently. Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import functools
import hashlib
import json
import math
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from vtool.early import KEEPER_NAME

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent  # the bench venv's bin: vtool, ansible, inv
CLUSTER = "bench"
HOSTNAME = socket.gethostname()
TICK = os.sysconf("SC_CLK_TCK")
with open("/proc/self/cmdline", "rb") as _f:
    _OWN_CMDLINE = _f.read()

# -- processes: run one command, measure it -----------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def set_subreaper(on: bool) -> None:
    """Orphans of our children (OpenSSH ControlPersist masters) become our children, so
    their CPU and memory can be counted and they can be reaped. Off while vtool launches the
    nodes: the sshd nodes are not part of the client."""
    _libc.prctl(36, 1 if on else 0, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _stat(pid: int) -> tuple[str, str, float] | None:
    """(comm, state, cpu seconds) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    return comm, rest[0], (int(rest[11]) + int(rest[12])) / TICK


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _memory(pid: int) -> tuple[int, int]:
    """(proportional set size, peak resident size) of a process in bytes; 0, 0 when gone.
    PSS shares each page among the processes that map it, so N forked workers or N ssh
    clients are not counted N times over for their common pages."""
    pss = hwm = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for ln in f:
                if ln.startswith("Pss:"):
                    pss = int(ln.split()[1]) * 1024
                    break
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                if ln.startswith("VmHWM:"):
                    hwm = int(ln.split()[1]) * 1024
                    break
    except (OSError, IndexError, ValueError):
        pass
    return pss, hwm


class CpuGroup:
    """A control group: the kernel counts the CPU time of every process in it and of every
    process they start, to the nanosecond, whether they have ended or not (cgroup v2's
    ``cpu.stat``, or v1's ``cpuacct``). /proc's per-process times come in 10 ms ticks,
    rounded down for each process: 32 connections of ~15 ms each read as half that."""

    def __init__(self, path: Path, v2: bool, home: Path) -> None:
        self.path = path
        self.v2 = v2
        self.home = home  # the group this process was in (``inside`` returns it there)

    @classmethod
    def make(cls, name: str) -> CpuGroup | None:
        """A new group, or None where this machine or user cannot make one."""
        try:
            with open("/proc/self/mounts") as f:
                mounts = [ln.split() for ln in f]
            with open("/proc/self/cgroup") as f:
                mine = [ln.rstrip("\n").split(":", 2) for ln in f]
        except OSError:
            return None

        def counts(v2: bool, controllers: str) -> bool:
            """Whether a hierarchy with these controllers counts CPU (v2: always; v1: cpuacct)."""
            return v2 or "cpuacct" in controllers.split(",")

        for v2 in (True, False):
            for _dev, where, kind, options, *_ in mounts:
                if kind != ("cgroup2" if v2 else "cgroup") or not counts(v2, options):
                    continue
                # (this process's place in that hierarchy: v2's line names no controller)
                own = [p for _, ctrl, p in mine if (ctrl == "") == v2 and counts(v2, ctrl)]
                if not own:
                    continue
                group = cls(Path(where) / name, v2, Path(where) / own[0].lstrip("/"))
                try:
                    group.path.mkdir()
                except OSError:
                    continue
                try:
                    group.seconds()
                    with group.inside():  # (a group this process may not join, or leave, is of no use)
                        pass
                except OSError:
                    group.remove()
                    continue
                return group
        return None

    def seconds(self) -> float:
        if self.v2:
            with open(self.path / "cpu.stat") as f:
                for ln in f:
                    if ln.startswith("usage_usec "):
                        return int(ln.split()[1]) / 1e6
            raise OSError("no usage_usec in cpu.stat")
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def add(self, pid: int, into: Path | None = None) -> None:
        try:
            ((into or self.path) / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:  # (ended meanwhile)
            pass

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """This process in the group for a moment: what it starts meanwhile stays there."""
        self.add(os.getpid())
        try:
            yield
        finally:
            self.add(os.getpid(), into=self.home)

    def remove(self) -> None:
        """Delete the group once its processes have ended (a group still in use stays)."""
        try:
            self.path.rmdir()
        except OSError:
            pass


def adopted_masters() -> dict[int, float]:
    """The connection masters that our children left behind: OpenSSH's, and vtool's keeper
    (one Python process for all of a run's connections): {pid: cpu seconds so far}."""
    out = {}
    for pid in _children(os.getpid()):
        st = _stat(pid)
        if st and st[1] != "Z" and st[0] in ("ssh", KEEPER_NAME):
            out[pid] = st[2]
    return out


def reap() -> float:
    """Reap finished adopted processes; return the CPU seconds they used in total."""
    cpu = 0.0
    for pid in _children(os.getpid()):
        st = _stat(pid)
        if st and st[1] == "Z":
            try:
                _, _, ru = os.wait4(pid, os.WNOHANG)
                cpu += ru.ru_utime + ru.ru_stime
            except ChildProcessError:
                pass
    return cpu


@dataclass
class Sample:
    wall: float
    cpu: float
    ok: bool
    note: str = ""
    memory_mb: float = float("nan")  # peak of the summed PSS of the client's processes
    largest_mb: float = float("nan")  # peak RSS of its largest process
    node_cpu: float = float("nan")  # CPU seconds the nodes' sshd processes used meanwhile


@dataclass
class Package:
    """A package folder, and what the peers need of it."""

    folder: Path  # holds vtool-launch; its name is the package's name
    tarball: Path  # a .tar.gz of the folder (`vtool mkpkg`, gzip -6 as `tar czf`): what the tar peers upload
    archive: Path  # what vtool sends for it (its package store: the zstd copy, or a plain .tar if gzip saves little)
    dirname: str  # vtool's release folder on a node, NAME-HASH12
    files: dict[str, str]  # every file, relative to the folder -> SHA-256

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def size(self) -> int:
        """The package's size as vtool sends it (the unit of the bytes rows)."""
        return self.archive.stat().st_size

    @property
    def kind(self) -> str:
        return {".tar": "plain .tar", ".zst": ".tar.zst (zstd -3)"}.get(self.archive.suffix, ".tar.gz")


@dataclass
class Traffic:
    """What one client command sent and received over TCP (workload 6)."""

    sample: Sample
    sent: int  # bytes, client -> nodes
    received: int  # bytes, nodes -> client
    connections: int  # TCP connections the client opened
    package: int  # bytes of the package (the tarball), for the multiple


@dataclass
class _Waited:
    status: int
    rusage: resource.struct_rusage
    wall: float
    timed_out: bool
    peak_sum: int  # bytes of summed PSS
    peak_one: int  # bytes of the largest process's peak RSS


def _tree(pid: int) -> list[int]:
    """pid (once it has exec'd: before, it is a copy of this process) and its descendants."""
    pids = [] if _cmdline(pid) == _OWN_CMDLINE else [pid]
    todo = _children(pid)
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _wait(proc: subprocess.Popen[bytes], t0: float, timeout: float, memory: bool) -> _Waited:
    peak_sum = peak_one = 0
    timed_out = False
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return _Waited(status, ru, time.perf_counter() - t0, timed_out, peak_sum, peak_one)
        if memory:
            mem = [_memory(p) for p in [*_tree(proc.pid), *adopted_masters()]]
            peak_sum = max(peak_sum, sum(m[0] for m in mem))
            peak_one = max([peak_one, *(m[1] for m in mem)])
        if time.perf_counter() - t0 > timeout and not timed_out:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group
        time.sleep(0.01 if memory else 0.005)


def measure(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    timeout: float,
    check: Callable[[int, str, str], str | None],
    stdin_text: str | None = None,
    logdir: Path,
    memory: bool = False,
    client: CpuGroup | None = None,
    nodes: CpuGroup | None = None,
) -> Sample:
    """Run argv once; time it and count its CPU and the nodes' CPU meanwhile (``nodes``:
    the group of their sshd processes); ``check(rc, stdout, stderr)`` returns None when the
    result is right, or what is wrong.

    With ``client``, the command starts in that group, and its CPU is the group's (the
    command, everything it starts, and the connection masters this and earlier commands
    left there, which are idle unless the command uses them); else it is what ``wait4``
    reports for the command and its children, plus the adopted masters' /proc times.

    With ``memory``, sample the memory of the process tree and the adopted connection
    masters every 10 ms. Reading /proc costs CPU on the same 2 cores, so the timed runs do
    not sample, and memory comes from a run of its own."""
    before = {} if client else adopted_masters()
    nodes_before = nodes.seconds() if nodes else 0.0
    client_before = client.seconds() if client else 0.0
    out_path, err_path, in_path = logdir / "stdout", logdir / "stderr", logdir / "stdin"
    in_path.write_text(stdin_text or "")
    with open(in_path, "rb") as stdin, open(out_path, "wb") as out, open(err_path, "wb") as err:
        with client.inside() if client else contextlib.nullcontext():  # (joined before the clock starts)
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=stdin, stdout=out, stderr=err, start_new_session=True)
        try:
            w = _wait(proc, t0, timeout, memory)
        except BaseException:  # Ctrl-C or SIGTERM: stop the child's process group first
            os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
            raise
    proc.returncode = os.waitstatus_to_exitcode(w.status)
    # (the nodes' side of a connection the command closed may still be ending: a moment for
    # it, untimed, so that its CPU is not counted in the next command's)
    time.sleep(0.05 if nodes or client else 0)
    nodes_used = nodes.seconds() - nodes_before if nodes else float("nan")
    if client:
        reap()  # (finished masters: their CPU is in the group's count)
        cpu = client.seconds() - client_before
    else:
        after = adopted_masters()
        masters = sum(c - before.get(pid, 0.0) for pid, c in after.items()) + reap()
        cpu = w.rusage.ru_utime + w.rusage.ru_stime + masters
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    problem = f"timed out after {timeout:g}s" if w.timed_out else check(proc.returncode, stdout, stderr)
    return Sample(
        wall=w.wall,
        cpu=cpu,
        ok=problem is None,
        note=problem or "",
        memory_mb=w.peak_sum / 2**20 if memory else float("nan"),
        largest_mb=w.peak_one / 2**20 if memory else float("nan"),
        node_cpu=nodes_used,
    )


def close_masters(control_dir: Path) -> None:
    """Close every shared OpenSSH connection whose socket is in control_dir (``ssh -O
    exit``), then reap the masters, so that the next command is cold."""
    if not control_dir.is_dir():
        return
    for sock in control_dir.iterdir():
        subprocess.run(
            ["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit", "bench-closing"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
    deadline = time.monotonic() + 5
    while adopted_masters() and time.monotonic() < deadline:
        time.sleep(0.02)
    reap()


# -- checks ------------------------------------------------------------------------------


def _failures(stdout: str) -> list[str]:
    return [ln[5:] for ln in stdout.splitlines() if ln.startswith("FAIL ")]


def _short(problems: list[str], n: int) -> str:
    return f"{len(problems)}/{n} nodes failed: {problems[0][:120]}"


def check_aliases(aliases: list[str], expect: str) -> Callable[[int, str, str], str | None]:
    """Lines ``<alias> <output>``: every alias once, with the expected output."""

    def check(rc: int, stdout: str, stderr: str) -> str | None:
        fails = _failures(stdout)
        got = {}
        for ln in stdout.splitlines():
            parts = ln.split(" ", 1)
            if len(parts) == 2 and parts[0] in aliases:
                got[parts[0]] = parts[1].strip()
        missing = [a for a in aliases if got.get(a) != expect]
        if fails:
            return _short(fails, len(aliases))
        if missing:
            return (
                f"{len(missing)}/{len(aliases)} nodes gave no '{expect}' (e.g. {missing[0]}: "
                f"{got.get(missing[0])!r}); exit {rc}: {stderr.strip()[-160:]}"
            )
        if rc != 0:
            return f"exit {rc}: {stderr.strip()[-160:]}"
        return None

    return check


def check_vtool_run(n: int) -> Callable[[int, str, str], str | None]:
    def check(rc: int, stdout: str, stderr: str) -> str | None:
        got = {}
        for ln in stdout.splitlines():
            m = re.match(r"^\[(\d+)\] (.*)$", ln)
            if m:
                got[int(m.group(1))] = m.group(2).strip()
        missing = [i for i in range(n) if got.get(i) != HOSTNAME]
        if missing:
            return f"{len(missing)}/{n} nodes gave no hostname (e.g. node {missing[0]}); exit {rc}: {stderr.strip()[-160:]}"
        if rc != 0:
            return f"exit {rc}: {stderr.strip()[-160:]}"
        return None

    return check


def check_count(n: int) -> Callable[[int, str, str], str | None]:
    """xargs + ssh: nothing names the node, so count the hostnames."""

    def check(rc: int, stdout: str, stderr: str) -> str | None:
        count = sum(1 for ln in stdout.splitlines() if ln.strip() == HOSTNAME)
        if count != n or rc != 0:
            return f"{count}/{n} hostnames, exit {rc}: {stderr.strip()[-160:]}"
        return None

    return check


def check_ansible(aliases: list[str]) -> Callable[[int, str, str], str | None]:
    def check(rc: int, stdout: str, stderr: str) -> str | None:
        lines = stdout.splitlines()
        good = set()
        for i, ln in enumerate(lines):
            m = re.match(r"^(\S+) \| (CHANGED|SUCCESS) \| rc=0 >>$", ln)
            if m and i + 1 < len(lines) and lines[i + 1].strip() == HOSTNAME:
                good.add(m.group(1))
        missing = [a for a in aliases if a not in good]
        if missing or rc != 0:
            bad = [ln for ln in lines if "| FAILED" in ln or "| UNREACHABLE" in ln]
            return f"{len(missing)}/{len(aliases)} nodes failed, exit {rc}: {(bad or [stderr.strip()[-160:]])[0][:160]}"
        return None

    return check


def check_files(expected: dict[Path, str]) -> Callable[[int, str, str], str | None]:
    """Every fetched file is there with the node's own bytes."""

    def check(rc: int, stdout: str, stderr: str) -> str | None:
        bad = []
        for path, digest in expected.items():
            try:
                if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                    bad.append(f"{path.name}: wrong content")
            except FileNotFoundError:
                bad.append(f"{path.name}: missing")
        fails = _failures(stdout)
        if fails:
            return _short(fails, len(expected))
        if bad:
            return f"{len(bad)}/{len(expected)} files bad ({bad[0]}); exit {rc}: {stderr.strip()[-120:]}"
        if rc != 0:
            return f"exit {rc}: {stderr.strip()[-160:]}"
        return None

    return check


def check_help(word: str) -> Callable[[int, str, str], str | None]:
    def check(rc: int, stdout: str, stderr: str) -> str | None:
        if rc != 0 or word not in stdout:
            return f"exit {rc}, no {word!r} in the output"
        return None

    return check


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_error(stdout: str, stderr: str) -> str:
    """The first line that looks like an error, else the end of stderr."""
    for ln in (stdout + "\n" + stderr).splitlines():
        if re.search(r"FAIL|UNREACHABLE|[Ee]rror|denied|refused|[Tt]oo many", ln):
            return ln.strip()[:160]
    return stderr.strip()[-160:]


def check_tree(
    pkg: Package, roots: list[Path], links: list[Path] | None = None
) -> Callable[[int, str, str], str | None]:
    """Every node got the whole package, checked on disk: ``roots[i]`` (node i's copy) holds
    every file of the package with its SHA-256; with ``links`` (vtool), node i's ``~/NAME``
    points at ``roots[i]``."""

    def check(rc: int, stdout: str, stderr: str) -> str | None:
        bad = []
        for i, root in enumerate(roots):
            problem = None
            for rel, digest in pkg.files.items():
                try:
                    if _sha256(root / rel) != digest:
                        problem = f"node {i}: {rel} differs"
                except OSError:
                    problem = f"node {i}: no {root.parent.name}/{root.name}/{rel}"
                if problem:
                    break
            if problem is None and links is not None and os.path.realpath(links[i]) != os.path.realpath(root):
                problem = f"node {i}: ~/{links[i].name} does not point at {root.name}"
            if problem:
                bad.append(problem)
        fails = _failures(stdout)
        if fails:
            return _short(fails, len(roots))
        if bad:
            return (
                f"{len(bad)}/{len(roots)} nodes lack the package ({bad[0]}); exit {rc}: {_first_error(stdout, stderr)}"
            )
        if rc != 0:
            return f"exit {rc}: {_first_error(stdout, stderr)}"
        return None

    return check


_TROUBLE = re.compile(r"too many open files|connection refused|connection reset|kex_exchange_identification", re.I)


def check_scale(inner: Callable[[int, str, str], str | None]) -> Callable[[int, str, str], str | None]:
    """``inner``, but first: any "too many open files", refused or reset connection in the
    output is a failure, whatever the exit code says."""

    def check(rc: int, stdout: str, stderr: str) -> str | None:
        trouble = [ln.strip() for ln in (stdout + "\n" + stderr).splitlines() if _TROUBLE.search(ln)]
        if trouble:
            return f"{len(trouble)} lines of open-file or connection trouble (e.g. {trouble[0][:120]}); exit {rc}"
        return inner(rc, stdout, stderr)

    return check


def check_exit(n: int, summary_line: bool) -> Callable[[int, str, str], str | None]:
    """A command with no output on n nodes: exit 0 (xargs exits 123 when an ssh failed), and
    for vtool its own count (``N ok, 0 failed``)."""

    def check(rc: int, stdout: str, stderr: str) -> str | None:
        if summary_line and f"{n} ok, 0 failed" not in stderr:
            m = re.search(r"^(\d+) ok, (\d+) failed$", stderr, re.M)
            return f"{m.group(0) if m else 'no summary line'}; exit {rc}: {_first_error(stdout, stderr)}"
        if rc != 0:
            return f"exit {rc}: {_first_error(stdout, stderr)}"
        return None

    return check


# -- the cluster ---------------------------------------------------------------------------


@dataclass
class Bench:
    tmp: Path
    env: dict[str, str]
    runs: int
    timeout: float
    ports: dict[int, int] = field(default_factory=dict)
    hostkeys: dict[int, tuple[str, str]] = field(default_factory=dict)  # node -> (type, base64 key)
    client_cpu: CpuGroup | None = None  # the measured commands' group (CpuGroup)
    nodes_cpu: CpuGroup | None = None  # the nodes' sshd processes' group
    results: dict[str, dict[tuple[str, ...], list[Sample]]] = field(default_factory=dict)
    memory: dict[str, dict[tuple[str, ...], Sample]] = field(default_factory=dict)
    traffic: dict[tuple[str, ...], Traffic] = field(default_factory=dict)  # workload 6
    packages: dict[str, Package] = field(default_factory=dict)  # made once, by key
    labels: dict[str, str] = field(default_factory=dict)  # workload -> its name in the summary
    sampling: bool = False  # the untimed memory run
    trashed: int = 0  # folders moved to the nodes' trash so far (clean_nodes)
    measured: str = ""  # which vtool: the work tree when the bench started (run.sh installs vtool from it just before)

    @property
    def home(self) -> Path:
        return Path(self.env["VTOOL_HOME"])

    @property
    def cluster_dir(self) -> Path:
        return self.home / "clusters" / CLUSTER

    def vtool(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "vtool"), *args, "-c", CLUSTER],
            env=self.env,
            cwd=self.tmp,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def known_hosts_ip(self, ports: dict[int, int]) -> str:
        """The pinned host keys as ``[127.0.0.1]:PORT TYPE KEY`` lines (for the peers that
        look hosts up by address and port)."""
        return "".join(f"[127.0.0.1]:{ports[i]} {kind} {key}\n" for i, (kind, key) in sorted(self.hostkeys.items()))

    def node_home(self, i: int) -> Path:
        return self.cluster_dir / "nodes" / str(i) / "home"

    def launch(self, n: int, ready_timeout: int = 300) -> None:
        """Add n nodes (launches are additive; ``--no-inject``: a node launched after an inject
        would otherwise get the cluster's last package) and load their ports and host keys."""
        t0 = time.perf_counter()
        r = self.vtool(
            "launch", str(n), "--no-inject", "--ready-timeout", str(ready_timeout), timeout=ready_timeout + 600
        )
        if r.returncode != 0:
            raise SystemExit(f"bench: vtool launch {n} failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
        say(f"launched {n} nodes in {time.perf_counter() - t0:.1f}s")
        status = json.loads(self.vtool("status", "--json").stdout)
        for node in status[0]["nodes"]:
            self.ports[node["index"]] = node["port"]
        if self.nodes_cpu is not None:
            try:
                for meta in self.cluster_dir.glob("nodes/*/node.json"):
                    self.nodes_cpu.add(json.loads(meta.read_text())["pid"])
            except OSError as e:  # (the nodes' CPU is then not counted: n/a in the report)
                say(f"bench: cannot count the nodes' CPU ({e})")
                self.nodes_cpu = None
        for line in (self.cluster_dir / "known_hosts").read_text().splitlines():
            alias, kind, key = line.split()[:3]
            self.hostkeys[int(alias.rsplit("-", 1)[1])] = (kind, key)
        (self.tmp / "known_hosts_ip").write_text(self.known_hosts_ip(self.ports))
        cfg = self.vtool("ssh-config")
        (self.tmp / "ssh_config").write_text(cfg.stdout)
        self.ansible_dir.mkdir(parents=True, exist_ok=True)
        self.ansible_cp.mkdir(parents=True, exist_ok=True)

    def terminate(self) -> None:
        close_masters(self.home / "cm")
        close_masters(self.ansible_cp)
        try:
            r = self.vtool("terminate", "--yes", timeout=300)
            ok = r.returncode == 0
            if not ok:
                say(f"vtool terminate failed (exit {r.returncode}): {r.stderr.strip()}")
        except subprocess.TimeoutExpired:
            ok = False
            say("vtool terminate timed out")
        if not ok:  # stop the sshd processes vtool started for us, by their recorded pid
            for meta in self.cluster_dir.glob("nodes/*/node.json"):
                pid = json.loads(meta.read_text()).get("pid")
                st = _stat(pid) if pid else None
                if st and st[0] == "sshd":
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            mine = str(self.home).encode() in f.read()
                        if mine:
                            os.kill(pid, signal.SIGTERM)
                    except OSError:
                        pass
        reap()

    # files the peers read; with ``ports`` (index -> port: the byte counters of workload 6)
    # they connect there instead of to the nodes' own ports, written anew each time.
    def cluster_file(self, n: int, ports: dict[int, int] | None = None) -> Path:
        tag = "" if ports is None else "-counted"
        path = self.tmp / f"cluster-{n}{tag}.json"
        if ports is not None or not path.exists():
            via = self.ports if ports is None else ports
            known = self.tmp / f"known_hosts_ip{tag}"
            if ports is not None:
                known.write_text(self.known_hosts_ip(via))
            nodes = [
                {"index": i, "alias": f"{CLUSTER}-{i}", "port": via[i], "hostkey": self.hostkeys[i][1]}
                for i in range(n)
            ]
            path.write_text(
                json.dumps(
                    {
                        "name": CLUSTER,
                        "user": _user(),
                        "key": str(self.cluster_dir / "id_ed25519"),
                        "known_hosts_ip": str(known),
                        "nodes": nodes,
                    }
                )
            )
        return path

    def ssh_config(self, ports: dict[int, int] | None = None) -> Path:
        """``vtool ssh-config``'s file, or a copy of it whose ``Port`` lines name ``ports``
        (host keys are still checked: every block has ``HostKeyAlias``)."""
        path = self.tmp / "ssh_config"
        if ports is None:
            return path
        out, index = [], None
        for ln in path.read_text().splitlines():
            m = re.match(rf"^Host {CLUSTER}-(\d+)$", ln)
            if m:
                index = int(m.group(1))
            elif index in ports and re.match(r"^\s+Port \d+$", ln):
                ln = f"  Port {ports[index]}"
            out.append(ln)
        counted = self.tmp / "ssh_config-counted"
        counted.write_text("\n".join(out) + "\n")
        return counted

    def counted_env(self, ports: dict[int, int]) -> dict[str, str]:
        """The environment for a vtool command whose SSH connections go through ``ports``:
        bench/vtool_bench_proxy.py as a plugin (an entry point in a folder on PYTHONPATH, only
        for these commands), told where the ports are by VTOOL_BENCH_PROXY_PORTS."""
        site = self.tmp / "counted-site"
        if not site.exists():
            dist = site / "vtool_bench_proxy-0.1.dist-info"
            dist.mkdir(parents=True)
            (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vtool-bench-proxy\nVersion: 0.1\n")
            (dist / "entry_points.txt").write_text("[vtool]\nbenchproxy = vtool_bench_proxy\n")
            shutil.copy(HERE / "vtool_bench_proxy.py", site / "vtool_bench_proxy.py")
        table = self.tmp / "counted-ports.json"
        table.write_text(json.dumps({"cluster": CLUSTER, "ports": {str(i): p for i, p in ports.items()}}))
        return {**self.env, "PYTHONPATH": str(site), "VTOOL_BENCH_PROXY_PORTS": str(table)}

    @property
    def ansible_dir(self) -> Path:
        return self.tmp / "ansible"

    @property
    def ansible_cp(self) -> Path:
        return self.tmp / "acp"

    def inventory(self, n: int, ports: dict[int, int] | None = None) -> Path:
        path = self.ansible_dir / f"inventory-{n}{'' if ports is None else '-counted'}.ini"
        via = self.ports if ports is None else ports
        if ports is not None or not path.exists():
            kh = self.cluster_dir / "known_hosts"
            lines = ["[nodes]"]
            for i in range(n):
                common = (
                    f"-o UserKnownHostsFile={kh} -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes "
                    f"-o HostKeyAlias=vtool-{CLUSTER}-{i} -o IdentitiesOnly=yes -o BatchMode=yes"
                )
                lines.append(
                    f"{CLUSTER}-{i} ansible_host=127.0.0.1 ansible_port={via[i]} node_index={i} "
                    f"node_home={self.cluster_dir}/nodes/{i}/home ansible_ssh_common_args={shlex.quote(common)}"
                )
            lines += [
                "[nodes:vars]",
                f"ansible_user={_user()}",
                f"ansible_ssh_private_key_file={self.cluster_dir / 'id_ed25519'}",
                "ansible_python_interpreter=/usr/bin/python3",
            ]
            path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def ansible_env(self) -> dict[str, str]:
        return {
            **self.env,
            "ANSIBLE_CONFIG": str(self.ansible_dir / "none.cfg"),
            "ANSIBLE_HOME": str(self.ansible_dir / "home"),
            "ANSIBLE_LOCAL_TEMP": str(self.ansible_dir / "tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.ansible_cp),
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_TIMEOUT": "30",
            "ANSIBLE_LOCALHOST_WARNING": "False",
            "ANSIBLE_DEPRECATION_WARNINGS": "False",
            "ANSIBLE_NOCOLOR": "1",
        }

    def cold(self) -> None:
        close_masters(self.home / "cm")
        close_masters(self.ansible_cp)
        # and the connections vtool's nodes keep to each other (remote.prepare's ``warm``)
        for cm in self.cluster_dir.glob("nodes/*/home/.vtool/cm"):
            close_masters(cm)

    def record(self, workload: str, key: tuple[str, ...], sample: Sample) -> None:
        mark = "ok" if sample.ok else f"FAILED: {sample.note}"
        if self.sampling:
            self.memory.setdefault(workload, {})[key] = sample
            say(f"  {' '.join(key):<52} memory {sample.memory_mb:7.1f} MB, largest {sample.largest_mb:6.1f} MB  {mark}")
        else:
            self.results.setdefault(workload, {}).setdefault(key, []).append(sample)
            cpu = f"cpu {sample.cpu:6.2f}s  nodes {sample.node_cpu:6.2f}s"
            say(f"  {' '.join(key):<52} {sample.wall:7.3f}s  {cpu}  {mark}")

    def measure(
        self, argv: list[str], check, env: dict[str, str] | None = None, stdin_text: str | None = None
    ) -> Sample:  # type: ignore[no-untyped-def]
        logdir = self.tmp / "log"
        logdir.mkdir(exist_ok=True)
        return measure(
            argv,
            env=env or self.env,
            cwd=self.tmp,
            timeout=self.timeout,
            check=check,
            stdin_text=stdin_text,
            logdir=logdir,
            memory=self.sampling,
            client=self.client_cpu,
            nodes=self.nodes_cpu,
        )


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def say(text: str) -> None:
    print(text, flush=True)


@functools.cache
def vtool_kex() -> str:
    """The key exchange vtool's connections agree on: the first of its default ``ssh.kex``. The
    tuned ``xargs + ssh`` rows ask ssh for the same one, so they differ from vtool only in the
    tool, never in the cryptography."""
    from vtool.config import VTOOL_DEFAULTS

    return str(VTOOL_DEFAULTS["ssh"]["kex"]).split(",")[0]


def xargs_kex_name() -> str:
    return f"xargs -P + ssh ({vtool_kex()})"


# -- workload 1: run hostname -------------------------------------------------------------


# The reference row of workload 1 (bench/floor.py): neither vtool nor a peer.
FLOOR = "floor: Python + vtool's connections (reference)"


def run_tools(b: Bench, n: int) -> dict[str, Callable[[], Sample]]:
    """One small function per tool: run ``hostname`` on nodes 0..n-1 once."""
    aliases = [f"{CLUSTER}-{i}" for i in range(n)]
    py = sys.executable
    cfile = str(b.cluster_file(n))
    ssh_cfg = str(b.tmp / "ssh_config")
    hosts = "".join(a + "\n" for a in aliases)

    def vtool() -> Sample:
        return b.measure(
            [str(BIN / "vtool"), "run", "hostname", "-c", CLUSTER, "--nodes", f"0-{n - 1}"], check_vtool_run(n)
        )

    def pssh() -> Sample:
        return b.measure([py, str(HERE / "peers.py"), "pssh", "run", cfile], check_aliases(aliases, HOSTNAME))

    def fabric() -> Sample:
        return b.measure([py, str(HERE / "peers.py"), "fabric", "run", cfile], check_aliases(aliases, HOSTNAME))

    def ansible() -> Sample:
        argv = [str(BIN / "ansible"), "all", "-i", str(b.inventory(n)), "-m", "command", "-a", "hostname", "-f", str(n)]
        return b.measure(argv, check_ansible(aliases), env=b.ansible_env)

    def xargs_ssh() -> Sample:
        argv = ["xargs", "-P", str(n), "-I{}", "ssh", "-F", ssh_cfg, "-o", "BatchMode=yes", "{}", "hostname"]
        return b.measure(argv, check_count(n), stdin_text=hosts)

    def xargs_ssh_kex() -> Sample:
        argv = ["xargs", "-P", str(n), "-I{}", "ssh", "-F", ssh_cfg, "-o", "BatchMode=yes"]
        argv += ["-o", f"KexAlgorithms={vtool_kex()}", "{}", "hostname"]
        return b.measure(argv, check_count(n), stdin_text=hosts)

    def floor() -> Sample:
        argv = [py, str(HERE / "floor.py"), "run", "hostname", "-c", CLUSTER, "--nodes", f"0-{n - 1}"]
        return b.measure(argv, check_vtool_run(n))

    return {
        "vtool run": vtool,
        FLOOR: floor,
        "parallel-ssh": pssh,
        "Fabric ThreadingGroup": fabric,
        "ansible -m command": ansible,
        "xargs -P + ssh": xargs_ssh,
        xargs_kex_name(): xargs_ssh_kex,
    }


def inprocess_tools(b: Bench, n: int) -> dict[str, Callable[[], Sample]]:
    """The second command on the same client, inside one Python process."""
    aliases = [f"{CLUSTER}-{i}" for i in range(n)]
    cfile = str(b.cluster_file(n))

    def second(tool: str) -> Callable[[], Sample]:
        def go() -> Sample:
            s = b.measure(
                [sys.executable, str(HERE / "peers.py"), tool, "run2", cfile], check_aliases(aliases, HOSTNAME)
            )
            m = re.search(r"^SECOND ([0-9.]+)$", (b.tmp / "log" / "stdout").read_text(), re.M)
            if m is None:
                return Sample(0.0, float("nan"), False, s.note or "no SECOND line")
            return Sample(float(m.group(1)), float("nan"), s.ok, s.note)

        return go

    return {
        "vtool API (Cluster.run)": second("vtool-api"),
        "parallel-ssh": second("pssh"),
        "Fabric ThreadingGroup": second("fabric"),
    }


def workload_run(b: Bench, sizes: list[int]) -> None:
    for n in sizes:
        say(f"\n== workload 1: run hostname on {n} nodes, {b.runs} runs ==")
        tools = run_tools(b, n)
        inproc = inprocess_tools(b, n)
        warm_up(b, {**tools, **{f"{k} (in-process)": v for k, v in inproc.items()}})
        names = list(tools)
        for r in range(b.runs):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                b.cold()
                b.record("run", (str(n), "cold", name), tools[name]())
                b.record("run", (str(n), "warm", name), tools[name]())
            for name, go in inproc.items():
                b.cold()
                b.record("run", (str(n), "warm, same client in one process", name), go())
        memory_run(b, "run", str(n), tools)
        say(render_table(b, "run", only=str(n)))


# -- packages for workloads 2, 3, 4 and 6 ---------------------------------------------------

LAUNCHER = "#!/bin/sh\ntrue\n"
PEER_DIRS = ("p-pssh", "p-fabric", "p-ansible", "p-ssh", "p-rsync")  # each peer's target folder on a node
WORDS = (
    "self", "value", "items", "config", "node", "result", "index", "data", "path", "name", "count", "start",
    "stop", "client", "server", "request", "response", "buffer", "offset", "length", "cache", "state", "event",
    "handler", "options", "record", "table", "column", "batch", "shard", "tensor", "weight", "gradient", "layer",
    "model", "loss", "metric", "epoch", "step", "rate", "seed", "sample", "token", "frame", "signal", "window",
)  # fmt: skip


def _pack(folder: Path, store: Path) -> Package:
    """vtool's archive (``vtool.package.build_release`` into a store of the bench's: byte for
    byte what ``vtool inject`` sends) and the peers' .tar.gz (``vtool.package.make_package``,
    gzip -6 like ``tar czf``), both written once, untimed."""
    from vtool import package as vtool_package

    release = vtool_package.build_release(folder, store)
    tarball = vtool_package.make_package(folder, store.parent / "peer-tarballs" / f"{release.dirname}.tar.gz")
    files = {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    sent = vtool_package.zstd_archive(release) or Path(release.archive)  # (as inject picks it: this machine has zstd)
    return Package(folder, tarball, sent, release.dirname, files)


def _launcher(folder: Path) -> None:
    (folder / "vtool-launch").write_text(LAUNCHER)
    (folder / "vtool-launch").chmod(0o755)


def big_package(b: Bench, mb: int) -> Package:
    """``bigpkg/``: a trivial vtool-launch and big.bin, mb MB of random (incompressible) bytes."""
    key = f"big-{mb}"
    if key not in b.packages:
        folder = b.tmp / "pkg-big" / "bigpkg"
        folder.mkdir(parents=True)
        _launcher(folder)
        (folder / "big.bin").write_bytes(os.urandom(mb * 2**20))
        b.packages[key] = _pack(folder, b.tmp / "store")
    return b.packages[key]


def _source_file(rng: random.Random, k: int, size: int) -> str:
    """Pseudo-Python: repetitive code (compresses well) with a hex constant in every function
    (compresses poorly), about ``size`` bytes."""
    lines = [
        f'"""Module {k}, generated for the vtool benchmark (deterministic pseudo-source)."""',
        "",
        "from __future__ import annotations",
        "",
        "import os",
        "",
    ]
    n = sum(len(x) + 1 for x in lines)
    while n < size:
        w = rng.choices(WORDS, k=6)
        block = [
            "",
            f"def {w[0]}_{w[1]}_{rng.randrange(100000)}({w[2]}, {w[3]}=None):",
            f'    """Return the {w[4]} of {w[2]} for each {w[5]}."""',
            f"    {w[4]} = {w[2]}.get({w[3]!r}, {rng.randrange(1000)})",
            f"    if {w[4]} is None:",
            f'        raise ValueError("no {w[4]} in " + str({w[2]}))',
            f'    key = "{rng.randbytes(32).hex()}"',
            f"    return [{w[5]} * {rng.randrange(100)} for {w[5]} in range({rng.randrange(1, 64)})], key",
        ]
        lines += block
        n += sum(len(x) + 1 for x in block)
    return "\n".join(lines) + "\n"


def source_trees(b: Bench, files: int, mb: float) -> tuple[Package, Package]:
    """``srcpkg/``: ``files`` .py files in folders of 40, about ``mb`` MB in all, the same text
    at every run (a fixed seed); and a copy of it with one file changed (a line appended; the
    other files keep their modification times, as in a checkout where one file was edited)."""
    key = f"tree-{files}-{mb}"
    if key not in b.packages:
        original = b.tmp / "tree-a" / "srcpkg"
        rng = random.Random(1)
        average = mb * 2**20 / files
        for k in range(files):
            path = original / f"pkg{k // 40:02d}" / f"mod_{k:04d}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_source_file(rng, k, int(average * rng.uniform(0.3, 1.7))))
        _launcher(original)
        changed = b.tmp / "tree-b" / "srcpkg"
        shutil.copytree(original, changed)  # copy2: the modification times too
        with open(changed / "pkg00" / "mod_0007.py", "a") as f:
            f.write("\n# changed for the re-inject benchmark\n")
        b.packages[key] = _pack(original, b.tmp / "store")
        b.packages[key + "-changed"] = _pack(changed, b.tmp / "store")
    return b.packages[key], b.packages[key + "-changed"]


TRASH = ".bench-trash"  # in every node's home: what clean_nodes moved out of the way
TRASH_FLOOR = 12 * 2**30  # empty the trash when less than this is free
SETTLE = 61  # ext4 without a journal treats a deleted inode as recently deleted for 60 s


def clean_nodes(b: Bench, names: Iterable[str]) -> None:
    """Every node as before any inject (untimed): no vtool release and no kept payload
    (``~/.vtool/releases/*``, ``~/.vtool/packages/*``), no ``~/NAME`` link, and every peer's
    target folder empty (it exists: ansible's unarchive wants it to).

    Nothing is deleted here: it is moved into the node's trash folder (``empty_trash``
    deletes it when the disk runs low), then written to the disk (sync). Why: the report's
    paragraph on "Removed" (write_report); ``perf`` showed the kernel's ``recently_deleted``
    taking 80% of the CPU while 32 nodes unpacked 900 files each right after a delete."""
    if shutil.disk_usage(b.tmp).free < TRASH_FLOOR:
        empty_trash(b)
    b.trashed += 1
    for i in b.ports:
        home = b.node_home(i)
        trash = home / TRASH / str(b.trashed)
        moved: list[str] = []
        for sub in (".vtool/releases", ".vtool/packages"):
            try:
                moved += [e.path for e in os.scandir(home / sub)]
            except FileNotFoundError:
                continue
        moved += [str(home / name) for name in names if (home / name).is_symlink()]
        moved += [str(home / d) for d in PEER_DIRS if (home / d).exists()]
        if moved:
            trash.mkdir(parents=True, exist_ok=True)
        for k, path in enumerate(moved):
            os.rename(path, trash / f"{k}-{os.path.basename(path)}")
        for d in PEER_DIRS:
            (home / d).mkdir()
    # And what the last run wrote goes to the disk now, untimed: kept (not deleted), the
    # runs' writes would pile up in the page cache until the kernel throttles every writer
    # (a 20 MB inject into 32 nodes writes 1.3 GB), and a run would measure its predecessors.
    os.sync()


def empty_trash(b: Bench) -> None:
    """Delete what clean_nodes moved aside, then let the deletes age (see clean_nodes)."""
    folders = [f for f in (b.node_home(i) / TRASH for i in b.ports) if f.exists()]
    if not folders:
        return
    say(f"  (emptying the nodes' trash, then waiting {SETTLE} s for the file system)")
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    os.sync()
    time.sleep(SETTLE)


# -- workloads 2, 3, 4: inject ----------------------------------------------------------------


def inject_tools(b: Bench, n: int, ports: dict[int, int] | None = None) -> dict[str, Callable[[Package], Sample]]:
    """One function per tool: put a package on nodes 0..n-1. vtool injects the folder (and
    starts its vtool-launch); the peers upload vtool's tarball of it and unpack it into their
    own folder ``~/p-TOOL``; rsync copies the folder there. ``ports``: connect to these (the
    byte counters) instead of the nodes' own ports."""
    aliases = [f"{CLUSTER}-{i}" for i in range(n)]
    hosts = "".join(a + "\n" for a in aliases)
    homes = [b.node_home(i) for i in range(n)]
    py = sys.executable
    cfile = str(b.cluster_file(n, ports))
    ssh = f"ssh -F {b.ssh_config(ports)} -o BatchMode=yes"
    vtool_env = b.env if ports is None else b.counted_env(ports)

    def into(folder: str, pkg: Package) -> Callable[[int, str, str], str | None]:
        return check_tree(pkg, [h / folder / pkg.name for h in homes])

    def vtool(pkg: Package) -> Sample:
        argv = [str(BIN / "vtool"), "inject", str(pkg.folder), "-c", CLUSTER, "--nodes", f"0-{n - 1}"]
        roots = [h / ".vtool" / "releases" / pkg.dirname for h in homes]
        return b.measure(argv, check_tree(pkg, roots, links=[h / pkg.name for h in homes]), env=vtool_env)

    def pssh(pkg: Package) -> Sample:
        argv = [py, str(HERE / "peers.py"), "pssh", "put", cfile, str(pkg.tarball), "p-pssh"]
        return b.measure(argv, into("p-pssh", pkg))

    def fabric(pkg: Package) -> Sample:
        argv = [py, str(HERE / "peers.py"), "fabric", "put", cfile, str(pkg.tarball), "p-fabric"]
        return b.measure(argv, into("p-fabric", pkg))

    def ansible(pkg: Package) -> Sample:
        argv = [str(BIN / "ansible"), "all", "-i", str(b.inventory(n, ports)), "-m", "unarchive", "-f", str(n)]
        argv += ["-a", f"src={pkg.tarball} dest={{{{ node_home }}}}/p-ansible"]
        return b.measure(argv, into("p-ansible", pkg), env=b.ansible_env)

    def xargs_ssh(pkg: Package) -> Sample:
        remote = shlex.quote("mkdir -p p-ssh && tar -xzf - -C p-ssh")
        script = f'exec {ssh} "$1" {remote} < {shlex.quote(str(pkg.tarball))}'
        argv = ["xargs", "-P", str(n), "-I{}", "sh", "-c", script, "sh", "{}"]
        return b.measure(argv, into("p-ssh", pkg), stdin_text=hosts)

    def rsync(pkg: Package) -> Sample:
        argv = ["xargs", "-P", str(n), "-I{}", "rsync", "-az", "-e", ssh, str(pkg.folder), "{}:p-rsync/"]
        return b.measure(argv, into("p-rsync", pkg), stdin_text=hosts)

    return {
        "vtool inject": vtool,
        "parallel-ssh scp_send + tar": pssh,
        "Fabric put + tar": fabric,
        "ansible -m unarchive": ansible,
        "xargs -P + ssh tar": xargs_ssh,
        "xargs -P + rsync -az": rsync,
    }


def _inject_once(
    b: Bench, go: Callable[[Package], Sample], name: str, pkg: Package, base: Package | None, sampling: bool = False
) -> Sample:
    """From a clean state (and with ``base`` put there by the same tool, untimed), cold: put pkg."""
    clean_nodes(b, {pkg.name, *([base.name] if base else [])})
    if base is not None:
        s = go(base)
        if not s.ok:
            say(f"  baseline for {name}: FAILED: {s.note}")
    b.cold()
    b.sampling = sampling
    try:
        return go(pkg)
    finally:
        b.sampling = False


def measure_injects(
    b: Bench,
    workload: str,
    n: int,
    mode: str,
    tools: dict[str, Callable[[Package], Sample]],
    pkg: Package,
    base: Package | None = None,
) -> None:
    """An untimed warm-up run of every tool, b.runs timed runs (the order rotates), and one
    more run that samples memory; each run from a clean state (see ``_inject_once``)."""
    warm_up(b, {name: functools.partial(_inject_once, b, go, name, pkg, base) for name, go in tools.items()})
    names = list(tools)
    for r in range(b.runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            b.record(workload, (str(n), mode, name), _inject_once(b, tools[name], name, pkg, base))
    say("  (memory)")
    for name in names:
        s = _inject_once(b, tools[name], name, pkg, base, sampling=True)
        b.sampling = True
        b.record(workload, (str(n), mode, name), s)
        b.sampling = False
    b.cold()
    clean_nodes(b, {pkg.name, *([base.name] if base else [])})


def workload_inject(b: Bench, sizes: list[int], mb: int) -> None:
    pkg = big_package(b, mb)
    b.labels["inject"] = f"inject {mb} MB"
    b.labels["cluster"] = str(len(b.ports))
    b.labels["inject-desc"] = (
        f"The package `{pkg.name}/` holds a trivial `vtool-launch` and `big.bin`, {mb} MB of random bytes "
        f"({pkg.size / 2**20:.2f} MB as vtool's {pkg.kind}; the tar peers upload a .tar.gz of "
        f"{pkg.tarball.stat().st_size / 2**20:.2f} MB; rsync copies the folder)."
    )
    for n in sizes:
        say(f"\n== workload 2: inject of a {mb} MB incompressible package into {n} nodes, {b.runs} runs ==")
        measure_injects(b, "inject", n, "cold", inject_tools(b, n), pkg)
        say(render_table(b, "inject", only=str(n)))


def workload_tree(b: Bench, n: int, files: int, mb: float) -> None:
    pkg, _ = source_trees(b, files, mb)
    b.labels["tree"] = "inject source tree"
    b.labels["cluster"] = str(len(b.ports))
    raw = sum((pkg.folder / rel).stat().st_size for rel in pkg.files)
    b.labels["tree-desc"] = (
        f"The package `{pkg.name}/` holds {files} generated .py files and a trivial `vtool-launch`, "
        f"{raw / 2**20:.1f} MB in all ({pkg.size / 2**20:.2f} MB as vtool's {pkg.kind}, "
        f"{pkg.tarball.stat().st_size / 2**20:.2f} MB as the peers' .tar.gz): the same text at every "
        "run, repetitive code with a random hex constant in every function."
    )
    say(f"\n== workload 3: inject of a source tree ({files} files, {mb:g} MB) into {n} nodes, {b.runs} runs ==")
    measure_injects(b, "tree", n, "cold", inject_tools(b, n), pkg)
    say(render_table(b, "tree"))


def workload_reinject(b: Bench, n: int, files: int, mb: float) -> None:
    original, changed = source_trees(b, files, mb)
    b.labels["reinject"] = "re-inject source tree"
    say(f"\n== workload 4: re-inject of the source tree into {n} nodes, {b.runs} runs ==")
    tools = inject_tools(b, n)
    measure_injects(b, "reinject", n, "unchanged", tools, original, base=original)
    measure_injects(b, "reinject", n, "one file changed", tools, changed, base=original)
    say(render_table(b, "reinject"))


# -- workload 5: scpgetall ----------------------------------------------------------------


def workload_get(b: Bench, n: int, mb: int) -> None:
    say(f"\n== workload 5: scpgetall of a {mb} MB file from {n} nodes, {b.runs} runs ==")
    digests = {}
    for i in range(n):
        data = os.urandom(mb * 2**20)
        (b.cluster_dir / "nodes" / str(i) / "home" / "big.bin").write_bytes(data)
        digests[i] = hashlib.sha256(data).hexdigest()
    aliases = [f"{CLUSTER}-{i}" for i in range(n)]
    py = sys.executable
    cfile = str(b.cluster_file(n))
    out = b.tmp / "fetched"

    def fresh() -> Path:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        return out

    def vtool() -> Sample:
        d = fresh()
        argv = [str(BIN / "vtool"), "scpgetall", "big.bin", str(d / "r"), "-c", CLUSTER, "--nodes", f"0-{n - 1}"]
        return b.measure(argv, check_files({d / f"r.{i}": h for i, h in digests.items()}))

    def pssh() -> Sample:
        d = fresh()
        return b.measure(
            [py, str(HERE / "peers.py"), "pssh", "get", cfile, "big.bin", str(d)],
            check_files({d / f"r.{i}": h for i, h in digests.items()}),
        )

    def fabric() -> Sample:
        d = fresh()
        return b.measure(
            [py, str(HERE / "peers.py"), "fabric", "get", cfile, "big.bin", str(d)],
            check_files({d / f"r.{b.ports[i]}": h for i, h in digests.items()}),
        )

    def ansible() -> Sample:
        d = fresh()
        argv = [str(BIN / "ansible"), "all", "-i", str(b.inventory(n)), "-m", "fetch", "-f", str(n)]
        argv += ["-a", f"src={{{{ node_home }}}}/big.bin dest={d}/r.{{{{ node_index }}}} flat=yes"]
        return b.measure(argv, check_files({d / f"r.{i}": h for i, h in digests.items()}), env=b.ansible_env)

    def xargs_scp() -> Sample:
        d = fresh()
        argv = ["xargs", "-P", str(n), "-I{}", "scp", "-q", "-F", str(b.tmp / "ssh_config"), "-o", "BatchMode=yes"]
        argv += ["{}:big.bin", f"{d}/{{}}"]
        return b.measure(
            argv,
            check_files({d / f"{CLUSTER}-{i}": h for i, h in digests.items()}),
            stdin_text="".join(a + "\n" for a in aliases),
        )

    tools = {
        "vtool scpgetall": vtool,
        "parallel-ssh copy_remote_file": pssh,
        "Fabric ThreadingGroup.get": fabric,
        "ansible -m fetch": ansible,
        "xargs -P + scp": xargs_scp,
    }
    warm_up(b, tools)
    names = list(tools)
    for r in range(b.runs):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            b.cold()
            b.record("get", (str(n), "cold", name), tools[name]())
            b.record("get", (str(n), "warm", name), tools[name]())
    memory_run(b, "get", str(n), tools)
    shutil.rmtree(out, ignore_errors=True)
    for i in range(n):
        (b.cluster_dir / "nodes" / str(i) / "home" / "big.bin").unlink(missing_ok=True)
    say(render_table(b, "get"))


# -- workload 7: start-up -----------------------------------------------------------------


def workload_help(b: Bench, runs: int) -> None:
    say(f"\n== workload 7: start-up time, {runs} runs ==")
    tools = {
        "vtool --help": ([str(BIN / "vtool"), "--help"], check_help("Usage")),
        "inv --help": ([str(BIN / "inv"), "--help"], check_help("Usage")),
        "python -c pass (reference)": (
            [sys.executable, "-c", "pass"],
            lambda rc, o, e: None if rc == 0 else f"exit {rc}",
        ),
    }
    empty = b.tmp / "empty"
    empty.mkdir(exist_ok=True)
    for r in range(-1, runs + 1):  # run -1 warms up; the last run measures memory
        b.sampling = r == runs
        for name, (argv, check) in tools.items():
            s = measure(argv, env=b.env, cwd=empty, timeout=60, check=check, logdir=b.tmp / "log", memory=b.sampling)
            if r >= 0:
                b.record("help", ("-", "-", name), s)
    b.sampling = False
    say(render_table(b, "help", columns=("tool",)))


# -- workload 6: client bytes -------------------------------------------------------------


class ByteCounter:
    """A TCP forwarder per node, listening on an ephemeral port of 127.0.0.1 and forwarding
    to the node's sshd, that counts the bytes going each way (and the connections). Runs an
    asyncio loop in a thread of the bench process, so its CPU is not the client's."""

    def __init__(self, targets: dict[int, int]) -> None:
        self.targets = dict(targets)
        self.ports: dict[int, int] = {}
        self.sent = self.received = self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-bytes", daemon=True)
        self._servers: list[asyncio.AbstractServer] = []
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> ByteCounter:
        self._thread.start()
        self._call(self._listen())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def reset(self) -> None:
        async def zero() -> None:
            self.sent = self.received = self.connections = 0

        self._call(zero())

    def totals(self) -> tuple[int, int, int]:
        async def read() -> tuple[int, int, int]:
            return self.sent, self.received, self.connections

        return self._call(read())

    async def _listen(self) -> None:
        for i, port in sorted(self.targets.items()):
            server = await asyncio.start_server(functools.partial(self._serve, port), "127.0.0.1", 0, backlog=1024)
            self._servers.append(server)
            self.ports[i] = server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for w in list(self._writers):
            w.close()

    async def _serve(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False))
        for w in (writer, up_writer):
            w.close()
            self._writers.discard(w)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        try:
            while data := await reader.read(1 << 18):
                if up:
                    self.sent += len(data)
                else:
                    self.received += len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.close()  # and so the other direction ends too


def workload_bytes(b: Bench, sizes: list[int], mb: int, tree_n: int, tree: tuple[Package, Package] | None) -> None:
    """Every tool once per row, through the byte counters: inject of the mb MB package into
    each size, and (when the source tree is made) its re-inject, unchanged and with one file
    changed, into tree_n nodes. vtool reaches the counters through bench/vtool_bench_proxy.py;
    the nodes relay to each other at their own ports, which are not counted."""
    big = big_package(b, mb)
    b.labels["sizes"] = f"the {mb} MB package: {big.size / 2**20:.2f} MB" + (
        f"; the source tree: {tree[0].size / 2**20:.2f} MB" if tree else ""
    )
    rows: list[tuple[str, int, Package, Package | None]] = [(f"{mb} MB package", n, big, None) for n in sizes]
    if tree is not None:
        rows += [("source tree, unchanged", tree_n, tree[0], tree[0])]
        rows += [("source tree, one file changed", tree_n, tree[1], tree[0])]
    say("\n== workload 6: client bytes sent by inject, one run of every tool per row ==")
    with ByteCounter(b.ports) as counter:
        try:
            for mode, n, pkg, base in rows:
                tools = inject_tools(b, n, counter.ports)
                for name, go in tools.items():
                    clean_nodes(b, {pkg.name, *([base.name] if base else [])})
                    if base is not None:
                        s = go(base)
                        if not s.ok:
                            say(f"  baseline for {name}: FAILED: {s.note}")
                    b.cold()
                    counter.reset()
                    s = go(pkg)
                    sent, received, conns = counter.totals()
                    if s.ok and conns == 0:
                        s = Sample(s.wall, s.cpu, False, "no connection went through the byte counter")
                    b.traffic[(mode, str(n), name)] = Traffic(s, sent, received, conns, pkg.size)
                    mark = "ok" if s.ok else f"FAILED: {s.note}"
                    say(
                        f"  {mode:<30} {n:>3} {name:<28} sent {sent / 2**20:8.2f} MB ({sent / pkg.size:5.2f}x) "
                        f"in {conns} connections, {s.wall:6.2f}s  {mark}"
                    )
        finally:
            b.cold()  # close the shared connections that go through the counters first
    clean_nodes(b, {big.name, *([tree[0].name] if tree else [])})
    say(render_traffic(b))


# -- workload 8: run true on many nodes -----------------------------------------------------


def workload_scale(b: Bench, n: int, runs: int) -> None:
    say(f"\n== scale: run true on {n} nodes, {runs} runs ==")
    aliases = [f"{CLUSTER}-{i}" for i in range(n)]
    hosts = "".join(a + "\n" for a in aliases)
    cfile = str(b.cluster_file(n))
    ssh_cfg = str(b.ssh_config())

    def vtool() -> Sample:
        argv = [str(BIN / "vtool"), "run", "true", "-c", CLUSTER, "--nodes", f"0-{n - 1}"]
        return b.measure(argv, check_scale(check_exit(n, summary_line=True)))

    def pssh() -> Sample:
        argv = [sys.executable, str(HERE / "peers.py"), "pssh", "exit", cfile, "true"]
        return b.measure(argv, check_scale(check_aliases(aliases, "exit 0")))

    def xargs_ssh_kex() -> Sample:
        argv = ["xargs", "-P", str(n), "-I{}", "ssh", "-F", ssh_cfg, "-o", "BatchMode=yes"]
        argv += ["-o", f"KexAlgorithms={vtool_kex()}", "{}", "true"]
        return b.measure(argv, check_scale(check_exit(n, summary_line=False)), stdin_text=hosts)

    tools = {"vtool run": vtool, "parallel-ssh": pssh, xargs_kex_name(): xargs_ssh_kex}
    warm_up(b, tools)
    names = list(tools)
    for r in range(runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            b.cold()
            b.record("scale", (str(n), "cold", name), tools[name]())
            b.record("scale", (str(n), "warm", name), tools[name]())
    memory_run(b, "scale", str(n), tools)
    say(render_table(b, "scale"))


def warm_up(b: Bench, tools: dict[str, Callable[[], Sample]]) -> None:
    """One untimed run of every tool: bytecode caches, page cache, the nodes' first logins."""
    for name, go in tools.items():
        b.cold()
        s = go()
        if not s.ok:
            say(f"  warm-up {name}: FAILED: {s.note}")
    b.cold()


def memory_run(b: Bench, workload: str, n: str, tools: dict[str, Callable[[], Sample]]) -> None:
    """One more cold and warm run of every tool, untimed, sampling memory."""
    say("  (memory)")
    b.sampling = True
    try:
        for name, go in tools.items():
            b.cold()
            b.record(workload, (n, "cold", name), go())
            b.record(workload, (n, "warm", name), go())
    finally:
        b.sampling = False
        b.cold()


# -- tables --------------------------------------------------------------------------------


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"  # nan -> n/a


def stats(samples: list[Sample], mem: Sample | None) -> dict[str, str]:
    good = [s for s in samples if s.ok]
    row = {"ok": f"{len(good)}/{len(samples)}"}
    if good:
        walls = [s.wall for s in good]
        row.update(
            median=_fmt(statistics.median(walls)),
            min=_fmt(min(walls)),
            max=_fmt(max(walls)),
            cpu=_fmt(statistics.median(s.cpu for s in good), 2),
            nodes_cpu=_fmt(statistics.median(s.node_cpu for s in good), 2),
        )
    else:
        row.update(median="failed", min="-", max="-", cpu="-", nodes_cpu="-")
    row["memory"] = _fmt(mem.memory_mb, 1) if mem and mem.ok else ("failed" if mem else "n/a")
    row["largest"] = _fmt(mem.largest_mb, 1) if mem and mem.ok else ("-" if mem else "n/a")
    notes = sorted({s.note for s in samples if not s.ok})
    if mem and not mem.ok:
        notes.append(f"memory run: {mem.note}")
    row["note"] = "; ".join(notes)[:300].replace("|", "/").replace("\n", " ")
    return row


def render_table(
    b: Bench, workload: str, only: str | None = None, columns: tuple[str, ...] = ("N", "mode", "tool")
) -> str:
    head = [*columns, "median s", "min s", "max s", "CPU s", "nodes CPU s", "memory MB", "largest process MB"]
    head += ["ok", "failures"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, samples in b.results.get(workload, {}).items():
        if only is not None and key[0] != only:
            continue
        st = stats(samples, b.memory.get(workload, {}).get(key))
        cells = list(key[-len(columns) :])
        if cells[-1].startswith("vtool"):
            cells[-1] = f"**{cells[-1]}**"
        cells += [st[k] for k in ("median", "min", "max", "cpu", "nodes_cpu", "memory", "largest", "ok", "note")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_traffic(b: Bench) -> str:
    head = ["package", "N", "tool", "client sent MB", "x package", "client received MB", "TCP connections"]
    head += ["wall s", "ok", "failures"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (mode, n, tool), t in b.traffic.items():
        name = f"**{tool}**" if tool.startswith("vtool") else tool
        note = t.sample.note[:300].replace("|", "/").replace("\n", " ")
        cells = [mode, n, name, f"{t.sent / 2**20:.2f}", f"{t.sent / t.package:.2f}x", f"{t.received / 2**20:.2f}"]
        cells += [str(t.connections), _fmt(t.sample.wall, 2), "yes" if t.sample.ok else "no", note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _both_cpu(samples: list[Sample]) -> str:
    """The median of the client's and the nodes' CPU seconds together (n/a where not measured)."""
    both = [s.cpu + s.node_cpu for s in samples if s.ok]
    both = [x for x in both if math.isfinite(x)]
    return _fmt(statistics.median(both), 2) if both else "n/a"


def summary(b: Bench) -> str:
    """vtool's median against the fastest peer's on every row (the issue's targets)."""
    lines = [
        "| workload | N | mode | vtool s | fastest peer | peer s | vtool / peer | target met "
        "| vtool CPU s, client + nodes | peer CPU s, client + nodes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {
        "run": "run hostname",
        "inject": b.labels.get("inject", "inject"),
        "tree": b.labels.get("tree", "inject source tree"),
        "reinject": b.labels.get("reinject", "re-inject source tree"),
        "get": "scpgetall",
        "scale": "run true",
    }
    for wl, label in labels.items():
        groups: dict[tuple[str, str], dict[str, list[Sample]]] = {}
        for (n, mode, tool), samples in b.results.get(wl, {}).items():
            groups.setdefault((n, mode), {})[tool] = samples
        for (n, mode), tools in groups.items():
            med = {t: statistics.median(s.wall for s in ss if s.ok) for t, ss in tools.items() if any(s.ok for s in ss)}
            mine = [t for t in med if t.startswith("vtool")]
            peers = {t: v for t, v in med.items() if not t.startswith("vtool") and t != FLOOR}
            if not mine or not peers:
                continue
            best = min(peers, key=lambda t: peers[t])
            v = med[mine[0]]
            ratio = v / peers[best]
            met = "yes" if ratio <= 1.0 else "no"
            if wl == "scale":  # the target here: no failure at 256 nodes (the time is shown)
                clean = all(s.ok for s in tools[mine[0]])
                met = "yes (no failures: the scale target)" if clean else "no (failures)"
            lines.append(
                f"| {label} | {n} | {mode} | {v:.3f} | {best} | {peers[best]:.3f} | {ratio:.2f} | {met} "
                f"| {_both_cpu(tools[mine[0]])} | {_both_cpu(tools[best])} |"
            )
    hs = b.results.get("help", {})
    v = [s.wall for s in hs.get(("-", "-", "vtool --help"), []) if s.ok]
    i = [s.wall for s in hs.get(("-", "-", "inv --help"), []) if s.ok]
    if v and i:
        ratio = statistics.median(v) / statistics.median(i)
        lines.append(
            f"| vtool --help | - | - | {statistics.median(v):.3f} | inv --help | {statistics.median(i):.3f} | "
            f"{ratio:.2f} | {'yes' if ratio <= 1.3 else 'no'} (target 1.3x) | n/a | n/a |"
        )
    return "\n".join(lines)


# -- the report ----------------------------------------------------------------------------


def tree_state() -> str:
    """Which vtool this is: the work tree's commit, and whether vtool/ had changes then."""

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return r.stdout.strip()

    dirty = " + uncommitted changes in vtool/" if git("status", "--porcelain", "--", "vtool") else ""
    return f"the work tree at commit {git('rev-parse', '--short', 'HEAD') or '?'}{dirty}"


def cpu_counting(b: Bench) -> str:
    """How the report's CPU seconds were counted (see CpuGroup)."""
    g = b.client_cpu or b.nodes_cpu
    if g is None:
        return "/proc times and wait4 (no control group could be made here); nodes CPU not measured"
    kind = "cgroup v2 cpu.stat" if g.v2 else "cgroup v1 cpuacct"
    if b.client_cpu is None:
        return f"the nodes' in a control group ({kind}); the client's by /proc times and wait4"
    if b.nodes_cpu is None:
        return f"the client's commands in a control group ({kind}); nodes CPU not measured"
    return f"control groups ({kind}): one for the client's commands, one for the nodes"


def machine(measured: str) -> list[tuple[str, str]]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for ln in f:
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False).stderr.strip()

    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return [
        ("vtool measured", measured),
        ("CPUs (nproc)", str(os.cpu_count())),
        ("CPU", cpu),
        ("memory", f"{mem_kb / 2**20:.1f} GiB"),
        ("kernel", platform.release()),
        ("OpenSSH", ssh_v),
        ("Python", platform.python_version()),
        (
            "tools",
            f"vtool {v('vtool')}, parallel-ssh {v('parallel-ssh')} (ssh2-python {v('ssh2-python')}), "
            f"Fabric {v('fabric')} (paramiko {v('paramiko')}), ansible-core {v('ansible-core')}, "
            f"invoke {v('invoke')}",
        ),
    ]


HOW = """\
## How each tool is used

Every tool uses the cluster's own key (`$VTOOL_HOME/clusters/bench/id_ed25519`) and talks
only to 127.0.0.1. Python peers run as a child process (`bench/peers.py`), so their times
include starting Python and importing the library, as vtool's CLI rows do.

| tool | how | host keys | key exchange | parallelism |
|---|---|---|---|---|
| vtool | `vtool run hostname --nodes 0-N-1`, `vtool scpgetall` | pinned, strict (the cluster's known_hosts) | {kex} (the first of vtool's default `ssh.kex`: OpenSSL's code, cheaper here than OpenSSH's own curve25519) | `concurrency` default 64; shared connections, opened while vtool starts: `run`'s by one process for all nodes (libssh2, `vtool/keeper.py`), packages' and files' by OpenSSH masters (ControlMaster); both stay open 300 s, and commands go to them directly, with no ssh process per command (`vtool/mux.py`) |
| parallel-ssh | `ParallelSSHClient(...).run_command`, `copy_remote_file` (SFTP) | **not verified before connecting**: parallel-ssh has no known_hosts option; the bench compares each server's key with the pinned one afterwards and fails the node on a mismatch | libssh2's default | `pool_size=N` |
| Fabric | `ThreadingGroup.from_connections(...)`, `.run`, `.get` (SFTP) | strict: `RejectPolicy` and a known_hosts file translated to `[127.0.0.1]:PORT` names | paramiko's default | one thread per node |
| ansible-core | `ansible all -i INVENTORY -m command -a hostname -f N`, `-m fetch` | strict: the cluster's known_hosts with `HostKeyAlias` per host | OpenSSH's default (sntrup761x25519) | `-f N`; pipelining on, interpreter given (both favour ansible); ControlPersist 60 s (its default) |
| xargs + ssh/scp | `xargs -P N -I{} ssh -F CONFIG {} hostname`, `scp` the same way; CONFIG is `vtool ssh-config` | strict (the cluster's known_hosts) | OpenSSH's default (sntrup761x25519); the `({kex})` row sets `KexAlgorithms={kex}`, vtool's, so that it differs from vtool only in the tool | `-P N`; no shared connections |

For the injects (workloads 2, 3, 4 and 6) every peer puts the package into a folder of its
own in the node's home (`~/p-TOOL/NAME`). All but rsync upload a `.tar.gz` of the folder
(`vtool mkpkg`: gzip -6, as `tar czf` makes) and unpack it with `tar -xzf`. vtool sends its
own archive: its zstd copy (level 3, made from its `.tar.gz` once, in its store), since this
machine and the nodes have `zstd` (`inject.zstd`), or a plain `.tar` when gzip would save
under 10%. Both are written once, untimed (the warm-up run makes vtool's zstd copy), so no
measured run packs:

| tool | how | parallelism |
|---|---|---|
| vtool | `vtool inject FOLDER --nodes 0-N-1`: the client sends the package once to one node, which passes it on to two others as it arrives, and so on down a binary tree (from 4 nodes and 1 MB up, `inject.relay`; each node keeps a copy, to pass on later, and unpacks it once complete, except a plain tar such as workload 2's, which only the first node keeps and the others unpack as it arrives), unpack it into `~/.vtool/releases/NAME-HASH`, point `~/NAME` at it and start its `vtool-launch` (here `true`); a node that has the release gets nothing, one that has the previous release a delta (under 1 MB, sent to each node directly) | `concurrency` 64 (default) |
| parallel-ssh | `ParallelSSHClient.scp_send(TARBALL, ...)`, then `run_command("mkdir -p D && tar -xzf ... -C D")` | `pool_size=N` |
| Fabric | `ThreadingGroup.put` (SFTP), then `ThreadingGroup.run` of the same `tar` | one thread per node |
| ansible-core | `ansible all -m unarchive -a "src=TARBALL dest=..." -f N` (copies the tarball, unpacks it) | `-f N` |
| xargs + ssh | `xargs -P N -I{} sh -c 'ssh -F CONFIG {} "mkdir -p D && tar -xzf - -C D" < TARBALL'` | `-P N` |
| rsync | `xargs -P N -I{} rsync -az -e "ssh -F CONFIG" FOLDER {}:D/` (SkyPilot's way, `-Pavz`, without its progress and listing); incremental by nature | `-P N` |

Every inject run starts from nodes that do not have the package: before it, untimed and
directly on the nodes' disks, `~/.vtool/releases/*`, `~/.vtool/packages/*` and the `~/NAME`
link are removed and every peer's folder is emptied (the re-inject rows then let the same tool
put the original tree there, untimed). The inject rows are all cold. Every run is checked on
disk: every file of the package, by SHA-256, in every node's copy.

"Removed" means moved into a trash folder in the node's home, which is deleted only when the
disk runs low, followed by a 61 s wait. On ext4 without a journal (this machine's root file
system), every file created within 60 s of a delete makes the kernel step over each recently
deleted inode (`recently_deleted` in `find_inode_bit`). Deleting the previous run's 28,800 files just
before a run made that run measure the delete, and the tool whose folder took the deleted
inodes' place paid most: vtool 7.6 s against 4.2 s, rsync 6.5 s against 5.6 s, in one
paired measurement of workload 3. (Earlier reports deleted before every run.) After the
move, `sync` writes the previous run's files to the disk, untimed, so that no run waits for
its predecessors' writes (deleted files were never written; kept ones would be).

Writing a file costs this machine (a virtual machine) far more when the page cache has to
grow into memory that was not used recently: `dd` of 2 GB of new files took 4.6 s of kernel
CPU (about 2.3 ms per MB), against 0.36 s right after the same amount had been deleted, and
2.4 s again once 65 s had passed since that delete. Since the trash keeps every earlier run's
files, every inject run writes into such memory, and each tool pays for the bytes its nodes
write. In four vtool injects of workload 2 in a row on 32 fresh nodes (measured with `perf`,
outside this bench), when every node still kept a copy of the package besides the unpacked
release, the CPU of the processes that write (perl for the kept copy, tar) grew from 1.2 s to
3.9 s and the run from 4.5 s to 6.6 s; since then only the first node of vtool's tree keeps
a copy of a plain tar (workload 2's package is one), so vtool's nodes write that package
once, as rsync's and the tar peers' do.

**Bytes (workload 6)**: the bench runs a TCP forwarder per node on 127.0.0.1 (an ephemeral
port, forwarding to the node's sshd), counting the bytes in each direction and the
connections. The peers are pointed at these ports (their cluster file, inventory and
`ssh_config` name them; host keys are checked as before, through `HostKeyAlias` or a
known_hosts file naming the new ports). vtool is pointed at them by a plugin,
`bench/vtool_bench_proxy.py` (the hook `vtool_node_address`), registered for those commands
only (an entry point in a folder put on their PYTHONPATH) and switched on by
`VTOOL_BENCH_PROXY_PORTS`. The nodes reach each other at their own ports, so vtool's relay
traffic between nodes is not counted as the client's. A run with no connection through the
forwarders fails.

**Scale**: `run true` on 256 nodes with `vtool run true` (cold and warm),
`ParallelSSHClient.run_command` (`pool_size=256`) and `xargs -P 256` + `ssh` ({kex}). A
run fails if any node fails, or if the output mentions too many open files or a refused or
reset connection.

**The floor row** of workload 1 (`{floor}`, `bench/floor.py`) is neither vtool nor a
peer, and no target: a Python process that opens the nodes' connections exactly as `vtool run`
does while it starts (the same keeper process, from the record vtool's warm-up run wrote),
runs `hostname` on each node through it (no `ssh` process per command) and prints
`[INDEX] LINE`, and does nothing else (no Invoke, settings, plugins, state, retries, summary,
or supervision of the remote command). Its time is what any Python client on vtool's
connections pays; the rest of vtool's time is vtool's own code, and what separates the floor
from `xargs -P + ssh ({kex})` is Python's start-up and the connections.

**cold**: no shared SSH connection open (every ControlMaster socket of vtool and ansible, and
vtool's keeper, is closed with `ssh -O exit` first, and so are the ones vtool's nodes keep to each other). vtool has run a command in the same folder before (its warm-up run), as a user's
second command would: so `vtool run` takes its lean path, without Invoke (`vtool/lean.py`),
in the cold rows as in the warm ones. **warm**: the same command again right after. The tools
that keep no connection between commands reconnect every time, so their warm rows measure
the same work again. **warm, same client in one process**: a Python script runs the command
twice on one client object and reports the wall time of the second; start-up and the first
connection are not in that number (CPU and memory are not measured for these rows).

**CPU s**: user+sys CPU seconds of the command, every process it started and the OpenSSH
connection masters it and earlier commands left running (median), counted by the kernel in a
control group the command starts in (see "CPU time counted by" above; where none can be
made, `wait4`'s count for the command and its children plus the masters' `/proc` times,
which come in 10 ms ticks rounded down per process, so short-lived masters count less than
they used). Read 50 ms after the command ends (untimed). Times are medians,
minima and maxima of the runs that succeeded; **ok** counts them, and **failures** says what
went wrong in the others.

**nodes CPU s**: user+sys CPU seconds the nodes used meanwhile (median): every node's sshd
and every process it starts (the connections' sshd processes, the shells, `tar`, a node's
own `ssh` passing vtool's package on), counted in a control group of their own, read before
the command and 50 ms after it ends (untimed). The nodes run on the client's 2 cores, so
when a row keeps both cores busy its wall time follows the client's and the nodes' CPU
together; the summary shows both for vtool and the fastest peer.

**memory MB**: the client's peak memory: the summed PSS (proportional set size: a page shared
by k processes counts 1/k in each) of the command's whole process tree and the connection
masters it uses, sampled every 10 ms in one extra cold and one extra warm run of every row,
which are not timed (reading `/proc` costs CPU on the same cores). **largest process MB**:
the peak RSS (`VmHWM`) of its largest process in that run. (`ru_maxrss` from `wait4` is not
used: a child of the Python bench process reports the bench's own pages from before exec.)

Every workload starts with one untimed warm-up run of every tool. vtool is installed in the
bench's venv as users install it (`pip install .`, not editable), and Python's bytecode
cache is on for every Python tool (`PYTHONPYCACHEPREFIX` in the bench's temp folder).

All nodes are sshd processes on the same machine as the client, so server-side work (key
exchange, sessions, file reads) competes with the client for the same CPUs.
"""


def write_report(b: Bench, path: Path, command: str, started: str, seconds: float, args: argparse.Namespace) -> None:
    parts = [
        "# Benchmarks",
        "",
        "Written by `bench/bench.py`; do not edit by hand. Regenerate with:",
        "",
        "```sh",
        command,
        "```",
        "",
        f"Run on {started} (took {seconds / 60:.1f} min), {b.runs} runs of every row, interleaved "
        "(the order of the tools rotates from one run to the next).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine(b.measured)],
        f"| CPU time counted by | {cpu_counting(b)} |",
        "",
        HOW.replace("{kex}", vtool_kex()).replace("{floor}", FLOOR),
        "## vtool against the fastest peer",
        "",
        "Medians from the tables below; the target is vtool at most as slow as the fastest peer "
        "(`vtool --help`: within 1.3x of `inv --help`; `run true` on 256 nodes: every run completes "
        "with no failure, its time shown beside the peers'). The in-process rows compare vtool's "
        "Python API with the peers' Python APIs (the second command on one client). "
        "The last two columns are the CPU seconds of the client and of the nodes together "
        "(medians): the nodes share the client's 2 cores, so where both cores are busy a tool "
        "that needs more CPU in all takes longer.",
        "",
        summary(b),
        "",
    ]
    if "run" in b.results:
        parts += ["## Workload 1: `run hostname`", ""]
        for n in args.sizes:
            parts += [f"### {n} nodes", "", render_table(b, "run", only=str(n)), ""]
    m = int(b.labels.get("cluster", "0"))
    others = (
        f"The cluster has {m} nodes; every row works on nodes 0 to N-1 (`--nodes 0-N-1`, the peers' host "
        "lists); the other nodes are emptied too, so none of them can pass vtool the package. Whatever "
        "vtool does with them is in its time (workload 6 counts the TCP connections each tool opens)."
    )
    if "inject" in b.results:
        parts += [
            f"## Workload 2: `inject` of a {args.inject_mb} MB incompressible package",
            "",
            f"{b.labels.get('inject-desc', '')} Before every run (untimed) the nodes are emptied: no "
            "release, no kept package, no `~/NAME` link, every peer's target folder empty. Every run is "
            "checked on disk: the SHA-256 of every file of the package in every node's copy (and for vtool, "
            "`~/NAME` pointing at the release).",
            "",
            *([others, ""] if m > min(args.inject_nodes, default=m) else []),
        ]
        for n in args.inject_nodes:
            parts += [f"### {n} nodes", "", render_table(b, "inject", only=str(n)), ""]

    def section(title: str, text: str, table: str, extra: list[str]) -> list[str]:
        return [title, "", text, "", *extra, table, ""]

    if "tree" in b.results:
        parts += section(
            f"## Workload 3: `inject` of a source tree into {args.tree_nodes} nodes",
            f"{b.labels.get('tree-desc', '')} Clean nodes before every run and checks as in workload 2; "
            "rsync copies the folder, the other peers upload a .tar.gz of it.",
            render_table(b, "tree"),
            [others, ""] if m > args.tree_nodes else [],
        )
    if "reinject" in b.results:
        parts += section(
            f"## Workload 4: re-`inject` of the source tree into {args.tree_nodes} nodes",
            "Before every run, untimed: the nodes are emptied, then the same tool puts the original tree "
            "there. Measured: **unchanged**, the same tree again (vtool sends no package: the nodes have "
            "it); **one file changed**, the tree with one of its files edited (vtool sends a delta with "
            "that file; rsync sends that file; the tar peers send the whole tarball again).",
            render_table(b, "reinject"),
            [],
        )
    if "get" in b.results:
        parts += section(
            f"## Workload 5: `scpgetall` of a {args.get_mb} MB file from {args.get_nodes} nodes",
            "Each node has its own random (incompressible) file; every fetched copy is checked "
            "against that node's SHA-256.",
            render_table(b, "get"),
            [],
        )
    if b.traffic:
        parts += [
            "## Workload 6: bytes the client sends for an inject",
            "",
            "One run of every tool per row (the counts do not change from run to run), each from clean "
            "nodes (for the source-tree rows, with the original tree put there first by the same tool, "
            "not counted). Every TCP connection of the client goes through a byte-counting forwarder of "
            "the bench's (see above); **client sent MB** is what the client wrote into them, SSH "
            "framing included; **x package** divides it by the size of the package as vtool sends it "
            f"({b.labels.get('sizes', '')}). Node-to-node traffic (vtool's relay) is not the client's "
            "and is not counted. The wall time includes the forwarder's work on the same CPUs.",
            "",
            render_traffic(b),
            "",
        ]
    if "help" in b.results:
        parts += [
            f"## Workload 7: start-up time ({args.help_runs} runs)",
            "",
            "Run in an empty folder (no `vtool.yaml`, no `tasks.py`).",
            "",
            render_table(b, "help", columns=("tool",)),
            "",
        ]
    if "scale" in b.results:
        parts += [
            f"## Scale: `run true` on {args.scale_nodes} nodes ({args.scale_runs or b.runs} runs)",
            "",
            f"The cluster is grown to {args.scale_nodes} local nodes for this row only (after the other "
            "workloads). A run fails if any node fails, and also if the output mentions too many open "
            "files or a refused or reset connection.",
            "",
            render_table(b, "scale"),
            "",
        ]
    missing = [w for w, key in WORKLOAD_KEYS.items() if not any(k in b.results for k in key)]
    if "6" in missing and b.traffic:
        missing.remove("6")
    if missing:
        parts += [
            "## Not in this run",
            "",
            f"Workloads {', '.join(missing)} were not selected (`--workloads`).",
            "",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    say(f"\nwrote {path}")


# -- main ----------------------------------------------------------------------------------

# --workloads names -> the keys of their results
WORKLOAD_KEYS = {
    "1": ("run",),
    "2": ("inject",),
    "3": ("tree",),
    "4": ("reinject",),
    "5": ("get",),
    "6": (),  # b.traffic
    "7": ("help",),
    "8": ("scale",),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of every row (default 5)")
    ap.add_argument("--sizes", default="8,32,64", help="node counts for run hostname (default 8,32,64)")
    ap.add_argument("--get-nodes", type=int, default=32, help="nodes for scpgetall (default 32)")
    ap.add_argument("--get-mb", type=int, default=5, help="size of the fetched file in MB (default 5)")
    ap.add_argument("--help-runs", type=int, default=21, help="runs of the start-up rows (default 21)")
    ap.add_argument("--inject-nodes", default="8,32", help="node counts for workload 2 (default 8,32)")
    ap.add_argument("--inject-mb", type=int, default=20, help="size of workload 2's package in MB (default 20)")
    ap.add_argument("--tree-nodes", type=int, default=32, help="nodes for workloads 3 and 4 (default 32)")
    ap.add_argument("--tree-files", type=int, default=900, help="files in the source tree (default 900)")
    ap.add_argument("--tree-mb", type=float, default=14, help="size of the source tree in MB (default 14)")
    ap.add_argument("--bytes-nodes", default="8,32", help="node counts for workload 6 (default 8,32)")
    ap.add_argument("--scale-nodes", type=int, default=256, help="nodes for the scale row (default 256)")
    ap.add_argument("--scale-runs", type=int, default=0, help="runs of the scale row (default: --runs)")
    ap.add_argument(
        "--workloads",
        default="1,2,3,4,5,6,7,8",
        help="which workloads (default 1,2,3,4,5,6,7,8; 8 or 'scale' is run true on --scale-nodes nodes)",
    )
    ap.add_argument("--timeout", type=float, default=180, help="seconds one measured command may take")
    ap.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"), help="the report to write")
    ap.add_argument("--command", default="bash bench/run.sh", help="the command named in the report")
    args = ap.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    args.inject_nodes = [int(x) for x in args.inject_nodes.split(",") if x]
    args.bytes_nodes = [int(x) for x in args.bytes_nodes.split(",") if x]
    workloads = {"8" if x.strip() == "scale" else x.strip() for x in args.workloads.split(",") if x.strip()}
    unknown = workloads - set(WORKLOAD_KEYS)
    if unknown:
        ap.error(f"unknown workloads {','.join(sorted(unknown))} (choose from 1-8 or scale)")

    # 64 nodes, a client with a pipe or socket per node: raise the soft limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)

    tmp = Path(tempfile.mkdtemp(prefix="vtool-bench-", dir="/tmp"))  # short: socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VTOOL_", "ANSIBLE_", "PYTHONDONTWRITEBYTECODE"))}
    # Bytecode is cached (in the temp folder) for every Python tool alike, whatever the
    # user's PYTHONDONTWRITEBYTECODE. Each workload starts with an untimed warm-up run of every tool.
    env.update(
        VTOOL_HOME=str(tmp / "home"),
        PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        PYTHONPYCACHEPREFIX=str(tmp / "pycache"),
    )
    b = Bench(tmp=tmp, env=env, runs=args.runs, timeout=args.timeout, measured=tree_state())
    b.client_cpu = CpuGroup.make(f"vtool-bench-{os.getpid()}-client")
    b.nodes_cpu = CpuGroup.make(f"vtool-bench-{os.getpid()}-nodes")
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.perf_counter()
    say(f"bench: temp {tmp}, {args.runs} runs, workloads {','.join(sorted(workloads))}")
    try:
        # The nodes the workloads need, launched once; the scale row's (many more) are added
        # just before it, last, so that the other rows run on the smaller cluster.
        needed = {
            "1": max(args.sizes, default=0),
            "2": max(args.inject_nodes, default=0),
            "3": args.tree_nodes,
            "4": args.tree_nodes,
            "5": args.get_nodes,
            "6": max([*args.bytes_nodes, args.tree_nodes if {"3", "4"} & workloads else 0]),
            "8": args.scale_nodes if workloads == {"8"} else 0,
        }
        nodes = max([needed.get(w, 0) for w in workloads], default=0)
        if nodes:
            set_subreaper(False)
            b.launch(nodes, ready_timeout=600 if nodes > 64 else 300)
        set_subreaper(True)
        if "1" in workloads:
            workload_run(b, args.sizes)
        if "2" in workloads:
            workload_inject(b, args.inject_nodes, args.inject_mb)
        if "3" in workloads:
            workload_tree(b, args.tree_nodes, args.tree_files, args.tree_mb)
        if "4" in workloads:
            workload_reinject(b, args.tree_nodes, args.tree_files, args.tree_mb)
        if "5" in workloads:
            workload_get(b, args.get_nodes, args.get_mb)
        if "6" in workloads:
            tree = source_trees(b, args.tree_files, args.tree_mb) if {"3", "4"} & workloads else None
            workload_bytes(b, args.bytes_nodes, args.inject_mb, args.tree_nodes, tree)
        if "7" in workloads:
            workload_help(b, args.help_runs)
        if "8" in workloads:
            if len(b.ports) < args.scale_nodes:
                set_subreaper(False)
                b.launch(args.scale_nodes - len(b.ports), ready_timeout=600)
                set_subreaper(True)
            workload_scale(b, args.scale_nodes, args.scale_runs or args.runs)
    finally:
        say("terminating the nodes")
        if b.cluster_dir.exists():  # also after a launch that failed half-way
            b.terminate()
        reap()
        set_subreaper(False)
        for group in (b.client_cpu, b.nodes_cpu):
            if group is not None:
                group.remove()
        shutil.rmtree(tmp, ignore_errors=True)
    say("\n" + summary(b))
    write_report(b, Path(args.output), args.command, started, time.perf_counter() - t0, args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        print(f"bench: interrupted ({e or 'Ctrl-C'}); the nodes were terminated", file=sys.stderr)
        sys.exit(130)

"""vtool against the tools a scientist would pick instead, on local sshd nodes.

    python bench/bench.py [--runs 5] [--output docs/benchmarks.md]

(``bash bench/run.sh`` sets up the venv with the peers and runs this.)

Launches nodes with vtool's local provider in a throwaway VTOOL_HOME, then measures, in the
same run and interleaved (the order of the tools rotates from one run to the next):

- workload 1: ``run hostname`` on N nodes, cold (no shared SSH connection open) and warm (the
  second command in a row), and the second command on the same client inside one process;
- workload 5: ``scpgetall`` of a 5 MB file (different random bytes on each node) from N nodes;
- workload 7: ``vtool --help`` against ``inv --help``.

Every tool runs as a child process. Wall time is the child's; CPU time is user+sys of the
child and everything it waited for (``os.wait4``), plus what OpenSSH connection masters left
behind by the child (ControlPersist daemons, adopted by this process as a child subreaper)
used meanwhile. Memory comes from one more cold and warm run of every row, untimed, that
samples the PSS of the child's process tree and those masters every 10 ms (``ru_maxrss`` of
a child of this Python process is useless: Linux counts the parent's pages the child had
before exec). Every run's result is checked (all N nodes answered, every fetched file has the
node's bytes); failures are counted in the table, never dropped silently. Traffic goes only
to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import json
import os
import platform
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

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


def adopted_masters() -> dict[int, float]:
    """OpenSSH processes that our children left behind: {pid: cpu seconds so far}."""
    out = {}
    for pid in _children(os.getpid()):
        st = _stat(pid)
        if st and st[0] == "ssh" and st[1] != "Z":
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
) -> Sample:
    """Run argv once; time it and count its CPU; ``check(rc, stdout, stderr)`` returns
    None when the result is right, or what is wrong.

    With ``memory``, sample the memory of the process tree and the adopted connection
    masters every 10 ms. Reading /proc costs CPU on the same 2 cores, so the timed runs do
    not sample, and memory comes from a run of its own."""
    before = adopted_masters()
    out_path, err_path, in_path = logdir / "stdout", logdir / "stderr", logdir / "stdin"
    in_path.write_text(stdin_text or "")
    with open(in_path, "rb") as stdin, open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=stdin, stdout=out, stderr=err, start_new_session=True)
        try:
            w = _wait(proc, t0, timeout, memory)
        except BaseException:  # Ctrl-C or SIGTERM: stop the child's process group first
            os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
            raise
    proc.returncode = os.waitstatus_to_exitcode(w.status)
    after = adopted_masters()
    master_cpu = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items()) + reap()
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    problem = f"timed out after {timeout:g}s" if w.timed_out else check(proc.returncode, stdout, stderr)
    return Sample(
        wall=w.wall,
        cpu=w.rusage.ru_utime + w.rusage.ru_stime + master_cpu,
        ok=problem is None,
        note=problem or "",
        memory_mb=w.peak_sum / 2**20 if memory else float("nan"),
        largest_mb=w.peak_one / 2**20 if memory else float("nan"),
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


# -- the cluster ---------------------------------------------------------------------------


@dataclass
class Bench:
    tmp: Path
    env: dict[str, str]
    runs: int
    timeout: float
    ports: dict[int, int] = field(default_factory=dict)
    hostkeys: dict[int, str] = field(default_factory=dict)
    results: dict[str, dict[tuple[str, ...], list[Sample]]] = field(default_factory=dict)
    memory: dict[str, dict[tuple[str, ...], Sample]] = field(default_factory=dict)
    sampling: bool = False  # the untimed memory run

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

    def launch(self, n: int) -> None:
        t0 = time.perf_counter()
        r = self.vtool("launch", str(n), "--ready-timeout", "300", timeout=900)
        if r.returncode != 0:
            raise SystemExit(f"bench: vtool launch {n} failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
        say(f"launched {n} nodes in {time.perf_counter() - t0:.1f}s")
        status = json.loads(self.vtool("status", "--json").stdout)
        for node in status[0]["nodes"]:
            self.ports[node["index"]] = node["port"]
        for line in (self.cluster_dir / "known_hosts").read_text().splitlines():
            alias, kind, key = line.split()[:3]
            self.hostkeys[int(alias.rsplit("-", 1)[1])] = key
        (self.tmp / "known_hosts_ip").write_text(
            "".join(f"[127.0.0.1]:{self.ports[i]} ssh-ed25519 {k}\n" for i, k in sorted(self.hostkeys.items()))
        )
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

    # files the peers read
    def cluster_file(self, n: int) -> Path:
        path = self.tmp / f"cluster-{n}.json"
        if not path.exists():
            nodes = [
                {"index": i, "alias": f"{CLUSTER}-{i}", "port": self.ports[i], "hostkey": self.hostkeys[i]}
                for i in range(n)
            ]
            path.write_text(
                json.dumps(
                    {
                        "name": CLUSTER,
                        "user": _user(),
                        "key": str(self.cluster_dir / "id_ed25519"),
                        "known_hosts_ip": str(self.tmp / "known_hosts_ip"),
                        "nodes": nodes,
                    }
                )
            )
        return path

    @property
    def ansible_dir(self) -> Path:
        return self.tmp / "ansible"

    @property
    def ansible_cp(self) -> Path:
        return self.tmp / "acp"

    def inventory(self, n: int) -> Path:
        path = self.ansible_dir / f"inventory-{n}.ini"
        if not path.exists():
            kh = self.cluster_dir / "known_hosts"
            lines = ["[nodes]"]
            for i in range(n):
                common = (
                    f"-o UserKnownHostsFile={kh} -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes "
                    f"-o HostKeyAlias=vtool-{CLUSTER}-{i} -o IdentitiesOnly=yes -o BatchMode=yes"
                )
                lines.append(
                    f"{CLUSTER}-{i} ansible_host=127.0.0.1 ansible_port={self.ports[i]} node_index={i} "
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

    def record(self, workload: str, key: tuple[str, ...], sample: Sample) -> None:
        mark = "ok" if sample.ok else f"FAILED: {sample.note}"
        if self.sampling:
            self.memory.setdefault(workload, {})[key] = sample
            say(f"  {' '.join(key):<52} memory {sample.memory_mb:7.1f} MB, largest {sample.largest_mb:6.1f} MB  {mark}")
        else:
            self.results.setdefault(workload, {}).setdefault(key, []).append(sample)
            say(f"  {' '.join(key):<52} {sample.wall:7.3f}s  cpu {sample.cpu:6.2f}s  {mark}")

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
        )


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def say(text: str) -> None:
    print(text, flush=True)


# -- workload 1: run hostname -------------------------------------------------------------


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

    def xargs_ssh_curve() -> Sample:
        argv = ["xargs", "-P", str(n), "-I{}", "ssh", "-F", ssh_cfg, "-o", "BatchMode=yes"]
        argv += ["-o", "KexAlgorithms=curve25519-sha256", "{}", "hostname"]
        return b.measure(argv, check_count(n), stdin_text=hosts)

    return {
        "vtool run": vtool,
        "parallel-ssh": pssh,
        "Fabric ThreadingGroup": fabric,
        "ansible -m command": ansible,
        "xargs -P + ssh": xargs_ssh,
        "xargs -P + ssh (curve25519)": xargs_ssh_curve,
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
        )
    else:
        row.update(median="failed", min="-", max="-", cpu="-")
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
    head = [*columns, "median s", "min s", "max s", "CPU s", "memory MB", "largest process MB", "ok", "failures"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, samples in b.results.get(workload, {}).items():
        if only is not None and key[0] != only:
            continue
        st = stats(samples, b.memory.get(workload, {}).get(key))
        cells = list(key[-len(columns) :])
        if cells[-1].startswith("vtool"):
            cells[-1] = f"**{cells[-1]}**"
        cells += [st[k] for k in ("median", "min", "max", "cpu", "memory", "largest", "ok", "note")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(b: Bench) -> str:
    """vtool's median against the fastest peer's on every row (the issue's targets)."""
    lines = [
        "| workload | N | mode | vtool s | fastest peer | peer s | vtool / peer | target met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = {"run": "run hostname", "get": "scpgetall"}
    for wl, label in labels.items():
        groups: dict[tuple[str, str], dict[str, list[Sample]]] = {}
        for (n, mode, tool), samples in b.results.get(wl, {}).items():
            groups.setdefault((n, mode), {})[tool] = samples
        for (n, mode), tools in groups.items():
            med = {t: statistics.median(s.wall for s in ss if s.ok) for t, ss in tools.items() if any(s.ok for s in ss)}
            mine = [t for t in med if t.startswith("vtool")]
            peers = {t: v for t, v in med.items() if not t.startswith("vtool")}
            if not mine or not peers:
                continue
            best = min(peers, key=lambda t: peers[t])
            v = med[mine[0]]
            ratio = v / peers[best]
            lines.append(
                f"| {label} | {n} | {mode} | {v:.3f} | {best} | {peers[best]:.3f} | {ratio:.2f} | "
                f"{'yes' if ratio <= 1.0 else 'no'} |"
            )
    hs = b.results.get("help", {})
    v = [s.wall for s in hs.get(("-", "-", "vtool --help"), []) if s.ok]
    i = [s.wall for s in hs.get(("-", "-", "inv --help"), []) if s.ok]
    if v and i:
        ratio = statistics.median(v) / statistics.median(i)
        lines.append(
            f"| vtool --help | - | - | {statistics.median(v):.3f} | inv --help | {statistics.median(i):.3f} | "
            f"{ratio:.2f} | {'yes' if ratio <= 1.3 else 'no'} (target 1.3x) |"
        )
    return "\n".join(lines)


# -- the report ----------------------------------------------------------------------------


def machine() -> list[tuple[str, str]]:
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

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return r.stdout.strip()

    dirty = " + uncommitted changes in vtool/" if git("status", "--porcelain", "--", "vtool") else ""
    return [
        ("vtool measured", f"the work tree at commit {git('rev-parse', '--short', 'HEAD') or '?'}{dirty}"),
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
| vtool | `vtool run hostname --nodes 0-N-1`, `vtool scpgetall` | pinned, strict (the cluster's known_hosts) | curve25519-sha256 (vtool's default `ssh.kex`) | `concurrency` default 32; shared connections (ControlMaster, ControlPersist 300 s) |
| parallel-ssh | `ParallelSSHClient(...).run_command`, `copy_remote_file` (SFTP) | **not verified before connecting**: parallel-ssh has no known_hosts option; the bench compares each server's key with the pinned one afterwards and fails the node on a mismatch | libssh2's default | `pool_size=N` |
| Fabric | `ThreadingGroup.from_connections(...)`, `.run`, `.get` (SFTP) | strict: `RejectPolicy` and a known_hosts file translated to `[127.0.0.1]:PORT` names | paramiko's default | one thread per node |
| ansible-core | `ansible all -i INVENTORY -m command -a hostname -f N`, `-m fetch` | strict: the cluster's known_hosts with `HostKeyAlias` per host | OpenSSH's default (sntrup761x25519) | `-f N`; pipelining on, interpreter given (both favour ansible); ControlPersist 60 s (its default) |
| xargs + ssh/scp | `xargs -P N -I{} ssh -F CONFIG {} hostname`, `scp` the same way; CONFIG is `vtool ssh-config` | strict (the cluster's known_hosts) | OpenSSH's default; the `(curve25519)` row sets `KexAlgorithms=curve25519-sha256` | `-P N`; no shared connections |

**cold**: no shared SSH connection open (every ControlMaster socket of vtool and ansible is
closed with `ssh -O exit` first). **warm**: the same command again right after. The tools
that keep no connection between commands reconnect every time, so their warm rows measure
the same work again. **warm, same client in one process**: a Python script runs the command
twice on one client object and reports the wall time of the second; start-up and the first
connection are not in that number (CPU and memory are not measured for these rows).

**CPU s**: user+sys CPU seconds of the command and every process it waited for, plus what
the OpenSSH connection masters it left running used meanwhile (median). Times are medians,
minima and maxima of the runs that succeeded; **ok** counts them, and **failures** says what
went wrong in the others.

**memory MB**: the client's peak memory: the summed PSS (proportional set size: a page shared
by k processes counts 1/k in each) of the command's whole process tree and the connection
masters it uses, sampled every 10 ms in one extra cold and one extra warm run of every row,
which are not timed (reading `/proc` costs CPU on the same cores). **largest process MB**:
the peak RSS (`VmHWM`) of its largest process in that run. (`ru_maxrss` from `wait4` is not
used: a child of the Python bench process reports the bench's own pages from before exec.)

Every workload starts with one untimed warm-up run of every tool. Python's bytecode cache is
on for every Python tool (`PYTHONPYCACHEPREFIX` in the bench's temp folder), as it is for an
installed vtool; an editable install run with `PYTHONDONTWRITEBYTECODE` would compile vtool
at every start.

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
        *[f"| {k} | {v} |" for k, v in machine()],
        "",
        HOW,
        "## vtool against the fastest peer",
        "",
        "Medians from the tables below; the target is vtool at most as slow as the fastest peer "
        "(`vtool --help`: within 1.3x of `inv --help`). The in-process rows compare vtool's "
        "Python API with the peers' Python APIs (the second command on one client).",
        "",
        summary(b),
        "",
    ]
    if "run" in b.results:
        parts += ["## Workload 1: `run hostname`", ""]
        for n in args.sizes:
            parts += [f"### {n} nodes", "", render_table(b, "run", only=str(n)), ""]
    if "get" in b.results:
        parts += [
            f"## Workload 5: `scpgetall` of a {args.get_mb} MB file from {args.get_nodes} nodes",
            "",
            "Each node has its own random (incompressible) file; every fetched copy is checked "
            "against that node's SHA-256.",
            "",
            render_table(b, "get"),
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
    parts += [
        "## Not measured yet",
        "",
        "Workloads 2, 3, 4 and 6 of the benchmark (inject of a 20 MB package into 8 and 32 "
        "nodes, of a source tree, re-inject unchanged and with one file changed, client bytes "
        "sent by inject, with `rsync` per node as a peer) and `run true` on 256 nodes are not "
        "in this bench yet.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    say(f"\nwrote {path}")


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of every row (default 5)")
    ap.add_argument("--sizes", default="8,32,64", help="node counts for run hostname (default 8,32,64)")
    ap.add_argument("--get-nodes", type=int, default=32, help="nodes for scpgetall (default 32)")
    ap.add_argument("--get-mb", type=int, default=5, help="size of the fetched file in MB (default 5)")
    ap.add_argument("--help-runs", type=int, default=21, help="runs of the start-up rows (default 21)")
    ap.add_argument("--workloads", default="1,5,7", help="which workloads (default 1,5,7)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds one measured command may take")
    ap.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"), help="the report to write")
    ap.add_argument("--command", default="bash bench/run.sh", help="the command named in the report")
    args = ap.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    workloads = {x.strip() for x in args.workloads.split(",")}

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
    # Bytecode is cached (in the temp folder, not the work tree) for every Python tool alike:
    # an editable vtool has no .pyc of its own, and compiling it at each start is not what an
    # installed vtool does. Each workload starts with an untimed warm-up run of every tool.
    env.update(
        VTOOL_HOME=str(tmp / "home"),
        PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        PYTHONPYCACHEPREFIX=str(tmp / "pycache"),
    )
    b = Bench(tmp=tmp, env=env, runs=args.runs, timeout=args.timeout)
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.perf_counter()
    say(f"bench: temp {tmp}, {args.runs} runs, workloads {','.join(sorted(workloads))}")
    try:
        nodes = max([*(args.sizes if "1" in workloads else []), args.get_nodes if "5" in workloads else 0])
        if nodes:
            set_subreaper(False)
            b.launch(nodes)
        set_subreaper(True)
        if "1" in workloads:
            workload_run(b, args.sizes)
        if "5" in workloads:
            workload_get(b, args.get_nodes, args.get_mb)
        if "7" in workloads:
            workload_help(b, args.help_runs)
    finally:
        say("terminating the nodes")
        if b.cluster_dir.exists():  # also after a launch that failed half-way
            b.terminate()
        reap()
        set_subreaper(False)
        shutil.rmtree(tmp, ignore_errors=True)
    say("\n" + summary(b))
    write_report(b, Path(args.output), args.command, started, time.perf_counter() - t0, args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        print(f"bench: interrupted ({e or 'Ctrl-C'}); the nodes were terminated", file=sys.stderr)
        sys.exit(130)

"""Shared fixtures: an isolated HOME and VTOOL_HOME per test, the CLI run as a user runs
it (a subprocess), and a tear-down that stops every node process the test started (by PID,
after checking it is that node's process) and fails the test if one would not stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "pkg-examples"
BIN = Path(sys.executable).parent

if shutil.which("sshd") is None and not os.path.exists("/usr/sbin/sshd"):  # pragma: no cover
    pytest.exit("OpenSSH sshd is needed for the tests: run `bash .ci/run` (it installs it)", returncode=3)

# Ctrl-C and a closed terminal as a terminal delivers them: a shell without job control
# starts `cmd &` with SIGINT ignored, and nohup ignores SIGHUP. Every vtool the tests start
# would inherit that (vtool leaves an ignored SIGHUP alone, as nohup's user wants), and the
# tests of what Ctrl-C and SIGHUP do would see them do nothing (measured: 9 failed in a CI
# run started with `nohup ... &`). A handler here is reset to the default in every program
# the tests start.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@dataclass
class Env:
    root: Path  # the test's private folder
    home: Path  # $HOME
    vhome: Path  # $VTOOL_HOME
    work: Path  # the current folder for commands
    env: dict[str, str]

    def cli(self, *args: str, input: str | None = None, cwd: Path | None = None, timeout: float = 120,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``vtool ARGS`` as a user would (a new process)."""
        return self.run_cmd([sys.executable, "-m", "vtool", *args], input=input, cwd=cwd, timeout=timeout, extra_env=extra_env)

    def inv(self, *args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``inv ARGS`` (from the repository root unless ``cwd`` is given)."""
        return self.run_cmd([str(BIN / "inv"), *args], cwd=cwd or REPO, timeout=timeout)

    def run_cmd(self, argv: list[str], *, input: str | None = None, cwd: Path | None = None, timeout: float = 120,
                extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        env.update(extra_env or {})
        return subprocess.run(
            argv, cwd=cwd or self.work, env=env, input=input if input is not None else "", text=True,
            capture_output=True, timeout=timeout,
        )

    def ok(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        r = self.cli(*args, **kw)  # type: ignore[arg-type]
        assert r.returncode == 0, f"vtool {' '.join(args)} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
        return r

    def node_home(self, index: int, cluster: str = "default") -> Path:
        return self.vhome / "clusters" / cluster / "nodes" / str(index) / "home"

    def node_meta(self, index: int, cluster: str = "default") -> dict[str, object]:
        import json

        return json.loads((self.vhome / "clusters" / cluster / "nodes" / str(index) / "node.json").read_text())


def _clean_environ(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTOOL_")}
    env.pop("AWS_ENDPOINT_URL", None)
    env.update(HOME=str(tmp / "home"), VTOOL_HOME=str(tmp / "vh"), PYTHONUNBUFFERED="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    # The repository's vtool is imported even when a test runs outside the repository.
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def stop_all_nodes(vhome: Path) -> list[int]:
    """Stop every local node under ``vhome``; return PIDs that would not stop."""
    from vtool.errors import VtoolError
    from vtool.providers.local import LocalProvider

    survivors: list[int] = []
    for meta_file in sorted(vhome.glob("clusters/*/nodes/*/node.json")):
        try:
            meta, _found, left = LocalProvider._stop_processes(meta_file.parent)
        except VtoolError:  # an unreadable node.json: nothing to go on
            continue
        survivors += left
        if meta.get("screendir") and not str(meta["screendir"]).startswith(str(vhome)):
            shutil.rmtree(meta["screendir"], ignore_errors=True)
    return survivors


@pytest.fixture
def venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """An isolated user: HOME, VTOOL_HOME and a work folder of their own; no VTOOL_* set."""
    env = _clean_environ(tmp_path)
    for d in ("home", "vh", "work"):
        (tmp_path / d).mkdir()
    for k in list(os.environ):
        if k.startswith("VTOOL_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", env["HOME"])
    monkeypatch.setenv("VTOOL_HOME", env["VTOOL_HOME"])
    monkeypatch.chdir(tmp_path / "work")
    e = Env(tmp_path, tmp_path / "home", tmp_path / "vh", tmp_path / "work", env)
    try:
        yield e
    finally:
        from vtool.state import control_dir_path

        survivors = stop_all_nodes(e.vhome)
        shutil.rmtree(control_dir_path(e.vhome), ignore_errors=True)
        assert not survivors, f"processes {survivors} survived the test's tear-down"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[object]:
    """One real moto server for the session (reset before each test that uses it)."""
    pytest.importorskip("moto.server", reason="moto[server] is installed by scripts/bootstrap.sh")
    from aws import MotoServer

    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Aws:
    moto: object
    proxy: object  # aws.FaultProxy
    env: Env

    def instances(self, **tags: str) -> list[dict]:  # type: ignore[type-arg]
        from aws import instances

        return instances(self.moto.url, **tags)  # type: ignore[attr-defined]


AL2023 = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"  # moto has this one


@pytest.fixture
def aws(venv: Env, moto_server: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[Aws]:
    """The ec2 provider against the moto server, through the fault-injecting proxy."""
    from aws import FaultProxy, aws_env

    moto_server.reset()  # type: ignore[attr-defined]
    proxy = FaultProxy(moto_server.port)  # type: ignore[attr-defined]
    extra = aws_env(proxy.url)
    # moto's instance addresses (54.x) go nowhere offline: a short connect timeout for status probes.
    extra.update(VTOOL_PROVIDER="ec2", VTOOL_EC2_SSH_CIDR="203.0.113.7/32", VTOOL_EC2_AMI_SSM_PARAMETER=AL2023,
                 VTOOL_TIMEOUT_CONNECT="2")
    venv.env.update(extra)
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
    # Never contact moto's made-up addresses: the test plugin maps every instance to loopback.
    site = venv.root / "backing-site"
    dist = site / "vtool_test_backing-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vtool-test-backing\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vtool]\nbacking = vtool_test_backing\n")
    shutil.copy(REPO / "tests" / "plugins" / "vtool_test_backing.py", site / "vtool_test_backing.py")
    venv.env["PYTHONPATH"] = f"{site}{os.pathsep}{venv.env['PYTHONPATH']}"
    venv.env["VTOOL_TEST_BACKING"] = "refuse"
    monkeypatch.setenv("VTOOL_TEST_BACKING", "refuse")
    monkeypatch.syspath_prepend(str(site))  # the same plugin for API calls made in this process
    import vtool_test_backing

    from vtool import plugin_manager

    pm = plugin_manager.get()
    mine = not pm.is_registered(vtool_test_backing)  # the entry point may have registered it already
    if mine:
        pm.register(vtool_test_backing, name="backing-in-process")
    try:
        yield Aws(moto_server, proxy, venv)
    finally:
        if mine:
            pm.unregister(vtool_test_backing)
        proxy.close()


@pytest.fixture
def backed(aws: Aws) -> Aws:
    """EC2 nodes backed by real local sshd nodes (tests/plugins/vtool_test_backing.py)."""
    import getpass

    aws.env.env["VTOOL_TEST_BACKING"] = "sshd"
    aws.env.env["VTOOL_SSH_USER"] = getpass.getuser()
    return aws


@pytest.fixture
def cluster3(venv: Env) -> Env:
    """Three running local nodes in cluster 'default'."""
    venv.ok("launch", "3")
    return venv


def pids_whose_cmdline_has(*parts: str) -> set[int]:
    """Live processes whose command line contains every one of ``parts``."""
    from vtool.providers.local import _proc_alive

    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(p in cmd for p in parts) and _proc_alive(int(pid)):
            found.add(int(pid))
    return found


def close_shared_connections() -> None:
    """Close vtool's shared SSH connections to the current cluster's nodes (the next command
    opens new ones: a node's sshd settings changed since apply to those only)."""
    import vtool
    from vtool import api

    s = api.Session(vtool.settings())
    for node in s.info().nodes:
        s.client(node).close()


def started_run(env: Env, command: str, nodes: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``vtool run COMMAND`` in the background, once each of ``nodes`` nodes printed its first
    line (COMMAND starts with ``echo started``)."""
    proc = subprocess.Popen([sys.executable, "-m", "vtool", "run", command], cwd=env.work,
                            env={**env.env, **(extra_env or {})}, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    for _ in range(nodes):
        assert "started" in proc.stdout.readline()
    return proc


def make_package(base: Path, name: str, script: str, files: dict[str, str] | None = None, mode: int = 0o755) -> Path:
    """A package folder ``base/name`` with ``vtool-launch`` = ``script``."""
    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    launch = d / "vtool-launch"
    launch.write_text(script)
    launch.chmod(mode)
    for rel, text in (files or {}).items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return d


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy (no timing assertions: a deadline)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def fake_dist(root: Path, name: str, module_code: str) -> Path:
    """An installed distribution with an entry point in group 'vtool' (as pip would leave it)."""
    site = root / "site"
    (site / f"{name}-0.1.dist-info").mkdir(parents=True)
    (site / f"{name}-0.1.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (site / f"{name}-0.1.dist-info" / "entry_points.txt").write_text(f"[vtool]\n{name} = {name}\n")
    (site / f"{name}.py").write_text(module_code)
    return site

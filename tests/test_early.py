"""A node command opens its SSH connections while vtool starts (vtool.early), through
vtool-connect when it could be built (vtool.ssh.connect_helper); neither changes what the
command does, and neither gets in its way when what it remembered no longer holds."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import Env, wait_for

from vtool.state import control_dir_path


def _accepted(env: Env, index: int) -> int:
    """How many SSH connections node ``index``'s sshd has accepted so far."""
    log = env.vhome / "clusters" / "default" / "nodes" / str(index) / "sshd.log"
    return log.read_text(errors="replace").count("Accepted publickey")


def _close_connections(env: Env) -> None:
    cm = control_dir_path(env.vhome)
    for sock in cm.iterdir() if cm.is_dir() else []:
        if sock.is_socket():
            subprocess.run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                           capture_output=True, timeout=10, check=False)


def _records(env: Env) -> list[Path]:
    folder = env.vhome / "early"
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def test_a_node_command_connects_while_vtool_starts_and_each_node_gets_one_connection(venv: Env) -> None:
    venv.ok("launch", "3")
    venv.ok("run", "true")  # writes down how to reach the nodes
    [record] = _records(venv)
    assert oct(record.stat().st_mode & 0o777) == "0o600"
    _close_connections(venv)
    before = [_accepted(venv, i) for i in range(3)]
    r = venv.ok("run", "hostname", extra_env={"VTOOL_DEBUG": "1"})
    assert "opening 3 connection(s) while starting" in r.stderr, r.stderr
    assert "3 ok, 0 failed" in r.stderr, r.stderr
    # The command used the connections opened early: one per node, not two.
    assert [_accepted(venv, i) - before[i] for i in range(3)] == [1, 1, 1]
    # Only the nodes the command names.
    _close_connections(venv)
    r = venv.ok("run", "true", "--nodes", "1", extra_env={"VTOOL_DEBUG": "1"})
    assert "opening 1 connection(s) while starting" in r.stderr, r.stderr
    # Nodes 0 and 2 had no connection left; then all three have one: nothing to open.
    r = venv.ok("run", "true", extra_env={"VTOOL_DEBUG": "1"})
    assert "opening 2 connection(s) while starting" in r.stderr, r.stderr
    r = venv.ok("run", "true", extra_env={"VTOOL_DEBUG": "1"})
    assert "while starting" not in r.stderr


def test_what_was_remembered_is_not_used_once_it_may_be_wrong(venv: Env) -> None:
    venv.ok("launch", "2")
    venv.ok("run", "true")
    _close_connections(venv)
    # Another cluster (a flag, or VTOOL_CLUSTER): a context of its own, nothing remembered.
    venv.ok("launch", "1", "-c", "other")
    venv.ok("run", "true", "-c", "other")
    _close_connections(venv)
    r = venv.cli("run", "true", "-c", "nosuch", extra_env={"VTOOL_DEBUG": "1"})
    assert r.returncode != 0 and "while starting" not in r.stderr
    # The cluster changed (a node added): its record is stale until a command rewrites it.
    venv.ok("launch", "1")
    r = venv.ok("run", "true", extra_env={"VTOOL_DEBUG": "1"})
    assert "while starting" not in r.stderr and "3 ok, 0 failed" in r.stderr
    _close_connections(venv)
    r = venv.ok("run", "true", extra_env={"VTOOL_DEBUG": "1"})
    assert "opening 3 connection(s) while starting" in r.stderr, r.stderr
    # A record someone else could have written is ignored.
    _close_connections(venv)
    for record in _records(venv):
        os.chmod(record, 0o666)
    r = venv.ok("run", "true", extra_env={"VTOOL_DEBUG": "1"})
    assert "while starting" not in r.stderr
    # --help, and VTOOL_EARLY=0, connect nowhere.
    for record in _records(venv):
        os.chmod(record, 0o600)
    r = venv.ok("run", "--help", extra_env={"VTOOL_DEBUG": "1"})
    assert "while starting" not in r.stderr
    r = venv.ok("run", "true", extra_env={"VTOOL_DEBUG": "1", "VTOOL_EARLY": "0"})
    assert "while starting" not in r.stderr


def _recorded(env: Env) -> dict[str, Any]:
    import json

    [record] = _records(env)
    return json.loads(record.read_text())["nodes"]  # type: ignore[no-any-return]


def test_the_record_follows_nodes_that_stop_and_start_again(venv: Env) -> None:
    """A command that found its record valid writes it again only if the nodes changed (a
    node stopped or started leaves the stamped files as they were): the next start-up then
    opens connections to the nodes that run, at their ports now."""
    venv.ok("launch", "2")
    venv.ok("run", "true")
    assert sorted(_recorded(venv)) == ["0", "1"]
    venv.ok("stop", "--nodes", "1")
    venv.ok("run", "true", "--nodes", "0")
    assert sorted(_recorded(venv)) == ["0"]
    before = _records(venv)[0].stat().st_mtime_ns
    venv.ok("run", "true", "--nodes", "0")  # nothing changed: the record stays as it was
    assert _records(venv)[0].stat().st_mtime_ns == before
    venv.ok("start", "--nodes", "1")
    venv.ok("run", "true")
    recorded = _recorded(venv)
    assert sorted(recorded) == ["0", "1"]
    assert f"Port={venv.node_meta(1)['port']}" in recorded["1"]["argv"]  # type: ignore[index]
    _close_connections(venv)
    r = venv.ok("run", "true", extra_env={"VTOOL_DEBUG": "1"})
    assert "opening 2 connection(s) while starting" in r.stderr and "2 ok, 0 failed" in r.stderr, r.stderr


def test_waiting_for_an_opener_ends_with_it_or_at_its_timeout() -> None:
    """early.wait_exit: the exit status as soon as the process ends (not at Popen's next
    look), TimeoutExpired when it does not end in time, and a process already reaped."""
    import time

    from vtool.early import wait_exit

    quick = subprocess.Popen(["sh", "-c", "exit 3"])
    assert wait_exit(quick, 10) == 3
    assert wait_exit(quick, 10) == 3  # reaped: Popen's own answer
    slow = subprocess.Popen(["sleep", "30"])
    try:
        t0 = time.monotonic()
        try:
            wait_exit(slow, 0.2)
            raise AssertionError("no timeout")
        except subprocess.TimeoutExpired:
            pass
        assert 0.15 < time.monotonic() - t0 < 5
    finally:
        slow.kill()
        slow.wait()


def test_an_opener_keeps_no_file_of_its_caller_and_is_waited_as_popen_is(tmp_path: Path) -> None:
    """early.Opener (posix_spawn) runs its program as start's Popen did: in a session of its
    own, stdin/stdout/stderr on /dev/null, holding no file vtool inherited (a pipe its caller
    waits on would stay open as long as the ControlPersist master); poll, wait (with and
    without a timeout), kill and wait_exit answer as Popen's."""
    import select

    from vtool.early import Opener, wait_exit

    r, w = os.pipe()
    os.set_inheritable(w, True)  # as a file vtool got from whoever started it
    try:
        out = tmp_path / "fds"
        script = f'a=$(readlink /proc/$$/fd/0 /proc/$$/fd/1 /proc/$$/fd/2); echo $a > {out}.t; mv {out}.t {out}; exec sleep 30'
        p = Opener(["sh", "-c", script], dict(os.environ), Opener.spawn_actions())
        os.close(w)
        w = -1
        assert os.getsid(p.pid) == p.pid
        ready, _, _ = select.select([r], [], [], 10)
        assert ready and os.read(r, 1) == b"", "the program holds the caller's pipe"
        wait_for(out.exists, 10)
        assert out.read_text().split() == ["/dev/null"] * 3, out.read_text()
        assert p.poll() is None
        try:
            p.wait(timeout=0.1)
            raise AssertionError("no timeout")
        except subprocess.TimeoutExpired:
            pass
        p.kill()
        assert p.wait() == -9 and p.poll() == -9
        p.kill()  # (ended: nothing to do)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    quick = Opener(["sh", "-c", "exit 5"], dict(os.environ), Opener.spawn_actions())
    assert wait_exit(quick, 10) == 5 and wait_exit(quick, 10) == 5  # (at its end: else TimeoutExpired)


def test_the_short_names_hash_as_sha256() -> None:
    import hashlib

    from vtool.state import sha256_hex

    for data in (b"", b"vtool", bytes(range(256)) * 9):
        assert sha256_hex(data) == hashlib.sha256(data).hexdigest()


def test_a_node_command_connects_before_it_loads_what_it_does_not_need(venv: Env) -> None:
    """``vtool run`` opens its connections before typing is imported (only type checkers
    import it in main, early and the package), and it loads neither hashlib (OpenSSL) nor
    secrets. (Nor tempfile, when the connection sockets fit under VTOOL_HOME, as
    ~/.vtool's do; the tests' VTOOL_HOME is too long for that.)"""
    venv.ok("launch", "2")
    venv.ok("run", "true")
    code = (
        "import sys\n"
        "sys.argv = ['vtool', 'run', 'true']\n"
        "import vtool.early as early\n"
        "seen = {}\n"
        "start = early.start\n"
        "def watched(args):\n"
        "    seen['typing'] = 'typing' in sys.modules\n"
        "    return start(args)\n"
        "early.start = watched\n"
        "from vtool.main import main\n"
        "main()\n"
        "print('TYPING-AT-START=%s' % seen['typing'])\n"
        "print('LOADED=' + ','.join(m for m in ('secrets', 'hashlib', '_hashlib') if m in sys.modules))\n"
    )
    _close_connections(venv)
    r = venv.run_cmd([sys.executable, "-c", code], extra_env={"VTOOL_DEBUG": "1"})
    assert r.returncode == 0, r.stderr
    assert "opening 2 connection(s) while starting" in r.stderr, r.stderr
    assert r.stdout.strip().splitlines()[-2:] == ["TYPING-AT-START=False", "LOADED="], r.stdout


def test_refused_input_leaves_no_connection(venv: Env) -> None:
    """Input vtool can check at start-up (a missing folder, an unknown node) opens nothing;
    input only vtool itself refuses later closes what was opened, and stops what was still
    being opened."""
    venv.ok("launch", "2")
    venv.ok("run", "true")
    _close_connections(venv)
    for args in (("inject", str(venv.root / "nosuch")), ("run", "true", "--nodes", "0-5"), ("run", "  ")):
        r = venv.cli(*args, extra_env={"VTOOL_DEBUG": "1"})
        assert r.returncode != 0 and "while starting" not in r.stderr, (args, r.stderr)
    # Node 1 hangs: its port accepts connections and never answers.
    from vtool.providers.local import LocalProvider

    LocalProvider._stop_processes(venv.vhome / "clusters" / "default" / "nodes" / "1")
    port = int(venv.node_meta(1)["port"])  # type: ignore[call-overload]
    with socket.socket() as mute:
        mute.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        mute.bind(("127.0.0.1", port))
        mute.listen(16)
        # The last run failed nowhere: nothing to re-run, which only vtool itself knows.
        r = venv.cli("run", "true", "--only-failed", extra_env={"VTOOL_DEBUG": "1"})
        assert r.returncode != 0 and "no failed nodes to re-run" in r.stderr, r.stderr
        assert "opening 2 connection(s) while starting" in r.stderr, r.stderr
        out = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True).stdout
        openers = [ln for ln in out.splitlines() if ln.startswith("ssh ") and f"Port={port} " in ln]
        assert not openers, openers  # still connecting to node 1: stopped
        cm = control_dir_path(venv.vhome)
        assert wait_for(lambda: not [p for p in cm.iterdir() if p.is_socket()]), "the connection to node 0 stayed open"


def test_connections_open_through_vtool_connect_and_failures_read_as_before(venv: Env) -> None:
    venv.ok("launch", "2")
    venv.ok("run", "true")
    helpers = list((venv.vhome / "bin").glob("vtool-connect-*"))
    assert helpers and os.access(helpers[0], os.X_OK), "vtool-connect was not built (is cc installed?)"
    if shutil.which("musl-gcc"):  # (scripts/bootstrap.sh installs it) a static program: no glibc start-up
        assert _interpreter(helpers[0]) is None, "vtool-connect was not built with musl-gcc -static"
    # A node whose sshd is gone: the same one-line reason as plain ssh gives.
    from vtool.providers.local import LocalProvider

    LocalProvider._stop_processes(venv.vhome / "clusters" / "default" / "nodes" / "1")
    _close_connections(venv)
    r = venv.cli("run", "true")
    assert r.returncode != 0
    assert "Connection refused" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "proxy dialer" not in r.stdout + r.stderr
    # ssh.nodelay: false connects without it (its record, a context of its own, says how).
    recorded = set(_records(venv))
    r = venv.ok("run", "true", "--nodes", "0", extra_env={"VTOOL_SSH_NODELAY": "false"})
    assert "1 ok, 0 failed" in r.stderr
    [new] = set(_records(venv)) - recorded
    assert "ProxyCommand" not in new.read_text() and "ProxyCommand" in sorted(recorded)[0].read_text()


_SHARE_PROBE = """
import json, os, socket
from vtool import early

def sockets():
    found = []
    for f in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{f}").startswith("socket:"):
                found.append(f)
        except OSError:  # listdir's own descriptor, gone by now
            pass
    return sorted(found)

before = sockets()
n = early.start(["run", "true"])
opened = list(early._opened)
for s in opened:
    assert early._started[s].wait(30) == 0  # the connection is open (early.wait would use its copy)
listener = early._share_path
with early._share_lock:
    early._receive_copies()
peers = sorted(socket.socket(fileno=os.dup(fd)).getpeername()[1] for fd in early._shared.values())
out = {"started": n, "named": sorted(early._shared) == sorted(opened), "peers": peers,
       "listening": os.path.exists(listener)}
for s in opened:
    early.wait(s, 30)  # the first session: the copy is used and closed
    early.wait(s, 30)  # a second one: nothing left to do
out.update(left=len(early._shared), leaked=sorted(set(sockets()) - set(before)))
early.abandon()
print(json.dumps(out))
"""


def test_early_connections_give_vtool_a_copy_for_its_first_command(venv: Env) -> None:
    """vtool-connect hands this process a copy of each connection opened early (by a socket
    in the private control folder), named by its control socket; early.wait uses each once
    (the latency it saves is measured, not tested: see vtool.early). These are the OpenSSH
    masters' connections: `run` opens its own with vtool.keeper unless VTOOL_KEEPER=0."""
    import json

    venv.env["VTOOL_KEEPER"] = "0"
    venv.ok("launch", "3")
    venv.ok("run", "true")
    _close_connections(venv)
    r = venv.run_cmd([sys.executable, "-c", _SHARE_PROBE])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ports = sorted(int(venv.node_meta(i)["port"]) for i in range(3))  # type: ignore[call-overload]
    assert out == {"started": 3, "named": True, "peers": ports, "listening": False, "left": 0, "leaked": []}
    assert not list(control_dir_path(venv.vhome).glob(".share-*"))


def test_a_share_nobody_takes_changes_nothing(venv: Env) -> None:
    """The copy is best effort: with nothing, a plain file, or a listener that never accepts
    at VTOOL_CONNECT_SHARE, each connection still opens (as vtool.early opens it), and the
    command then runs on it."""
    import json

    venv.ok("launch", "3")
    venv.ok("run", "true")
    _close_connections(venv)
    [record] = _records(venv)
    nodes = json.loads(record.read_text())["nodes"]
    (venv.root / "plain").write_text("")
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.bind(str(venv.root / "deaf"))
    deaf.listen(0)
    queued = []
    for _ in range(4):  # its queue full: vtool-connect's (non-blocking) connect is refused
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(str(venv.root / "deaf"))
        except BlockingIOError:
            c.close()
            break
        queued.append(c)
    try:
        for i, target in enumerate(("nothing-here", "plain", "deaf")):
            env = dict(venv.env, SHELL="/bin/sh", VTOOL_CONNECT_SHARE=str(venv.root / target), VTOOL_CONNECT_AS="x")
            r = subprocess.run(nodes[str(i)]["argv"], env=env, capture_output=True, text=True, timeout=60, check=False)
            assert r.returncode == 0, (target, r.stderr)
            assert Path(nodes[str(i)]["socket"]).is_socket()
        before = [_accepted(venv, i) for i in range(3)]
        r = venv.ok("run", "echo ok-$VTOOL_NODE_INDEX")
        assert "3 ok, 0 failed" in r.stderr, r.stderr
        assert [_accepted(venv, i) for i in range(3)] == before  # the connections opened above
    finally:
        for c in queued:
            c.close()
        deaf.close()


def _helper_and_server(tmp_path: Path) -> tuple[str, socket.socket]:
    """vtool-connect built into ``tmp_path`` (skips without a C compiler), and a listening
    socket on 127.0.0.1 for it to connect to."""
    from vtool.ssh import connect_helper

    helper = connect_helper(tmp_path / "bin")
    if helper is None:
        import pytest

        pytest.skip("no C compiler: vtool-connect cannot be built here")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    return helper, server


def test_vtool_connect_reports_a_failed_hand_over_as_ssh_would(tmp_path: Path) -> None:
    """When ssh cannot take the socket (vtool-connect's stdout is no socket), the helper
    fails with ssh's own wording, in the log ssh reads, and gives no copy to anyone."""
    helper, server = _helper_and_server(tmp_path)
    share = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    share.bind(str(tmp_path / "share"))
    share.listen(1)
    share.setblocking(False)
    port = server.getsockname()[1]
    log = tmp_path / "ssh.log"
    try:
        with open(tmp_path / "out", "wb") as out:
            r = subprocess.run(
                [helper, "127.0.0.1", str(port), "5", str(log)],
                stdout=out,
                env={"VTOOL_CONNECT_SHARE": str(tmp_path / "share"), "VTOOL_CONNECT_AS": "x"},
                timeout=30,
                check=False,
            )
        assert r.returncode == 255
        assert log.read_text() == f"ssh: connect to host 127.0.0.1 port {port}: Socket operation on non-socket\n"
        try:
            share.accept()
            raise AssertionError("a copy was given for a connection ssh never got")
        except BlockingIOError:
            pass
    finally:
        server.close()
        share.close()


def test_vtool_connect_reads_its_command_line_when_it_is_the_shell_of_ssh(tmp_path: Path) -> None:
    """ssh runs its ProxyCommand as ``$SHELL -c "exec COMMAND"``, and vtool gives ssh
    vtool-connect as $SHELL: it splits the words as sh would (quoted paths with blanks and
    quotes included) and hands the connection over; a line it did not write is refused."""
    import shlex

    helper, server = _helper_and_server(tmp_path)
    port = server.getsockname()[1]
    log = tmp_path / "a dir" / "it's \"the\" log"
    log.parent.mkdir()
    ours, theirs = socket.socketpair()
    try:
        line = " ".join(shlex.quote(w) for w in (helper, "127.0.0.1", str(port), "5", str(log)))
        r = subprocess.run([helper, "-c", f"exec {line}"], stdout=theirs, timeout=30, check=False)
        assert r.returncode == 0
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        with socket.socket(fileno=fds[0]) as got:
            accepted, _ = server.accept()
            with accepted:
                got.sendall(b"x")
                assert accepted.recv(1) == b"x"
        assert not log.exists()
        # Unreachable: the reason goes to the log named in the quoted word.
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
        closed.close()
        line = " ".join(shlex.quote(w) for w in (helper, "127.0.0.1", str(dead), "5", str(log)))
        r = subprocess.run([helper, "-c", f"exec {line}"], stdout=theirs, timeout=30, check=False)
        assert r.returncode == 255 and "Connection refused" in log.read_text()
        for bad in (f"{line}", f"exec {line}; touch {tmp_path}/x", f"exec {helper} 127.0.0.1 $PORT 5", "exec 'a"):
            r = subprocess.run([helper, "-c", bad], stdout=theirs, stderr=subprocess.PIPE, timeout=30, check=False)
            assert r.returncode == 2 and b"not a command it runs: " + bad.encode() + b"\n" in r.stderr, bad
        assert not (tmp_path / "x").exists()
    finally:
        server.close()
        ours.close()
        theirs.close()


def _interpreter(program: Path) -> bytes | None:
    """The dynamic loader an ELF program names (its PT_INTERP), None for a static program."""
    import struct

    data = program.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF program"
    end = "<" if data[5] == 1 else ">"
    (phoff,) = struct.unpack_from(end + "Q", data, 0x20)
    size, count = struct.unpack_from(end + "HH", data, 0x36)
    for i in range(count):
        kind, _, offset, _, _, filesz = struct.unpack_from(end + "IIQQQQ", data, phoff + i * size)
        if kind == 3:  # PT_INTERP
            return data[offset : offset + filesz].rstrip(b"\0")
    return None


def test_vtool_connect_is_built_by_the_first_compiler_there_is(tmp_path: Path, monkeypatch: Any) -> None:
    """Without musl-gcc (a machine without Debian's musl-tools) vtool-connect is built with cc,
    as a program that uses the C library's loader; a compiler that fails is passed over."""
    if not shutil.which("cc"):
        import pytest

        pytest.skip("no C compiler")
    from vtool import ssh

    fails = tmp_path / "fails"
    fails.write_text("#!/bin/sh\nexit 1\n")
    fails.chmod(0o755)
    monkeypatch.setattr(ssh, "HELPER_BUILDS", (("no-such-compiler-here",), (str(fails), "-O2"), ("cc", "-O2")))
    monkeypatch.setattr(ssh, "_helper", {})
    helper = ssh.connect_helper(tmp_path / "bin")
    assert helper is not None and Path(helper).name.startswith("vtool-connect-")
    assert _interpreter(Path(helper)) is not None  # cc's: dynamically linked
    r = subprocess.run([helper, "-c", "exec"], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "not a command it runs" in r.stderr  # the program runs

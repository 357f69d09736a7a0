"""vtool.keeper: a run's connections opened by one process (libssh2) instead of an ssh master
per node, on real sshd nodes: what runs through it, what does not, and what it does when a
node dies, a key is not the pinned one, vtool is interrupted or the keeper itself is killed."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Env, make_package, started_run, wait_for

pytest.importorskip("ssh2.session", reason="ssh2-python is installed with vtool (setup.cfg)")


def _sockets(env: Env) -> list[str]:
    from vtool.state import control_dir_path

    cm = control_dir_path(env.vhome)
    return sorted(p.name for p in cm.iterdir() if p.is_socket()) if cm.is_dir() else []


def _keepers(env: Env) -> set[int]:
    """The live keepers of ``env``'s vtool: named KEEPER_NAME, forked from a vtool whose
    VTOOL_HOME was env's."""
    from vtool.early import KEEPER_NAME
    from vtool.providers.local import _proc_alive

    found = set()
    home = f"VTOOL_HOME={env.vhome}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != KEEPER_NAME:
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if home not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        if _proc_alive(int(pid)):
            found.add(int(pid))
    return found


def _close_all(env: Env) -> None:
    """Close every shared connection (masters and keepers alike: both answer ssh -O exit)."""
    from vtool.state import control_dir_path

    cm = control_dir_path(env.vhome)
    for sock in cm.iterdir() if cm.is_dir() else []:
        if sock.is_socket():
            subprocess.run(
                ["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                capture_output=True,
                timeout=10,
                check=False,
            )
    wait_for(lambda: not _sockets(env) and not _keepers(env))


def _keeper_up(env: Env, n: int) -> int:
    """A cold run (after one that wrote vtool.early's record): its connections are one
    keeper's, and no ssh master was started. Returns the keeper's process id."""
    env.ok("run", "true")
    _close_all(env)
    env.ok("run", "true")
    socks = _sockets(env)
    assert len(socks) == n and all(s.endswith(".k") for s in socks), socks
    (pid,) = _keepers(env)
    return pid


def _node_pids(env: Env, i: int) -> list[int]:
    from vtool.providers.local import node_processes

    meta = env.node_meta(i)
    return node_processes(int(meta["pid"]), str(meta["token"]))


def _kill_node(env: Env, i: int) -> None:
    for pid in _node_pids(env, i):
        os.kill(pid, signal.SIGKILL)


def test_the_keeper_keeps_none_of_the_commands_files(venv: Env) -> None:
    """The keeper is a fork of the vtool command that starts it, named vtool-keeper. It keeps
    none of that command's files: not its output pipe (a reader of vtool's output sees the
    end when vtool ends, not minutes later with the keeper), not a file vtool inherited, not
    its terminal (stdin, stdout and stderr are /dev/null), in a session of its own."""
    from vtool.early import KEEPER_NAME

    venv.ok("launch", "2")
    venv.ok("run", "true")
    _close_all(venv)
    extra_r, extra_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vtool", "run", "true"],
            cwd=venv.work,
            env=venv.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(extra_w,),
        )
        assert proc.stdout is not None and proc.stderr is not None
        fds = (extra_r, extra_w, proc.stdout.fileno(), proc.stderr.fileno())
        mine = {os.readlink(f"/proc/self/fd/{fd}") for fd in fds}
        _, err = proc.communicate(timeout=60)  # (returns at the end of the pipes)
        assert proc.returncode == 0, err
        (pid,) = _keepers(venv)
    finally:
        os.close(extra_r)
        os.close(extra_w)
    held = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert all(held[str(fd)] == os.devnull for fd in (0, 1, 2)), held
    assert not mine & set(held.values()), held
    assert all(t.startswith(("socket:", "anon_inode:", "pipe:")) for fd, t in held.items() if int(fd) > 2), str(held)
    assert Path(f"/proc/{pid}/comm").read_text().strip() == KEEPER_NAME
    assert os.getsid(pid) not in (os.getsid(0), proc.pid)


def test_a_cold_run_goes_through_one_keeper_and_data_through_the_masters(venv: Env) -> None:
    """The run's output, its stderr apart, each node's exit code; a warm run through the same
    keeper; an inject (a package: data) over OpenSSH masters; terminate ends both."""
    venv.ok("launch", "4")
    pid = _keeper_up(venv, 4)
    r = venv.cli("run", "echo out-$VTOOL_NODE_INDEX; echo err-$VTOOL_NODE_INDEX >&2; exit $((VTOOL_NODE_INDEX + 2))")
    assert r.returncode == 1, r.stderr
    for i in range(4):
        assert f"[{i}] out-{i}" in r.stdout and f"[{i}] err-{i}" in r.stderr, (r.stdout, r.stderr)
        assert f"out-{i}" not in r.stderr and f"err-{i}" not in r.stdout
    rows = {
        w[0]: w[1]
        for w in map(str.split, r.stderr.splitlines())
        if len(w) > 3 and w[0].isdigit() and w[2].endswith("s")
    }
    assert rows == {str(i): str(i + 2) for i in range(4)}, r.stderr
    assert _keepers(venv) == {pid} and all(s.endswith(".k") for s in _sockets(venv))

    pkg = make_package(venv.root, "p", "#!/bin/sh\necho launched > launched.txt\n", {"data.bin": "x" * 200_000})
    venv.ok("inject", str(pkg))
    masters = [s for s in _sockets(venv) if not s.endswith(".k")]
    assert len(masters) == 4, _sockets(venv)  # the package went over OpenSSH
    r = venv.ok("run", "cat p/data.bin | wc -c")
    assert r.stdout.count("200000") == 4, r.stdout
    venv.ok("terminate", "--yes")
    wait_for(lambda: not _keepers(venv) and not _sockets(venv))


def test_input_goes_through_the_keeper_and_a_file_through_the_master(venv: Env) -> None:
    """SshClient: bytes on stdin are a command's (the keeper carries them, here 8 MB: more
    than the session's window, so libssh2 takes them in parts); a file on stdin is data (the
    OpenSSH master carries it, and only then is one opened)."""
    import vtool
    from vtool import api

    venv.ok("launch", "2")
    _keeper_up(venv, 2)
    s = api.Session(vtool.settings())
    client = s.client(s.info().nodes[1])
    data = os.urandom(8 << 20)
    r = client.run("sha256sum", input=data)
    import hashlib

    assert r.exit_code == 0 and r.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    assert all(x.endswith(".k") for x in _sockets(venv))
    f = venv.root / "file.bin"
    f.write_bytes(data)
    with open(f, "rb") as fh:
        r = client.run("wc -c", input=fh)
    assert r.exit_code == 0 and r.stdout.strip() == str(len(data))
    assert len([x for x in _sockets(venv) if not x.endswith(".k")]) == 1, _sockets(venv)


def test_a_node_that_dies_is_reported_and_the_others_finish(venv: Env) -> None:
    """Node 1 dies while the command runs through the keeper (its sshd and session killed):
    node 1 is reported failed, with a message and not an exit code; the others finish. A
    node already dead before a command is reported unreachable the same way."""
    venv.ok("launch", "3")
    _keeper_up(venv, 3)
    proc = started_run(venv, "echo started; sleep 3; echo done", 3)
    _kill_node(venv, 1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "[0] done" in out and "[2] done" in out and "[1] done" not in out, out
    row = [ln for ln in err.splitlines() if ln.startswith("1 ")]
    assert row and "closed" in row[0] and " 255 " not in row[0], err
    r = venv.cli("run", "echo again")
    assert r.returncode == 1 and "[0] again" in r.stdout and "[2] again" in r.stdout and "[1]" not in r.stdout
    assert "1 ok" not in r.stderr and "2 ok, 1 failed" in r.stderr, r.stderr


def test_a_host_key_that_is_not_pinned_gets_no_command(venv: Env) -> None:
    """The keeper checks each node's host key against the cluster's known_hosts as ssh does:
    a node whose key is not the pinned one (0) or that has none pinned (1) gets no command
    (the keeper refuses it; ssh then says why); nothing is accepted on the way. (vtool.early
    starts no keeper once known_hosts changed, so this one is started as it would be.)"""
    from vtool.state import control_dir_path

    venv.ok("launch", "3")
    venv.ok("run", "true")
    (record,) = (venv.vhome / "early").glob("*.json")
    kh = venv.vhome / "clusters" / "default" / "known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(venv.root / "k")], check=True)
    fake = (venv.root / "k.pub").read_text().split()[:2]
    lines = kh.read_text().splitlines()
    tampered = [f"vtool-default-0 {' '.join(fake)}" if ln.startswith("vtool-default-0 ") else ln for ln in lines]
    tampered = [ln for ln in tampered if not ln.startswith("vtool-default-1 ")]
    kh.write_text("\n".join(tampered) + "\n")
    _close_all(venv)
    keeper = subprocess.run(
        [sys.executable, "-m", "vtool.keeper", str(record), "0", "1", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=lambda: os.umask(0),  # (its sockets are private all the same)
    )
    assert keeper.returncode == 0, keeper.stderr  # (a node it cannot open loses its socket at once)
    r = venv.cli("run", "touch ran; echo ok-$VTOOL_NODE_INDEX")
    assert r.returncode == 1, r.stderr
    assert "[2] ok-2" in r.stdout and "ok-0" not in r.stdout and "ok-1" not in r.stdout, r.stdout
    assert "does not match the key pinned for vtool-default-0" in r.stderr, r.stderr
    assert not (venv.node_home(0) / "ran").exists() and not (venv.node_home(1) / "ran").exists()
    assert (venv.node_home(2) / "ran").exists()
    assert kh.read_text() == "\n".join(tampered) + "\n"
    socks = _sockets(venv)
    assert len(socks) == 1 and socks[0].endswith(".k"), socks  # node 2's, through the keeper
    assert stat.S_IMODE((control_dir_path(venv.vhome) / socks[0]).stat().st_mode) & 0o077 == 0  # (only you)


def _sleepers(env: Env, marker: str, n: int) -> list[int]:
    from vtool.providers.local import _proc_cmdline

    return [p for i in range(n) for p in _node_pids(env, i) if " ".join(_proc_cmdline(p)) == marker]


@pytest.mark.parametrize("how", ["ctrl-c", "timeout"])
def test_ctrl_c_and_a_timeout_stop_the_command_on_the_nodes(venv: Env, how: str) -> None:
    """Through the keeper as through a master: Ctrl-C (exit 130) and a timeout stop the
    remote command on every node."""
    venv.ok("launch", "3")
    _keeper_up(venv, 3)
    if how == "timeout":
        r = venv.cli("run", "sleep 82; echo never", extra_env={"VTOOL_TIMEOUT_COMMAND": "1"})
        assert r.returncode == 1 and "timed out after 1s" in r.stderr and "never" not in r.stdout, r.stderr
        wait_for(lambda: not _sleepers(venv, "sleep 82", 3))
        return
    proc = started_run(venv, "echo started; sleep 83", 3)
    wait_for(lambda: len(_sleepers(venv, "sleep 83", 3)) == 3)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    wait_for(lambda: not _sleepers(venv, "sleep 83", 3))
    assert venv.cli("run", "true").returncode == 0  # the keeper still serves


def test_a_command_is_stopped_when_vtool_is_killed(venv: Env) -> None:
    """vtool killed outright (no Ctrl-C handling) while its commands run through the keeper:
    the guard session each node has once a command ran GUARD_AFTER seconds stops the command
    when its session ends. The keeper ends it twice over, as a master does: it passes on the
    end of the session's stdin, and it closes the sessions whose client went away (checked:
    this fails with neither, not with one)."""
    import time

    from vtool.ssh import GUARD_AFTER

    venv.ok("launch", "2")
    _keeper_up(venv, 2)
    proc = started_run(venv, "echo started; sleep 84", 2)
    wait_for(lambda: len(_sleepers(venv, "sleep 84", 2)) == 2)
    time.sleep(GUARD_AFTER + 0.5)
    proc.kill()
    proc.communicate(timeout=30)
    wait_for(lambda: not _sleepers(venv, "sleep 84", 2))
    assert venv.cli("run", "true").returncode == 0 and len(_keepers(venv)) == 1


def test_a_killed_keeper_is_replaced(venv: Env) -> None:
    """A keeper killed outright leaves sockets nothing listens at: the next run does not
    trip over them (it runs, on every node), and the one after has a new keeper."""
    venv.ok("launch", "3")
    pid = _keeper_up(venv, 3)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _keepers(venv))
    assert len(_sockets(venv)) == 3  # (left behind)
    r = venv.ok("run", "echo fine")
    assert r.stdout.count("fine") == 3
    _close_all(venv)
    venv.ok("run", "true")
    assert len(_keepers(venv)) == 1 and all(s.endswith(".k") for s in _sockets(venv))


def test_a_keeper_told_to_stop_says_no_to_a_request_it_has_not_started(venv: Env) -> None:
    """SIGTERM while a client's request waits (here for its descriptors): the keeper answers
    "no" (then vtool runs ssh for that node), not an end of file, after which vtool could not
    know whether the command ran. The next run then works with a new keeper."""
    import socket
    import struct

    from vtool import mux
    from vtool.state import control_dir_path

    venv.ok("launch", "2")
    pid = _keeper_up(venv, 2)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(str(control_dir_path(venv.vhome) / _sockets(venv)[0]))
    assert mux._hello(client)  # (the keeper has taken the connection)
    request = struct.pack(">III", mux.NEW_SESSION, 7, 0) + struct.pack(">IIIII", 0, 0, 0, 0, mux.NO_ESCAPE)
    mux._send(client, request + struct.pack(">I", 0) + struct.pack(">I", 4) + b"true")
    os.kill(pid, signal.SIGTERM)
    kind, body = mux._recv(client)
    assert kind == mux.S_PERMISSION_DENIED and "stopping" in mux._reason(body)
    assert struct.unpack(">I", body[:4]) == (7,)  # (OpenSSH's ssh gives up on a reply to another id)
    client.close()
    wait_for(lambda: not _keepers(venv))
    assert venv.ok("run", "echo again").stdout.count("again") == 2


def test_a_stopping_keeper_closes_on_a_client_whose_request_it_has_not_read(venv: Env) -> None:
    """A request the keeper has only part of, so no request id to answer: end of file, on
    which OpenSSH's ssh connects by itself (a "no" to another id would make it give up)."""
    import socket
    import struct

    from vtool import mux
    from vtool.state import control_dir_path

    venv.ok("launch", "2")
    pid = _keeper_up(venv, 2)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(str(control_dir_path(venv.vhome) / _sockets(venv)[0]))
    assert mux._hello(client)
    request = struct.pack(">III", mux.NEW_SESSION, 7, 0) + struct.pack(">IIIII", 0, 0, 0, 0, mux.NO_ESCAPE)
    client.sendall(struct.pack(">I", len(request) + 100) + request)  # (the rest never comes)
    os.kill(pid, signal.SIGTERM)
    assert client.recv(100) == b""
    client.close()
    wait_for(lambda: not _keepers(venv))


def test_openssh_speaks_to_the_keeper_and_vtool_keeper_0_turns_it_off(venv: Env) -> None:
    """``ssh -O check``, a command, and ``ssh -O exit`` on a keeper's socket, as on a master's;
    a terminal is refused (ssh then connects by itself). With VTOOL_KEEPER=0, a cold run opens
    OpenSSH masters."""
    from vtool.state import control_dir_path

    venv.ok("launch", "2")
    _keeper_up(venv, 2)
    sock = str(control_dir_path(venv.vhome) / _sockets(venv)[0])
    ssh = ["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-o", "ControlMaster=no", "-o", "BatchMode=yes"]
    r = subprocess.run([*ssh, "-O", "check", "x"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "Master running" in r.stderr, r.stderr
    r = subprocess.run([*ssh, "x", "echo through-the-keeper; exit 4"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 4 and r.stdout == "through-the-keeper\n", (r.stdout, r.stderr)
    r = subprocess.run([*ssh, "-O", "exit", "x"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    wait_for(lambda: not Path(sock).exists())

    _close_all(venv)
    venv.ok("run", "true", extra_env={"VTOOL_KEEPER": "0"})
    socks = _sockets(venv)
    assert len(socks) == 2 and not [s for s in socks if s.endswith(".k")] and not _keepers(venv), socks

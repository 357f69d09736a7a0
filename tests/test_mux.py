"""A command on a node with an open shared connection goes straight to its master
(vtool.mux: OpenSSH's multiplexing protocol), with no ssh process; without a usable master,
vtool runs ssh as before. Either way the command behaves the same."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import Env, pids_whose_cmdline_has, wait_for

from vtool import remote


def _session(env: Env):  # type: ignore[no-untyped-def]
    import vtool
    from vtool import api

    return api.Session(vtool.settings())


def _master_pid(sock: str) -> int:
    r = subprocess.run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "check", "x"],
                       capture_output=True, text=True, timeout=10, check=False)
    assert r.returncode == 0, r.stderr
    return int(r.stderr.split("pid=")[1].split(")")[0])


def test_commands_on_an_open_master_start_no_ssh_process(cluster3: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _session(cluster3)
    node = s.info().nodes[0]
    client = s.client(node)
    assert client.direct
    client.run("true")  # opens the shared connection (with ssh, or early's)
    assert Path(client.control_path).is_socket()  # type: ignore[arg-type]

    def no_ssh(*a: object, **k: object) -> None:
        raise AssertionError(f"an ssh process was started: {a}")

    monkeypatch.setattr(subprocess, "Popen", no_ssh)
    r = client.run("echo out; echo err >&2; cat; exit 7", input=b"from stdin\n")
    assert (r.exit_code, r.stdout, r.stderr) == (7, "out\nfrom stdin\n", "err\n")
    # A file as stdin is handed to the master as it is (the package path of inject).
    with open(__file__, "rb") as f:
        r = client.run("wc -c", input=f)
    assert r.exit_code == 0 and int(r.stdout.split()[0]) == os.path.getsize(__file__)
    # Exit 255 from the command itself is the command's, not a lost connection; so is a
    # command killed by a signal (no exit status: 255, as ssh says), while the master lives.
    assert client.run("exit 255").exit_code == 255
    assert client.run("kill -9 $$").exit_code == 255
    lines: list[tuple[str, str]] = []
    client.run("echo a; echo b >&2", on_line=lambda stream, line: lines.append((stream, line)))
    assert sorted(lines) == [("err", "b"), ("out", "a")]
    # A stream (scpget's tar) too.
    stream = client.popen_stdout("printf 'abc'; echo note >&2")
    assert stream.stdout.read() == b"abc"
    assert client.finish_stream(stream).stderr == "note\n"


def test_without_a_usable_master_ssh_runs_and_opens_one(cluster3: Env) -> None:
    s = _session(cluster3)
    node = s.info().nodes[1]
    client = s.client(node)
    client.run("true")
    sock = client.control_path
    assert sock is not None
    # A master that died and left its socket behind: ssh replaces it.
    pid = _master_pid(sock)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2])
    assert Path(sock).exists()
    r = client.run("echo again")
    assert (r.exit_code, r.stdout) == (0, "again\n")
    assert _master_pid(sock) != pid
    # No socket at all.
    client.close()
    wait_for(lambda: not Path(sock).exists())
    assert client.run("echo fresh").stdout == "fresh\n"


def test_a_master_lost_during_a_command_is_an_error_not_an_exit_code(cluster3: Env) -> None:
    from vtool.errors import NodeError

    s = _session(cluster3)
    client = s.client(s.info().nodes[2])
    client.run("true")
    pid = _master_pid(client.control_path)  # type: ignore[arg-type]
    import threading

    threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
    with pytest.raises(NodeError, match="shared connection to the node closed before the command finished"):
        client.run("sleep 20", retries=0)


def test_a_timeout_stops_the_command_on_the_node(cluster3: Env) -> None:
    r = cluster3.cli("run", "true")
    assert r.returncode == 0
    r = cluster3.cli("run", "sleep 1201", "--nodes", "0", extra_env={"VTOOL_TIMEOUT_COMMAND": "1"})
    assert r.returncode != 0 and "timed out" in r.stderr, r.stderr
    wait_for(lambda: not pids_whose_cmdline_has("sleep 1201"), timeout=15)


def _session_members(sid: int) -> list[int]:
    """The live processes in session ``sid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # (field 6: the session)
                out.append(int(entry))
    return out


def _stop_with(path: str, env: dict[str, str], command: str, stdin: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """What vtool runs in a session of its own to stop a supervised command (ssh._Watch)."""
    return subprocess.Popen([path, "-c", command], stdin=stdin, env=env, start_new_session=True)


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_supervised_names_its_group_and_is_stopped_whole(shell: str, tmp_path: Path) -> None:
    """Without the ssh layer: the wrapper under each login shell, in a session of its own as
    sshd starts it. It names its process group on stderr, and ``stop`` (or ``guard``, once its
    stdin ends) stops everything the command started. dash's kill takes no ``--``."""
    from vtool.ssh import PGID_MARK

    path = f"/bin/{shell}"
    if not os.path.exists(path):
        pytest.skip(f"{shell} is not installed")
    env = {**os.environ, "SHELL": path, "HOME": str(tmp_path)}

    def start(command: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [path, "-c", remote.supervised(command)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # as sshd does for every session
        )

    def group(p: subprocess.Popen[bytes]) -> int:
        assert p.stderr is not None
        line = p.stderr.readline().decode()
        assert line == f"{PGID_MARK}{p.pid}\n"  # the session's shell leads the group
        return p.pid

    p = start("sleep 1301 & sleep 1302; echo never")
    pgid = group(p)
    wait_for(lambda: pids_whose_cmdline_has("sleep 1301") and pids_whose_cmdline_has("sleep 1302"))
    assert _stop_with(path, env, remote.SUPERVISION.stop(pgid)).wait(timeout=20) == 0
    assert p.wait(timeout=20) == -signal.SIGTERM
    assert p.stdout is not None and b"never" not in p.stdout.read()
    wait_for(lambda: not pids_whose_cmdline_has("sleep 1301") and not pids_whose_cmdline_has("sleep 1302"))
    # The guard does the same once its stdin ends (vtool went away), not before.
    p = start("sleep 1307 & sleep 1308; echo never")
    pgid = group(p)
    wait_for(lambda: pids_whose_cmdline_has("sleep 1307") and pids_whose_cmdline_has("sleep 1308"))
    guard = _stop_with(path, env, remote.SUPERVISION.guard(pgid), stdin=subprocess.PIPE)
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=1)
    assert guard.stdin is not None
    guard.stdin.close()
    assert guard.wait(timeout=20) == 0 and p.wait(timeout=20) == -signal.SIGTERM
    wait_for(lambda: not pids_whose_cmdline_has("sleep 1307") and not pids_whose_cmdline_has("sleep 1308"))
    # $$ is the command's own shell, as under plain ssh.
    p = start("kill -TERM $$; echo after")
    assert p.wait(timeout=20) == -signal.SIGTERM
    assert p.stdout is not None and p.stdout.read() == b""
    # The command's own exit code and output otherwise (vtool's end stays open meanwhile);
    # stdin is empty.
    p = start('cat; echo out; echo "err ${vtool_c-}" >&2; exit 7')
    pgid = group(p)
    assert p.wait(timeout=20) == 7
    assert p.stdout is not None and p.stderr is not None and p.stdin is not None
    assert (p.stdout.read(), p.stderr.read()) == (b"out\n", b"err \n")  # (the wrapper's vtool_c is gone)
    p.stdin.close()
    p = start("sleep 0.1 & wait; echo waited")
    assert p.wait(timeout=20) == 0
    assert p.stdout is not None and p.stdout.read() == b"waited\n"
    # One program with plain arguments is started by exec under bash (no fork for it): it is
    # then the session's shell itself, and is stopped all the same; its exit code and
    # output are its own, it has the node's variables, and a missing one is exit 127.
    p = start("sleep 1304")
    pgid = group(p)
    wait_for(lambda: pids_whose_cmdline_has("sleep 1304"))
    if shell == "bash":
        assert wait_for(lambda: Path(f"/proc/{p.pid}/cmdline").read_bytes() == b"sleep\x001304\x00")
    assert _stop_with(path, env, remote.SUPERVISION.stop(pgid)).wait(timeout=20) == 0
    assert p.wait(timeout=20) in (-signal.SIGTERM, 128 + signal.SIGTERM)
    wait_for(lambda: not pids_whose_cmdline_has("sleep 1304"))
    (tmp_path / ".vtool").mkdir(exist_ok=True)
    (tmp_path / ".vtool" / "cluster.env").write_text("VTOOL_NODE_INDEX=5\n")
    p = start("printenv VTOOL_NODE_INDEX")
    assert p.wait(timeout=20) == 0 and p.stdout is not None and p.stdout.read() == b"5\n"
    p = start("sh -c exit")
    assert p.wait(timeout=20) == 0
    if shell == "bash":  # a shell function (as `module` from BASH_ENV) is run as the shell would, not exec'd
        (tmp_path / "env.sh").write_text("f1306() { echo function-ran; }\n")
        env["BASH_ENV"] = str(tmp_path / "env.sh")
        p = start("f1306 x")
        assert p.wait(timeout=20) == 0 and p.stdout is not None and p.stdout.read() == b"function-ran\n"
        del env["BASH_ENV"]
    p = start("no-such-program-1305 --x=1")
    assert p.wait(timeout=20) == 127 and p.stderr is not None and b"no-such-program-1305" in p.stderr.read()
    # What a finished command left running in the background stays when vtool stops it
    # afterwards, or its guard's stdin ends (as under plain ssh): only a running leader's
    # group is stopped. Nothing but the job is left in the session.
    p = start("sleep 1303 >/dev/null 2>&1 </dev/null &")
    pgid = group(p)
    assert p.wait(timeout=20) == 0
    assert _stop_with(path, env, remote.SUPERVISION.stop(pgid)).wait(timeout=20) == 0
    guard = _stop_with(path, env, remote.SUPERVISION.guard(pgid), stdin=subprocess.DEVNULL)
    assert guard.wait(timeout=20) == 0
    (left,) = _session_members(p.pid)
    try:
        with open(f"/proc/{left}/cmdline", "rb") as f:
            assert f.read() == b"sleep\x001303\x00"
    finally:
        os.kill(left, signal.SIGKILL)


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_supervised_without_a_process_group_of_its_own(shell: str, tmp_path: Path) -> None:
    """A shell that leads no process group (started as a child, not as sshd starts a session)
    runs the command in a group made by setsid, and still stops all of it."""
    path = f"/bin/{shell}"
    if not os.path.exists(path):
        pytest.skip(f"{shell} is not installed")
    env = {**os.environ, "SHELL": path, "HOME": str(tmp_path)}
    p = subprocess.Popen(
        [path, "-c", remote.supervised("sleep 1311 & sleep 1312; echo never")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert os.getpgid(p.pid) != p.pid
    wait_for(lambda: pids_whose_cmdline_has("sleep 1311") and pids_whose_cmdline_has("sleep 1312"))
    assert p.stdin is not None
    p.stdin.close()
    assert p.wait(timeout=20) == 128 + signal.SIGTERM
    assert p.stdout is not None and b"never" not in p.stdout.read()
    wait_for(lambda: not pids_whose_cmdline_has("sleep 1311") and not pids_whose_cmdline_has("sleep 1312"))
    p = subprocess.Popen(
        [path, "-c", remote.supervised("echo out; exit 7")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert p.wait(timeout=20) == 7
    assert p.stdout is not None and p.stdout.read() == b"out\n"
    assert p.stdin is not None
    p.stdin.close()


def _fake_master(path: str, behaviour: str, got_request: Any = None) -> threading.Thread:
    """A master that answers HELLO, takes one request and then: ``close``s, ``refuse``s,
    stays ``silent``, or (``garbage``) says something other than HELLO first. Sets the
    ``got_request`` event (if given) once the request and its descriptors are in."""
    import socket
    import struct
    import threading

    from vtool import mux

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            if behaviour == "garbage":
                conn.sendall(struct.pack(">III", 8, 0x12345678, 4))
                conn.recv(4096)
                return
            conn.sendall(struct.pack(">III", 8, mux.HELLO, mux.VERSION))
            def exactly(n: int) -> bytes:
                data = b""
                while len(data) < n:
                    data += conn.recv(n - len(data))
                return data

            exactly(12)  # the client's hello
            (length,) = struct.unpack(">I", exactly(4))
            exactly(length)  # the request
            for _ in range(3):  # the three descriptors, each with one byte (this test's own fds)
                for fd in socket.recv_fds(conn, 1, 1)[1]:
                    os.close(fd)
            if got_request is not None:
                got_request.set()
            if behaviour == "refuse":
                reason = b"no sessions today"
                body = struct.pack(">II", mux.S_FAILURE, 0) + struct.pack(">I", len(reason)) + reason
                conn.sendall(struct.pack(">I", len(body)) + body)
            elif behaviour == "silent":
                conn.recv(1)  # until the client gives up
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "behaviour, error, text",
    [
        ("close", "Uncertain", "closed while it opened a session"),
        ("silent", "Uncertain", "timed out after 0.5s"),
        ("refuse", "Unavailable", "no sessions today"),
        ("garbage", "Unavailable", "another protocol"),
    ],
)
def test_a_request_that_went_out_is_never_started_another_way(
    tmp_path: Path, behaviour: str, error: str, text: str
) -> None:
    """Unavailable (nothing started: ssh may run it) only when nothing can have started;
    once the request is out, no answer is Uncertain (vtool.ssh reports it, never retries)."""
    from vtool import mux

    path = str(tmp_path / "m")
    master = _fake_master(path, behaviour)
    before = set(os.listdir("/proc/self/fd"))
    p = mux.MuxProcess(path)
    with pytest.raises(getattr(mux, error), match=text):
        p.open("true", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, open_timeout=0.5)
    # (the fake master runs in this process: its end of the connection closes once it saw ours close)
    master.join(timeout=10)
    assert set(os.listdir("/proc/self/fd")) <= before  # no descriptor left open


def test_descriptors_the_master_did_not_take_mean_nothing_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request went out but its descriptors could not be passed (a keeper told to stop
    shuts its end for reading): no master starts a session without them, so this is
    Unavailable (ssh runs the command), not Uncertain, and nothing is left open."""
    from vtool import mux

    def refused(*args: Any, **kwargs: Any) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    path = str(tmp_path / "m")
    master = _fake_master(path, "silent")
    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(mux.socket, "send_fds", refused)
    p = mux.MuxProcess(path)
    with pytest.raises(mux.Unavailable, match="did not take the request"):
        p.open("true", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, open_timeout=5)
    monkeypatch.undo()
    master.join(timeout=10)
    assert set(os.listdir("/proc/self/fd")) <= before


def test_ctrl_c_stops_a_session_that_is_still_opening(tmp_path: Path) -> None:
    """Ctrl-C (vtool.ssh.kill_running) while the master has the request but has not answered:
    the session gives up at once (not at its open timeout), as an error, leaving no descriptor."""
    import threading

    from vtool import mux, ssh

    path = str(tmp_path / "m")
    got_request = threading.Event()
    master = _fake_master(path, "silent", got_request)
    before = set(os.listdir("/proc/self/fd"))
    p = ssh._track(mux.MuxProcess(path))
    raised: list[BaseException] = []

    def opening() -> None:
        try:
            p.open("true", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, open_timeout=600)
        except BaseException as e:  # noqa: B036 (the test looks at what it was)
            raised.append(e)

    t = threading.Thread(target=opening, daemon=True)
    t.start()
    try:
        assert got_request.wait(30)
        assert ssh.kill_running() >= 1
        t.join(60)
        assert not t.is_alive(), "the session waited for its open timeout"
        assert len(raised) == 1 and isinstance(raised[0], mux.Uncertain), raised
    finally:
        ssh._untrack(p)
        ssh.stopping.clear()
    master.join(30)  # (the fake master, a thread of this process, closes its end when it sees ours go)
    assert not master.is_alive()
    assert set(os.listdir("/proc/self/fd")) <= before


@pytest.mark.parametrize(
    ("command", "one"),
    [
        ("hostname", True),
        ("python3 train.py --seed=3 -o out/run_1.csv", True),
        ("  nproc  ", True),
        ("echo hi", False),  # a builtin: exec would run another program
        ("cd /tmp", False),
        ("X=1 env", False),
        ("ls *.py", False),
        ("a; b", False),
        ("a && b", False),
        ("cat <in", False),
        ("echo $HOME", False),
        ("printf '%s' x", False),
        ("a\tb", False),
        ("a\nb", False),
        ("~/bin/x", False),
        ("", False),
    ],
)
def test_one_program_is_recognised_conservatively(command: str, one: bool) -> None:
    assert remote._one_program(command) is one


def test_a_supervised_commands_output_is_its_own(cluster3: Env) -> None:
    """The wrapper's line naming its group is taken out of stderr, in the result and in the
    lines handed on as they come; the command's own stderr lines are all there."""
    s = _session(cluster3)
    client = s.client(s.info().nodes[0])
    lines: list[tuple[str, str]] = []
    r = client.run(
        remote.supervised("echo o; echo e >&2; echo $VTOOL_NODE_INDEX >&2"),
        supervision=remote.SUPERVISION,
        on_line=lambda stream, line: lines.append((stream, line)),
    )
    assert (r.exit_code, r.stdout, r.stderr) == (0, "o\n", "e\n0\n")
    assert sorted(lines) == [("err", "0"), ("err", "e"), ("out", "o")]
    # A login script that writes to stderr without a newline: its text is kept, the
    # wrapper's line still found (a timeout then stops the command).
    rc = cluster3.node_home(0) / ".bashrc"
    before = rc.read_text()
    rc.write_text("printf rc-noise >&2\n" + before)
    try:
        r = client.run(remote.supervised("echo e >&2"), supervision=remote.SUPERVISION)
        # (this node's bash reads it more than once, under plain ssh as well)
        assert r.exit_code == 0 and r.stderr.startswith("rc-noise") and r.stderr.replace("rc-noise", "") == "\ne\n"
        from vtool.errors import NodeError

        with pytest.raises(NodeError, match="timed out"):
            client.run(remote.supervised("sleep 1402"), supervision=remote.SUPERVISION, timeout=1)
        wait_for(lambda: not pids_whose_cmdline_has("sleep 1402"))
    finally:
        rc.write_text(before)


def test_mux_pipe_and_devnull_are_subprocess_own() -> None:
    """vtool.ssh hands mux.PIPE and mux.DEVNULL to Popen as well (it imports subprocess only
    when it starts a process)."""
    from vtool import mux

    assert (mux.PIPE, mux.DEVNULL) == (subprocess.PIPE, subprocess.DEVNULL)

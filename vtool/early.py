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
cannot read or naming a node the record does not have, a missing command or folder, --help)
and it does nothing: the command then connects as it always does. The connections it opens
are the ones the command would open, and they only log in (no command runs, nothing changes
on a node); when the command then refuses its input anyway (a check only vtool itself
makes), ``abandon`` closes them again.

A connection that has just logged in is slow to run its first command: the client's kernel,
which has just seen questions and answers, holds back its acknowledgements (up to 40 ms),
and sshd, which sends a command's replies in several small packets, waits for one before
sending the next. So vtool-connect gives this process a copy of each connection it opens
(``VTOOL_CONNECT_SHARE``), and ``wait``, which the command calls right before its first
session there, asks the kernel for prompt acknowledgements on it. Measured on one node: the first command
11 ms after the connection is up instead of 53 ms (a later one: 9 ms).
"""

from __future__ import annotations

import atexit
import binascii
import json
import os
import re
import sys

# Only type checkers import typing here and in vtool.main and vtool's __init__, which run
# before start: importing it (~4 ms) would delay the connections as much.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VERBS = frozenset({"run", "inject", "scpget", "scpgetall", "put", "logs"})
RECORD_NODES = 128  # a record names at most this many nodes (the first ones by index)
# At most this many connections are opened early (and never more than `concurrency`).
# Measured on 2 cores that also run the nodes: with 8 nodes, a cold `run` takes 0.26 s instead
# of 0.34 s. With 32 nodes, opening 8 or all early made no difference while every command on
# an early connection started an ssh mux client; since commands go to the master directly
# (vtool.mux), opening all 32 early takes 0.62 s instead of 0.67 s.
EARLY_MAX = 64
# The verbs whose connections vtool.keeper opens (commands only: it carries no bulk data).
KEEPER_VERBS = frozenset({"run", "logs"})
KEEPER_SUFFIX = ".k"  # (keeper_path)
KEEPER_NAME = "vtool-keeper"  # the keeper's process name (ps -o comm, top, /proc/PID/comm)


def keeper_path(control_path: str) -> str:
    """Where vtool.keeper serves the node whose OpenSSH master would be at ``control_path``
    (here, not in vtool.keeper: a command's SSH client needs only this of it)."""
    return control_path + KEEPER_SUFFIX


_VALUE_FLAGS = {"-c": "cluster", "--cluster": "cluster", "-p": "profile", "--profile": "profile"}
_NODE_FLAGS = ("-n", "--nodes", "--node")
_OTHER_VALUE_FLAGS = ("-l", "--lines")  # (logs) flags whose value is not a positional argument
_NOT_CONTEXT = frozenset({"VTOOL_DEBUG", "VTOOL_EARLY"})  # variables that change neither cluster nor SSH

_started: dict[str, Any] = {}  # control socket path -> the ssh process opening it
_share: Any = None  # the socket vtool-connect gives its connections' copies to (see the module)
_share_path = ""
_share_tried = False  # _listen ran (whether or not it could listen)
_shared: dict[str, int] = {}  # control socket path -> a copy of its TCP connection (wait uses it)
_share_lock: Any = None
_handled: set[str] = set()  # control sockets whose copy wait used or dropped (or never got)
_pending: list[Any] = []  # connections from vtool-connect whose copy has not arrived yet
_opened: list[str] = []  # every socket start opened (for abandon)
_contacted = False  # the command got past its checks and contacted the nodes (remember ran)
_key_now: str | None = None  # this command's context (set by start), for remember
_accepted: dict[str, Any] | None = None  # the record start found valid (for unchanged)
_settings: Any = None  # this command's settings, for the record (keep_settings; vtool.lean)


def _flags(args: list[str]) -> tuple[dict[str, str], list[str]] | None:
    """--cluster, --profile and --nodes as given, and the positional arguments (None: --help,
    or nothing to go on)."""
    found: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help", "--"):
            return None
        if a[:2] in ("-c", "-p", "-n", "-l") and len(a) > 2 and not a.startswith("--"):
            return None  # -cNAME: read by Invoke, not guessed here
        name, eq, value = a.partition("=")
        key = _VALUE_FLAGS.get(name) or ("nodes" if name in _NODE_FLAGS else None)
        takes_value = key is not None or name in _OTHER_VALUE_FLAGS
        if takes_value and not eq:
            if i + 1 >= len(args):
                return None
            value = args[i + 1]
            i += 1
        if key is not None:
            found[key] = value
        elif not a.startswith("-"):
            positional.append(a)
        i += 1
    return found, positional


def _input_looks_valid(verb: str, positional: list[str]) -> bool:
    """The checks of the command's own input that cost nothing here: a node is contacted
    early only when they pass (vtool checks everything again, and more)."""
    first = positional[0] if positional else ""
    if verb in ("run", "scpget", "scpgetall"):
        return bool(first.strip())
    if verb == "inject":
        path = os.path.expanduser(first)
        if os.path.isdir(path):
            return any(os.access(os.path.join(path, n), os.X_OK) for n in ("vtool-launch", "vcloud-launch"))
        return os.path.isfile(path)
    if verb == "put":
        return bool(first) and os.path.exists(os.path.expanduser(first)) and len(positional) >= 2
    return verb == "logs"


def state_home() -> str:
    """$VTOOL_HOME, else ~/.vtool: chosen by the user's environment, never by a project."""
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
    return os.path.join(state_home(), "early", f"{binascii.crc32(key.encode()):08x}.json")


def _stamp(paths: list[str]) -> list[int]:
    out = []
    for p in paths:
        try:
            out.append(os.stat(p).st_mtime_ns)
        except OSError:
            out.append(0)
    return out


def _wanted(spec: str | None, indices: list[int]) -> list[int] | None:
    """The node indices ``spec`` names; None when it names one the record does not have (the
    command will refuse it) or cannot be read."""
    if spec is None or spec.strip() in ("", "all"):
        return indices
    out: set[int] = set()
    have = set(indices)
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if not m:
            return None
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo or hi - lo > 100_000 or not set(range(lo, hi + 1)) <= have:
            return None
        out.update(range(lo, hi + 1))
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
    parsed = _flags(args[1:])
    if parsed is None:
        return 0
    flags, positional = parsed
    global _key_now
    _key_now = _key(flags)
    if not _input_looks_valid(args[0], positional):
        return 0
    try:
        fd = os.open(_record_path(_key_now), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return 0
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid() or st.st_mode & 0o022:  # only a record the user wrote alone
            return 0
        record = json.load(f)
    if record.get("context") != _key_now or _stamp(record["stamp_paths"]) != record["stamps"]:
        return 0
    global _accepted
    _accepted = record
    nodes = {int(i): n for i, n in record["nodes"].items()}
    spec = flags.get("nodes", "0" if args[0] == "scpget" else None)
    wanted = _wanted(spec, sorted(nodes))
    if not wanted:
        return 0
    keeper = args[0] in KEEPER_VERBS and _keeper_usable()
    closed = [
        (i, nodes[i]["socket"], nodes[i]["argv"])
        for i in wanted[: min(int(record["concurrency"]), EARLY_MAX)]
        if not os.path.exists(nodes[i]["socket"])
        and nodes[i]["socket"] not in _started
        and not (keeper and os.path.exists(nodes[i]["socket"] + KEEPER_SUFFIX))
    ]
    if not closed:  # (every connection is open: the usual case of a command right after another)
        return 0
    env = proxy_env(record.get("connector"))
    actions = Opener.spawn_actions()
    atexit.register(_stop_unfinished)
    kept = [(i, sock) for i, sock, argv in closed if keeper and keeper_serves(argv)]
    if kept:  # one process for these (vtool.keeper), instead of an ssh per node
        proc = Opener.keeper([_record_path(_key_now), *(str(i) for i, _ in kept)])
        for _, sock in kept:
            _started[sock + KEEPER_SUFFIX] = proc
            _opened.append(sock + KEEPER_SUFFIX)
    served = {i for i, _ in kept}
    for _, sock, argv in [c for c in closed if c[0] not in served]:
        node_env = env
        if any(a.startswith("ProxyCommand=") and "/vtool-connect-" in a for a in argv) and _listen(sock):
            node_env = {**env, "VTOOL_CONNECT_SHARE": _share_path, "VTOOL_CONNECT_AS": sock}
        _started[sock] = Opener(argv, node_env, actions)
        _opened.append(sock)
    return len(closed)


def keeper_serves(argv: list[str]) -> bool:
    """Whether vtool.keeper can open the connection this ``ssh`` command line opens as ssh
    would: no jump host, no ProxyCommand but vtool-connect, a pinned host key."""
    for a in argv:
        if a.startswith("ProxyJump=") or (a.startswith("ProxyCommand=") and "/vtool-connect-" not in a):
            return False
    return "StrictHostKeyChecking=yes" in argv


def _keeper_usable() -> bool:
    """Whether vtool.keeper can run here: ssh2-python installed, and not turned off
    (VTOOL_KEEPER=0)."""
    if os.environ.get("VTOOL_KEEPER", "1").lower() in ("0", "no", "false", "off"):
        return False
    return any(os.path.isdir(os.path.join(p or ".", "ssh2")) for p in sys.path)


def proxy_env(connector: str | None) -> dict[str, str]:
    """ssh's environment when vtool-connect is its ProxyCommand, and no VTOOL_CONNECT_* (only
    ``start`` asks vtool-connect for a copy). ssh starts a ProxyCommand with ``$SHELL -c``, and
    its only other uses of $SHELL (LocalCommand, KnownHostsCommand) are options vtool never
    gives: $SHELL is vtool-connect itself, which reads the command line as a shell would (one
    program started per connection, not two: 0.75 ms of CPU each here), or /bin/sh, which
    starts faster than a login shell like bash."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTOOL_CONNECT_")}
    env["SHELL"] = connector or "/bin/sh"
    return env


def _listen(control_socket: str) -> bool:
    """Listen (once) for the copies vtool-connect gives (see the module), next to the control
    sockets, in a folder only this user can use (no one else may hand vtool a socket, or take
    one)."""
    global _share, _share_path, _share_lock, _share_tried
    if _share_tried:
        return _share is not None
    _share_tried = True
    import socket
    import threading

    folder = os.path.dirname(control_socket)
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    if not os.path.isdir(folder) or os.path.islink(folder) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return False
    for entry in os.listdir(folder):  # what a vtool killed before it could clean up left
        if entry.startswith(".share-") and entry[7:].isdigit() and not _alive(int(entry[7:])):
            try:
                os.unlink(os.path.join(folder, entry))
            except OSError:
                pass
    path = os.path.join(folder, f".share-{os.getpid()}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(path)  # a crashed vtool's, whose process number this one has now
        except FileNotFoundError:
            pass
        listener.bind(path)
        listener.listen(EARLY_MAX)
        listener.setblocking(False)
    except OSError:
        listener.close()
        return False
    _share, _share_path, _share_lock = listener, path, threading.Lock()
    atexit.register(_stop_sharing)
    return True


def _receive_copies() -> None:
    """Take the copies vtool-connect has given so far (with _share_lock held). Never waits:
    a copy whose sender has connected but not yet sent is taken next time."""
    import socket

    while _share is not None:
        try:
            conn, _ = _share.accept()
        except OSError:  # none waiting (or anything else: they are only an optimisation)
            break
        conn.setblocking(False)
        _pending.append(conn)
    for conn in list(_pending):
        try:
            name, fds, flags, _ = socket.recv_fds(conn, 4096, 1)
        except BlockingIOError:
            continue
        except OSError:
            name, fds, flags = b"", [], 0
        _pending.remove(conn)
        conn.close()
        for fd in fds[1:]:
            os.close(fd)
        if not fds:
            continue
        os.set_inheritable(fds[0], False)
        key = name.decode(errors="replace")
        if key not in _opened or flags & socket.MSG_CTRUNC or key in _shared or key in _handled:
            os.close(fds[0])
            continue
        _shared[key] = fds[0]
    if len(set(_shared) | _handled) >= len(_opened) and not _pending:
        _close_listener()  # every connection has given its copy


def _use_copy(control_socket: str, opened: bool) -> None:
    """Ask for prompt acknowledgements on the copy of ``control_socket``'s connection when it
    ``opened`` (TCP_QUICKACK; see the module), then close the copy: a connection that did
    not open must not stay open in this process. A copy that arrives later is closed at
    once. Never raises."""
    if _share_lock is None:
        return
    try:
        with _share_lock:
            _receive_copies()
            _handled.add(control_socket)
            fd = _shared.pop(control_socket, None)
        if fd is None:
            return
        import socket

        try:
            copy = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return
        with copy:
            if opened and hasattr(socket, "TCP_QUICKACK"):  # (Linux)
                copy.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except Exception:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's
        pass
    return True


def _close_listener() -> None:
    global _share
    if _share is not None:
        _share.close()
        _share = None
        try:
            os.unlink(_share_path)
        except OSError:
            pass


def _stop_sharing() -> None:
    """At exit, or when ``abandon``ing: no more copies, and the ones held are closed."""
    try:
        _close_listener()
        for conn in _pending:
            conn.close()
        _pending.clear()
        for fd in _shared.values():
            os.close(fd)
        _shared.clear()
    except Exception:
        pass


def wait(socket: str, timeout: float) -> None:
    """If ``start`` is opening the connection ``socket``, wait until it is open (or failed),
    and make it ready for its first session (``_use_copy``). Call it right before that
    session: the first call does the work, a later one returns at once."""
    proc = _started.pop(socket, None)
    if proc is None:
        return
    try:
        opened = wait_exit(proc, timeout) == 0
    except Exception:  # not connected in time: the command connects by itself
        proc.kill()
        proc.wait()
        opened = False
    _use_copy(socket, opened)


class Opener:
    """An ``ssh`` that ``start`` runs (os.posix_spawnp: as subprocess.Popen with stdin,
    stdout and stderr on /dev/null, a session of its own and no other open file, but without
    importing subprocess first and at under half of Popen's CPU per process: the connections
    start ~5 ms sooner), with the part of Popen's interface that ``wait`` and ``abandon`` use."""

    def __init__(self, argv: list[str], env: dict[str, str], actions: list[tuple[Any, ...]]) -> None:
        """``actions``: ``spawn_actions()``."""
        import _thread

        self.args = argv
        self.returncode: int | None = None
        # (one process may open several connections, vtool.keeper's: their waits share it)
        self._lock = _thread.allocate_lock()
        self.pid = os.posix_spawnp(argv[0], argv, env, file_actions=actions, setsid=True)

    @classmethod
    def keeper(cls, args: list[str]) -> Opener:
        """vtool.keeper's ``main(args)``, in a child of this process (os.fork): unlike a new
        Python, it has this start-up done and early's imports made, so the keeper starts
        ~25 ms of CPU sooner. The child is what ``Opener`` runs: stdin, stdout and stderr on
        /dev/null, a session of its own, no other open file; it is named KEEPER_NAME. Call
        it before any thread starts (``start`` runs first thing)."""
        self = cls.__new__(cls)
        self.args = ["vtool.keeper", *args]
        self.returncode = None
        import _thread

        # What the keeper imports that the command imports as well: once, before the fork,
        # rather than in both processes (~4% of the keeper's instructions; valgrind).
        import selectors  # noqa: F401
        import socket  # noqa: F401
        import struct  # noqa: F401
        import threading  # noqa: F401

        self._lock = _thread.allocate_lock()
        self.pid = os.fork()
        if self.pid == 0:
            _become_keeper(args)  # (never returns)
        return self

    @staticmethod
    def spawn_actions() -> list[tuple[Any, ...]]:
        """stdin, stdout and stderr on /dev/null, and every other file this process could
        pass on closed: Python's own are not inheritable (PEP 446), but one this process
        inherited is, and a ControlPersist master would keep it open for minutes (a caller
        waiting for the end of a pipe would wait that long)."""
        actions: list[tuple[Any, ...]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        for fd in _descriptors():
            try:
                if os.get_inheritable(fd):
                    actions.append((os.POSIX_SPAWN_CLOSE, fd))
            except OSError:  # (the listing's own descriptor, closed by now)
                pass
        return actions

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is not None:  # (only without pidfds: see wait_exit)
            import time

            end = time.monotonic() + timeout
            while self.poll() is None:
                if time.monotonic() >= end:
                    import subprocess

                    raise subprocess.TimeoutExpired(self.args, timeout)
                time.sleep(0.005)
        with self._lock:
            if self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            import signal

            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _descriptors() -> list[int]:
    """This process's open files other than stdin, stdout and stderr (and, already closed,
    the listing's own)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # (not Linux: macOS and the BSDs list them here)
        names = os.listdir("/dev/fd")
    return [fd for fd in map(int, names) if fd > 2]


def _become_keeper(args: list[str]) -> None:
    """In Opener.keeper's child: run vtool.keeper's main, then end the process (its exit code,
    1 on any error), never returning to the command this process was forked from."""
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        for fd in _descriptors():  # (a fork keeps every file, not only the inheritable ones)
            try:
                os.close(fd)
            except OSError:  # (the listing's own descriptor)
                pass
        try:
            with open("/proc/self/comm", "w") as f:
                f.write(KEEPER_NAME)
        except OSError:  # (not Linux)
            pass
        import gc

        from .keeper import main

        gc.freeze()  # (what the command and the imports made lives on: not walked again)
        gc.enable()  # (vtool.main pauses it while it starts; the keeper runs for minutes)
        code = main(args)
    except BaseException:
        pass
    finally:
        os._exit(code)


def wait_exit(proc: Any, timeout: float) -> int:
    """``proc.wait(timeout)`` for a subprocess.Popen (or an Opener), woken by the exit itself
    (a pidfd, on Linux) rather than by Popen's polling, which sleeps up to 50 ms between looks."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux 5.3+, or already reaped
        return int(proc.wait(timeout=timeout))
    try:
        import select

        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(max(0.0, timeout) * 1000):
            import subprocess

            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(fd)
    return int(proc.wait())


def abandon() -> None:
    """The command refused its input after all: stop what ``start`` is still opening and
    close what it opened (never raises)."""
    try:
        _stop_unfinished()
        _stop_sharing()
        if not _opened:
            return
        import subprocess

        for sock in _opened:
            subprocess.run(
                ["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit", "vtool-early"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
                check=False,
            )
        _opened.clear()
    except Exception:
        pass


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


def contacted() -> bool:
    """Whether the command got past its own checks (``remember`` ran)."""
    return _contacted


def unchanged(signature: list[Any]) -> bool:
    """Whether the record ``start`` used was written with this ``signature`` (what ``remember``
    was given: then it would write the same record again). True counts as ``remember``."""
    global _contacted
    if _accepted is None or _accepted.get("signature") != signature or _accepted.get("settings") != _settings:
        return False
    _contacted = True
    return True


def keep_settings(entry: Any) -> None:
    """Have ``remember`` write ``entry`` (JSON: vtool.lean's account of this command's
    settings) into the record too; ``saved_settings`` gives it to a later command."""
    global _settings
    _settings = entry


def saved_settings() -> Any:
    """What ``keep_settings`` had the record hold, from the record ``start`` accepted for
    this command's context (same folder, VTOOL_* variables, config files, flags), or None."""
    return _accepted.get("settings") if _accepted is not None else None


def remember(
    stamp_paths: list[str],
    concurrency: int,
    nodes: dict[int, tuple[str, list[str]]],
    connector: str | None,
    signature: list[Any] | None = None,
) -> None:
    """Write the record ``start`` reads for this command's context: per node index (socket,
    the ``ssh`` command that opens that shared connection in the background), and the
    vtool-connect those commands use (``proxy_env``), with ``signature`` (any JSON list: see
    ``unchanged``). Only when the record changed; never raises."""
    global _contacted
    _contacted = True
    if _key_now is None:
        return
    try:
        data = {
            "context": _key_now,
            "stamp_paths": stamp_paths,
            "stamps": _stamp(stamp_paths),
            "concurrency": concurrency,
            "connector": connector,
            "signature": signature,
            "settings": _settings,
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
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(folder)
        if not os.path.isdir(folder) or os.path.islink(folder) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return  # not a private folder of this user's: write nothing there
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except Exception:  # a cache: losing it only costs speed
        pass

"""vtool's one SSH path: the OpenSSH client, strictly verifying host keys, sharing one
connection per node (ControlMaster), for commands, streams and interactive shells.

OpenSSH rather than paramiko: connection sharing makes a warm command cost a few ms,
a cheap key exchange (``ssh.kex``) is a setting, ``connect`` needs a real TTY, and
``ssh-config`` output can be used with the same options by hand (see docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import early, mux
from .early import keeper_path
from .errors import ConfigError, HostKeyMismatch, NodeError, NodeUnreachable, VtoolError
from .models import CommandResult, SshTarget
from .mux import DEVNULL, PIPE
from .state import ensure_private_dir, sha256_hex

if TYPE_CHECKING:
    from .config import SshSettings


class _Subprocess:
    """The subprocess module, imported when first used: a command served by a shared
    connection (vtool.mux) never starts a process, and the import was ~3% of its start-up.
    ``except subprocess.TimeoutExpired`` is looked up only when an exception is matched."""

    def __getattr__(self, name: str) -> Any:
        import subprocess as module

        return getattr(module, name)


subprocess = _Subprocess()

LineCallback = Callable[[str, str], None]  # (stream "out"|"err", line without newline)

Process = Any  # a subprocess.Popen of ssh, or a mux.MuxProcess (a session of an open master)

_running: set[Process] = set()
_running_lock = threading.Lock()


class _Stopping:
    """Set on Ctrl-C (kill_running) until the next command: no new ssh client starts, and
    every command's wait (``_collect``) ends, whether or not its session has (a session of
    a master stays open as long as its remote command runs). A threading.Event, with a
    descriptor that is readable while it is set, to poll with the command's output."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._pipe: tuple[int, int] | None = None

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def set(self) -> None:
        with self._lock:
            self._event.set()
            if self._pipe is not None:
                self._fill()

    def clear(self) -> None:
        with self._lock:
            self._event.clear()
            if self._pipe is not None:
                try:
                    while os.read(self._pipe[0], 64):
                        pass
                except BlockingIOError:
                    pass

    def fileno(self) -> int:
        with self._lock:
            if self._pipe is None:
                self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                if self._event.is_set():
                    self._fill()
            return self._pipe[0]

    def _fill(self) -> None:
        assert self._pipe is not None
        try:
            os.write(self._pipe[1], b"x")
        except BlockingIOError:  # (full: readable all the same)
            pass


stopping = _Stopping()


def _track(proc: Process) -> Process:
    with _running_lock:
        _running.add(proc)
        if stopping.is_set():  # started just as vtool was interrupted
            proc.kill()
    return proc


def _check_stopping() -> None:
    if stopping.is_set():
        raise NodeError("interrupted")


def _untrack(proc: Process) -> None:
    with _running_lock:
        _running.discard(proc)


def kill_running() -> int:
    """Kill every ssh client vtool started and that is still running (on Ctrl-C), and
    refuse to start new ones until ``stopping`` is cleared."""
    stopping.set()
    with _running_lock:
        procs = list(_running)
    for p in procs:
        try:
            p.kill()
        except OSError:
            pass
    return len(procs)


# stderr fragments meaning "the connection was never made": safe to retry.
_CONNECT_FAILURES = (
    "Connection refused",
    "Connection timed out",
    "Connection reset",
    "kex_exchange_identification",
    "No route to host",
    "Connection closed by remote host",
    "mux_client_request_session",
    "ControlSocket",
)


_BLANK = re.compile(r"\s")


# The algorithm settings and what ``ssh -Q`` calls each.
_ALGORITHM_SETTINGS = (("kex", "kex"), ("ciphers", "cipher"), ("hostkeys", "HostKeyAlgorithms"))


def check_algorithms(program: str, settings: SshSettings) -> None:
    """ConfigError naming the first algorithm in ``ssh.kex``, ``ssh.ciphers`` or
    ``ssh.hostkeys`` that the OpenSSH client ``program`` does not know (``ssh -Q``), so that
    a typo is refused before anything is launched, not after every node was made. A list
    that adds or removes (``+``, ``-``, ``^``) is checked by its names; patterns are not.
    Where ssh cannot list what it knows (another client), nothing is checked."""
    for name, query in _ALGORITHM_SETTINGS:
        value: str = getattr(settings, name)
        if not value:
            continue
        try:
            r = subprocess.run(
                [program, "-Q", query],
                stdin=DEVNULL,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return
        known = set(r.stdout.split())
        if r.returncode != 0 or not known:
            continue
        for word in value.lstrip("+-^").split(","):
            word = word.strip()
            if not word or "*" in word or "?" in word:
                continue
            if word not in known:
                raise ConfigError(
                    f"ssh.{name}: this OpenSSH client does not know {word!r} (`{program} -Q {query}` lists what it knows)"
                )


def _is_address(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (not a name)."""
    import socket

    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False


def ssh_options(
    target: SshTarget,
    *,
    persist: int,
    connect_timeout: float,
    kex: str,
    control_dir: Path | None,
    control_name: str = "%C",
    ciphers: str = "",
) -> list[str]:
    """The ``-o`` options every vtool connection uses."""
    opts = {
        "IdentityFile": target.key_file,
        "IdentitiesOnly": "yes",
        "IdentityAgent": "none",
        "BatchMode": "yes",
        "StrictHostKeyChecking": "yes",
        "UserKnownHostsFile": target.known_hosts,
        "GlobalKnownHostsFile": "/dev/null",
        "HostKeyAlias": target.host_key_alias,
        "CheckHostIP": "no",
        "UpdateHostKeys": "no",
        "ConnectTimeout": str(max(1, int(connect_timeout))),
        "ServerAliveInterval": "5",
        "ServerAliveCountMax": "3",
        "ForwardAgent": "no",
        "ForwardX11": "no",
        "LogLevel": "ERROR",
        "User": target.user,
        "Port": str(target.port),
    }
    if kex:
        opts["KexAlgorithms"] = kex
    if ciphers:
        opts["Ciphers"] = ciphers
    if control_dir is not None:
        opts.update(
            ControlMaster="auto", ControlPath=str(control_dir / control_name), ControlPersist=str(max(1, persist))
        )
    if target.proxy_jump:
        opts["ProxyJump"] = target.proxy_jump
    out: list[str] = []
    for key, value in opts.items():
        # Quoted as in ssh_config, so a path with spaces (a VTOOL_HOME under "My Files") works.
        out += ["-o", f'{key}="{value}"' if _BLANK.search(value) else f"{key}={value}"]
    return out


class SshClient:
    """Runs commands on one node over a shared, verified OpenSSH connection."""

    def __init__(
        self,
        target: SshTarget,
        *,
        program: str = "ssh",
        persist: int = 300,
        connect_timeout: float = 10,
        kex: str = "",
        control_dir: Path | None = None,
        control_name: str = "%C",
        retries: int = 2,
        ciphers: str = "",
        connector: str | None = None,
        hostkeys: str = "",
    ) -> None:
        """``hostkeys``: the host key types ``first_contact`` prefers, in order ("": ssh's own)."""
        self.target = target
        self.hostkeys = hostkeys
        # vtool-connect (connect_helper), when there is one, no jump host is in the way and
        # the host is an address (a static build resolves names without the system's NSS
        # modules: a name that only they know is left to ssh).
        self.connector = None if target.proxy_jump or not _is_address(target.host) else connector
        self.program = program
        self.control_dir = control_dir
        self.control_path = str(control_dir / control_name) if control_dir is not None else None
        # Commands go straight to an open master (vtool.mux), not through an ssh process,
        # unless ssh is some other program (then it is always run) or the path has %-tokens.
        self.direct = (
            os.path.basename(program) == "ssh" and self.control_path is not None and "%" not in self.control_path
        )
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.options = ssh_options(
            target,
            persist=persist,
            connect_timeout=connect_timeout,
            kex=kex,
            control_dir=control_dir,
            control_name=control_name,
            ciphers=ciphers,
        )

    def argv(self, command: str | None = None, *, tty: bool = False, log: str | None = None) -> list[str]:
        if self.control_path is not None:  # a connection vtool's start-up is opening (vtool.early)
            early.wait(self.control_path, self.connect_timeout + 5)
        args = [self.program, "-F", "/dev/null", *self.options, *self._connector_options(log)]
        if log is not None:  # ssh's own messages, kept apart from the remote command's stderr
            args += ["-E", log]
        if tty:
            args.append("-tt" if command else "-t")
        else:
            args.append("-T")
        args += ["--", self.target.host]
        if command is not None:
            args.append(command)
        return args

    def opener_argv(self) -> list[str] | None:
        """The command that opens this node's shared connection and leaves it in the
        background (what vtool.early runs while vtool starts); None without sharing."""
        if self.control_path is None or self.target.proxy_jump:
            return None
        opts = [*self.options, *self._connector_options(None)]
        return [self.program, "-F", "/dev/null", *opts, "-f", "-N", "-T", "--", self.target.host]

    def env(self) -> dict[str, str] | None:
        """The environment of this client's ssh processes (early.proxy_env)."""
        return early.proxy_env(self.connector) if self.connector is not None else None

    def _connector_options(self, log: str | None) -> list[str]:
        if self.connector is None:
            return []
        words = [self.connector, "%h", "%p", str(max(1, int(self.connect_timeout)))]
        words += [log] if log is not None else []
        # ssh expands %-tokens in the command, then runs it with the shell.
        command = " ".join(w if w in ("%h", "%p") else shlex.quote(w).replace("%", "%%") for w in words)
        return ["-o", "ProxyUseFdpass=yes", "-o", f"ProxyCommand={command}"]

    def first_contact(self, timeout: float) -> list[str]:
        """Connect once, accepting and recording the node's host key (trust on first use),
        and return the key lines (``"ssh-ed25519 AAAA..."``) it presented. The caller pins
        them; every other connection is strict. Raises NodeUnreachable if it cannot connect."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vtool-hostkey-") as tmp:
            scratch = Path(tmp) / "known_hosts"
            opts = []
            for i in range(0, len(self.options), 2):
                key = self.options[i + 1].split("=", 1)[0]
                if key in (
                    "StrictHostKeyChecking",
                    "UserKnownHostsFile",
                    "ControlMaster",
                    "ControlPath",
                    "ControlPersist",
                ):
                    continue
                opts += self.options[i : i + 2]
            # A connection of its own (never a shared one, which would skip the key exchange).
            opts += [
                "-o",
                "StrictHostKeyChecking=accept-new",
                "-o",
                f"UserKnownHostsFile={scratch}",
                "-o",
                "ControlMaster=no",
                "-o",
                "ControlPath=none",
            ]
            if self.hostkeys:  # the type pinned now is the one every later connection verifies
                opts += ["-o", f"HostKeyAlgorithms={self.hostkeys}"]
            argv = [self.program, "-F", "/dev/null", *opts, "-T", "--", self.target.host, "true"]
            _check_stopping()
            proc = _track(
                subprocess.Popen(
                    argv,
                    stdin=DEVNULL,
                    stdout=DEVNULL,
                    stderr=PIPE,
                    start_new_session=True,
                )
            )
            try:
                _, err_bytes = proc.communicate(timeout=timeout + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise NodeUnreachable("timed out during the first connection") from None
            finally:
                _untrack(proc)
            err = err_bytes.decode(errors="replace")
            _check_stopping()
            if proc.returncode == 255:
                _raise_for_ssh_error(err, self.target)
                raise NodeUnreachable(_ssh_error_line(err) or "SSH failed (exit 255)")
            try:
                lines = scratch.read_text().splitlines()
            except FileNotFoundError:
                lines = []
        keys = [ln.split(" ", 1)[1] for ln in lines if ln.startswith(self.target.host_key_alias + " ")]
        if not keys:
            raise NodeError(f"{self.target.host}:{self.target.port} presented no host key to pin")
        return keys

    def close(self) -> None:
        """Close the shared connections, if open (vtool.keeper's and the OpenSSH master)."""
        if self.control_dir is None:
            return
        assert self.control_path is not None
        if os.path.exists(keeper_path(self.control_path)):
            subprocess.run(
                [self.program, "-F", "/dev/null", "-o", f"ControlPath={keeper_path(self.control_path)}"]
                + ["-O", "exit", "--", self.target.host],
                stdin=DEVNULL,
                stdout=DEVNULL,
                stderr=DEVNULL,
                timeout=10,
                check=False,
            )
        subprocess.run(
            [self.program, "-F", "/dev/null", *self.options, "-O", "exit", "--", self.target.host],
            stdin=DEVNULL,
            stdout=DEVNULL,
            stderr=DEVNULL,
            timeout=10,
            check=False,
        )

    def run(
        self,
        command: str,
        *,
        input: bytes | IO[bytes] | None = None,
        timeout: float | None = None,
        on_line: LineCallback | None = None,
        check: bool = False,
        supervision: Supervision | None = None,
        retries: int | None = None,
    ) -> CommandResult:
        """Run ``command`` (a shell string, already quoted) and return its exit code and output.

        With ``supervision``, ``command`` is a ``remote.supervised`` one, which is stopped on
        the node when it times out or vtool is interrupted, and, once it has run for
        ``GUARD_AFTER`` seconds, also when this client goes away (see ``_Watch``).

        Connection failures (never a command's own exit code) are retried. Raises NodeError
        when the node cannot be reached, HostKeyMismatch when its key is not the pinned one,
        and NodeError on timeout.
        """
        attempt = 0
        while True:
            _check_stopping()
            if attempt and hasattr(input, "seek"):
                input.seek(0)  # type: ignore[union-attr]
            result, log = self._run_once(
                command, input=input, timeout=timeout, on_line=on_line, supervision=supervision
            )
            if result.exit_code != 255 or not log.strip():
                break  # the remote command's own exit code, 255 included: never retried
            _raise_for_ssh_error(log, self.target)
            if not any(f in log for f in _CONNECT_FAILURES):
                raise NodeError(_ssh_error_line(log) or "SSH failed (exit 255)")
            if attempt >= (self.retries if retries is None else retries):
                raise NodeUnreachable(_ssh_error_line(log) or "SSH failed (exit 255)")
            attempt += 1
            time.sleep(0.3 * attempt)
        if check and result.exit_code != 0:
            raise NodeError(_ssh_error_line(result.stderr) or f"command exited {result.exit_code}")
        return result

    def _run_once(
        self,
        command: str,
        *,
        input: Any,
        timeout: float | None,
        on_line: LineCallback | None,
        supervision: Supervision | None = None,
    ) -> tuple[CommandResult, str]:
        pass_file = input is not None and not isinstance(input, (bytes, bytearray))
        # A supervised command's stdin stays open (and silent): the wrapper's own watcher,
        # where it has one (remote.supervised), waits for its end.
        piped = input is not None or supervision is not None
        stdin = input if pass_file else (PIPE if piped else DEVNULL)
        proc, log = self._start(command, stdin, timeout, light=not pass_file)
        watch = _Watch(self, supervision) if supervision is not None else None
        finished = False
        try:
            result = self._wait(proc, input, pass_file, timeout, on_line, watch)
            finished = result.exit_code >= 0  # (negative: killed here, its end unknown)
        finally:
            if proc.stdin is not None and supervision is not None:
                proc.stdin.close()
            _untrack(proc)
            if watch is not None:
                watch.end(stop=not finished)
            messages = _messages(proc, log)
        return result, messages

    def _start(
        self,
        command: str,
        stdin: Any,
        timeout: float | None = None,
        *,
        quiet: bool = False,
        track: bool = True,
        light: bool = True,
    ) -> tuple[Process, str | None]:
        """Start ``command`` with its stdout and stderr as pipes (``quiet``: to /dev/null):
        in a session of this node's open shared connection when there is one (vtool.mux: no
        ssh process), else with ``ssh``. Returns the process and the file ssh writes its own
        messages to (None for a session: its failures are the process's ``lost``).
        ``timeout``: the command's, which also bounds the wait for a session to open.
        ``track=False``: Ctrl-C neither refuses nor stops it (what vtool runs to stop a
        command on the node, see ``_Watch``). ``light=False``: it carries data (a file on
        stdin, a stream), so not through vtool.keeper, which is slower at that."""
        outputs = DEVNULL if quiet else PIPE
        if self.direct:
            assert self.control_path is not None
            # A command (not a file on its stdin, not a stream) goes to vtool.keeper's
            # connection when there is one, else to the OpenSSH master.
            paths = [keeper_path(self.control_path)] if light else []
            for path in [*paths, self.control_path]:
                early.wait(path, self.connect_timeout + 5)  # (vtool.early)
                if path != self.control_path and not os.path.exists(path):
                    continue
                session = self._session(path, command, stdin, outputs, timeout, track)
                if session is not None:
                    return session, None
        log = self._log_file()
        try:
            proc = subprocess.Popen(
                self.argv(command, log=log),
                stdin=stdin,
                stdout=outputs,
                stderr=outputs,
                start_new_session=True,  # Ctrl-C reaches vtool, which stops these (kill_running)
                env=self.env(),
            )
        except BaseException:
            Path(log).unlink(missing_ok=True)
            raise
        return (_track(proc) if track else proc), log

    def _session(
        self, path: str, command: str, stdin: Any, outputs: Any, timeout: float | None, track: bool
    ) -> mux.MuxProcess | None:
        """``command`` in a session of the connection served at ``path`` (vtool.mux); None
        when there is no usable one there (nothing was started)."""
        keep = _track if track else (lambda proc: proc)
        drop = _untrack if track else (lambda proc: None)
        session = keep(mux.MuxProcess(path))  # Ctrl-C stops it while it opens
        try:
            if track:
                _check_stopping()
            session.open(
                command,
                stdin=stdin,
                stdout=outputs,
                stderr=outputs,
                open_timeout=min(self.connect_timeout + 5, timeout or float("inf")),
            )
            return session
        except mux.Uncertain as e:
            drop(session)
            if track:
                _check_stopping()
            raise NodeError(str(e)) from None
        except mux.Unavailable as e:
            drop(session)  # no usable master: ssh opens one
            if e.stale and path != self.control_path:
                with contextlib.suppress(OSError):  # (what a keeper that was killed left)
                    os.unlink(path)
            if track:
                _check_stopping()
            return None
        except BaseException:
            drop(session)
            raise

    def _log_file(self) -> str:
        import tempfile

        fd, path = tempfile.mkstemp(prefix="vtool-ssh-", suffix=".log", dir=self.control_dir)
        os.close(fd)
        return path

    def _wait(
        self,
        proc: Process,
        input: Any,
        pass_file: bool,
        timeout: float | None,
        on_line: LineCallback | None,
        watch: _Watch | None = None,
    ) -> CommandResult:
        if input is not None and not pass_file:

            def feed() -> None:
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(input)
                    proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass

            threading.Thread(target=feed, daemon=True).start()
        deadline = time.monotonic() + timeout if timeout else None
        try:
            assert proc.stdout is not None and proc.stderr is not None
            out, err = _collect(proc.stdout, proc.stderr, on_line, deadline, watch)
            rc = proc.wait() if deadline is None else _await_exit(proc, max(0.001, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _abandon(proc, watch)
            raise NodeError(f"timed out after {timeout:g}s") from None
        except BaseException:
            _abandon(proc, watch)
            raise
        return CommandResult(rc, out, err)

    def popen_stdout(self, command: str) -> Stream:
        """Start ``command`` and give its stdout as a pipe (for streams such as a tar archive).
        Its stderr is drained at the same time, so a chatty command cannot stall the stream."""
        proc, log = self._start(command, DEVNULL, light=False)
        stream = Stream(proc, log)
        stream.widened = _widen(proc.stdout)
        return stream

    def finish_stream(self, stream: Stream, *, abort: bool = False) -> CommandResult:
        """End a stream from popen_stdout. With ``abort``, stop it first: the read end is
        closed so the remote side gets a broken pipe, then the client is killed; this never
        waits for a remote command that will not finish."""
        proc = stream.proc
        try:
            if abort:
                if proc.stdout is not None:
                    proc.stdout.close()
                proc.kill()
            try:
                rc = _await_exit(proc, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            stream.drainer.join(5 if abort else 30)
        finally:
            _untrack(proc)
            if stream.widened:
                _unwiden()
            log = _messages(proc, stream.log)
        err = b"".join(stream.err).decode(errors="replace")
        if rc == 255 and log.strip():
            _raise_for_ssh_error(log, self.target)
            raise NodeError(_ssh_error_line(log) or "SSH failed (exit 255)")
        return CommandResult(rc, "", err)


def _await_exit(proc: Process, timeout: float) -> int:
    """``proc.wait(timeout)``; an ``ssh`` process's end wakes it at once (early.wait_exit)."""
    if isinstance(proc, mux.MuxProcess):
        return proc.wait(timeout=timeout)
    return early.wait_exit(proc, timeout)


def _abandon(proc: Process, watch: _Watch | None) -> None:
    """Stop waiting for a command: stop its client and (supervised) the command on its node,
    whose session, in a master, lasts until the command ends."""
    proc.kill()
    if watch is not None:
        watch.end(stop=True)
    proc.wait()


def _collect(
    stdout: IO[bytes],
    stderr: IO[bytes],
    on_line: LineCallback | None,
    deadline: float | None,
    watch: _Watch | None = None,
) -> tuple[str, str]:
    """Read a command's stdout and stderr until both end, in this thread (no thread per
    stream: with one per node, starting two more per command cost more than the reading),
    handing ``on_line`` each complete line as it arrives. Raises subprocess.TimeoutExpired
    at ``deadline`` (time.monotonic()). Both are closed at the end. With ``watch``, the
    wrapper's line is taken out of stderr, and the guard started when it is due."""
    names = {stdout.fileno(): "out", stderr.fileno(): "err"}
    got: dict[str, list[str]] = {"out": [], "err": []}
    pending: dict[str, list[bytes]] = {"out": [], "err": []}  # the line read so far
    callback = on_line
    poller = select.poll()
    for fd in names:
        poller.register(fd, select.POLLIN)
    stop = stopping.fileno()
    poller.register(stop, select.POLLIN)
    try:
        while names:
            until = deadline if watch is None or watch.due is None else min(deadline or watch.due, watch.due)
            wait = None if until is None else max(0.0, until - time.monotonic()) * 1000
            events = poller.poll(wait)
            now = time.monotonic()
            if deadline is not None and now >= deadline:  # (also for a chatty command)
                raise subprocess.TimeoutExpired("ssh", 0)
            if watch is not None and watch.due is not None and now >= watch.due:
                watch.start_guard()
            for fd, _ in events:
                if fd == stop:
                    raise NodeError("interrupted")
                name = names[fd]
                chunk = os.read(fd, 65536)
                if not chunk:  # the end: a last line may have no newline
                    poller.unregister(fd)
                    del names[fd]
                    lines = [b"".join(pending[name])] if pending[name] else []
                elif b"\n" in chunk:
                    *complete, tail = (b"".join(pending[name]) + chunk).split(b"\n")
                    pending[name] = [tail] if tail else []
                    lines = [ln + b"\n" for ln in complete]
                else:
                    pending[name].append(chunk)
                    continue
                for raw in lines:
                    line = raw.decode(errors="replace")
                    if watch is not None and name == "err":
                        line = watch.take(line)
                        if not line:
                            continue
                    got[name].append(line)
                    if callback is not None:
                        try:
                            callback(name, line.rstrip("\n"))
                        except OSError:  # the reader went away (`vtool run ... | head`): keep reading
                            callback = None
    finally:
        stdout.close()
        stderr.close()
    return "".join(got["out"]), "".join(got["err"])


# remote.supervised writes this line to stderr, ahead of the command's own output, naming the
# process group the command leads on its node (the session's shell); vtool takes it out.
PGID_MARK = "\x1evtool-pgid "
# A supervised command that has run this long gets a guard (``_Watch``).
GUARD_AFTER = 1.0
# Seconds vtool gives a node to open (and finish) the guard or the stop session of a command:
# a node that does not answer keeps a timeout or Ctrl-C waiting this long at most.
STOP_WITHIN = 2.0


@dataclass(frozen=True)
class Supervision:
    """How a supervised command (``remote.supervised``) is stopped on its node: ``stop(pgid)``
    stops its process group now if its leader still runs; ``guard(pgid)`` does the same once
    its own stdin ends."""

    stop: Callable[[int], str]
    guard: Callable[[int], str]


class _Watch:
    """Stops a supervised command on its node when vtool does not wait for it to finish.

    - It times out, or vtool is interrupted (Ctrl-C): ``end`` runs ``stop`` on the node.
    - vtool itself goes away (killed, its machine or network lost): once the command has
      run for GUARD_AFTER seconds, a second session, the guard, waits on the node for the
      end of its stdin, which comes when this client's side of the connection goes away
      (or when ``end`` closes it), and then stops the command if it still runs.

    Commands that finish sooner (most: ``hostname``, a check, a copy) need no process on the
    node besides their own. (A watcher forked by every command's shell, as before, cost
    each command 0.6-0.9 ms of the node's CPU; 64 warm nodes ran `hostname` in 0.197 s with
    it and 0.172 s without, machine CPU 0.40 s against 0.34 s.)"""

    def __init__(self, client: SshClient, supervision: Supervision) -> None:
        self.client = client
        self.supervision = supervision
        self.pgid: int | None = None
        self.due: float | None = time.monotonic() + GUARD_AFTER
        self.guard: tuple[Process, str | None] | None = None
        self.ended = False

    def take(self, line: str) -> str:
        """``line`` (of stderr) without the wrapper's line, which names the process group (a
        login script's stderr may come before it, without a newline of its own)."""
        if self.pgid is not None:
            return line
        at = line.find(PGID_MARK)
        if at < 0:
            return line
        try:
            self.pgid = int(line[at + len(PGID_MARK) :])
        except ValueError:
            return line
        return line[:at] + "\n" if at else ""

    def start_guard(self) -> None:
        """Start the guard (once the command has named its group); never raises."""
        if self.pgid is None:  # (no line yet: a slow login script, or a wrapper with a watcher of its own)
            self.due = time.monotonic() + GUARD_AFTER
            return
        self.due = None
        try:
            self.guard = self.client._start(self.supervision.guard(self.pgid), PIPE, timeout=STOP_WITHIN, quiet=True)
        except Exception:  # (VtoolError, OSError: the command itself goes on regardless)
            pass

    def end(self, stop: bool) -> None:
        """The command is over (``stop``: vtool did not wait for it to finish): end the
        guard, which then stops the command if it still runs, and with ``stop`` stop it at
        once as well (the guard may have been cut before it read its end). Only the first
        call does anything; it never raises."""
        if self.ended:
            return
        self.ended = True
        if self.guard is not None:
            proc, log = self.guard
            try:
                if stop:  # its session ends: it stops the command (the node may not answer)
                    proc.kill()
                elif proc.stdin is not None:
                    proc.stdin.close()
                try:
                    _await_exit(proc, STOP_WITHIN)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            except Exception:
                pass
            finally:
                _untrack(proc)
                _messages(proc, log)
        if stop and self.pgid is not None:
            try:
                proc, log = self.client._start(
                    self.supervision.stop(self.pgid), DEVNULL, timeout=STOP_WITHIN, quiet=True, track=False
                )
                try:
                    _await_exit(proc, STOP_WITHIN)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                _messages(proc, log)
            except Exception:  # the node does not answer: nothing more to do from here
                pass


class Stream:
    """A running ``ssh`` whose stdout the caller reads; stderr is collected meanwhile."""

    def __init__(self, proc: Process, log: str | None) -> None:
        self.proc = proc
        self.log = log
        self.widened = False
        self.err: list[bytes] = []
        self.drainer = threading.Thread(target=self._drain, daemon=True)
        self.drainer.start()

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        kept = 0
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):  # type: ignore[union-attr,attr-defined]
            if kept < 1 << 20:  # keep the first MiB; read (and drop) the rest
                self.err.append(chunk)
                kept += len(chunk)
        self.proc.stderr.close()  # type: ignore[union-attr]


_WIDE_PIPES = 32  # at most this many 1 MiB pipes at once (Linux lets a user have 64 MiB in pipes)
_wide = {"open": 0}
_wide_lock = threading.Lock()


def _widen(pipe: IO[bytes] | None) -> bool:
    """Give a pipe that carries a stream 1 MiB of buffer instead of 64 KiB: the ssh process
    writing into it then wakes vtool up 16 times less often. (Measured: 32 nodes sending
    5 MB each, the ssh processes used 0.5 s of CPU instead of 1.6 s, and scpgetall took 0.9 s
    instead of 1.5 s.) Linux only; elsewhere nothing changes. Returns whether it did."""
    if pipe is None:
        return False
    with _wide_lock:
        if _wide["open"] >= _WIDE_PIPES:
            return False
        _wide["open"] += 1
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        return True
    except OSError:
        _unwiden()
        return False


def _unwiden() -> None:
    with _wide_lock:
        _wide["open"] -= 1


def _read_log(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


# A session of an open master that ended without the command's exit status (vtool.mux).
_LOST = "the shared connection to the node closed before the command finished"


def _messages(proc: Process, log: str | None) -> str:
    """What went wrong on the SSH side of a finished command: ssh's own messages (its log
    file, which is removed), or for a session of an open master, whether the master was lost."""
    if log is None:
        return _LOST if getattr(proc, "lost", False) else ""
    text = _read_log(log)
    Path(log).unlink(missing_ok=True)
    return text


# What ssh adds when its ProxyCommand (vtool-connect) could not connect; the helper's own
# line before it says why.
_PROXY_NOISE = ("proxy dialer did not pass back a connection", "mm_receive_fd:")


def _ssh_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.strip().startswith(_PROXY_NOISE)]
    return lines[-1] if lines else ""


def _raise_for_ssh_error(stderr: str, target: SshTarget) -> None:
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr or "Host key verification failed" in stderr:
        raise HostKeyMismatch(
            f"host key of {target.host}:{target.port} does not match the key pinned for "
            f"{target.host_key_alias} in {target.known_hosts}; refusing to connect"
        )
    if "Permission denied" in stderr:
        raise NodeError(
            f"{target.user}@{target.host}:{target.port} refused the cluster key ({_ssh_error_line(stderr)})"
        )


def ssh_config_block(name: str, target: SshTarget) -> str:
    """An OpenSSH config ``Host`` block for one node, with the pinned host key."""

    def q(v: str) -> str:
        return f'"{v}"' if any(c.isspace() for c in v) else v

    lines = [
        f"Host {name}",
        f"  HostName {target.host}",
        f"  Port {target.port}",
        f"  User {target.user}",
        f"  IdentityFile {q(target.key_file)}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {q(target.known_hosts)}",
        "  GlobalKnownHostsFile /dev/null",
        f"  HostKeyAlias {target.host_key_alias}",
        "  StrictHostKeyChecking yes",
        "  CheckHostIP no",
    ]
    if target.proxy_jump:
        lines.append(f"  ProxyJump {target.proxy_jump}")
    return "\n".join(lines) + "\n"


def q(value: object) -> str:
    """Shell-quote one argument for a remote command."""
    return shlex.quote(str(value))


_helper: dict[str, str | None] = {}


def _own_program(path: Path) -> bool:
    """``path`` is a regular file (not a link) of this user's that nobody else may write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    import stat as stat_

    return stat_.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


FAILED_BUILD_RETRY = 24 * 3600  # seconds before a failed build of vtool-connect is tried again


def connect_helper(folder: Path) -> str | None:
    """The path of vtool-connect (vtool/connect.c), compiled once into ``folder`` (a private
    folder, created 0700) by the first compiler of HELPER_BUILDS there is; None when it
    cannot be had (ssh then connects by itself, only slower to open a connection). Only a
    file this user built, in a folder no one else can write, is used. A program is named
    after its source and recipe: a better one is built once its compiler is installed, and
    a failed build is tried again a day later (e.g. once the C headers are installed)."""
    key = str(folder)
    if key in _helper:
        return _helper[key]
    source = Path(__file__).with_name("connect.c")
    found: str | None = None
    try:
        code = source.read_bytes()
        ensure_private_dir(folder)
    except (OSError, VtoolError):  # no source, or another user's folder, or a link: do without
        _helper[key] = None
        return None
    for recipe in HELPER_BUILDS:
        exe = folder / f"vtool-connect-{sha256_hex(code + repr(recipe).encode())[:12]}"
        if _own_program(exe) and os.access(exe, os.X_OK):
            found = str(exe)
            break
        failed = exe.with_name(exe.name + ".failed")
        try:
            recent_failure = time.time() - failed.stat().st_mtime < FAILED_BUILD_RETRY
        except OSError:
            recent_failure = False
        if recent_failure:
            continue
        import shutil

        if shutil.which(recipe[0]) and _build_helper(recipe, source, exe, failed):
            found = str(exe)
            break
    _helper[key] = found
    return found


# How vtool-connect is built, best first. With musl (Debian's musl-tools), a static program
# that starts without glibc's start-up: 0.02 ms of CPU per start against 0.6 ms (`perf stat`
# of an empty main(); most of glibc's is its cache-size probe, `cpuid` traps on a virtual
# machine), and vtool starts one per new connection.
HELPER_BUILDS = (("musl-gcc", "-O2", "-static"), ("cc", "-O2"))


def _build_helper(recipe: tuple[str, ...], source: Path, exe: Path, failed: Path) -> bool:
    """Build ``exe`` with ``recipe`` (compiler and flags); a failure leaves ``failed``."""
    tmp = exe.with_name(f".{exe.name}.{os.getpid()}")
    try:
        r = subprocess.run(
            [*recipe, "-o", str(tmp), str(source)],
            stdin=DEVNULL,
            stdout=DEVNULL,
            stderr=DEVNULL,
            timeout=60,
            check=False,
        )
        if r.returncode == 0:
            os.chmod(tmp, 0o700)
            os.replace(tmp, exe)
            return True
    except (OSError, subprocess.SubprocessError):
        pass
    finally:
        tmp.unlink(missing_ok=True)
    try:
        failed.touch()
    except OSError:
        pass
    return False


def which_local(name: str, extra: tuple[str, ...] = ("/usr/sbin", "/usr/local/sbin", "/sbin")) -> str | None:
    import shutil

    found = shutil.which(name)
    if found:
        return found
    for d in extra:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None

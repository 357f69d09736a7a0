"""Commands on an open shared SSH connection without starting an ``ssh`` process.

A command on a warm node used to start ``ssh``, which only connects to the node's
ControlMaster socket and hands it the command and its stdin, stdout and stderr. That
program start is most of a warm command's cost (about 4 ms of CPU per node). vtool now
speaks that hand-over itself: OpenSSH's multiplexing protocol (``PROTOCOL.mux`` in
OpenSSH, version 4), the same messages ``ssh`` sends, with the three file descriptors
passed over the socket (SCM_RIGHTS). The master opens the session as it would for ``ssh``.

``MuxProcess`` looks like the ``subprocess.Popen`` that ``ssh`` would have been (``stdin``,
``stdout``, ``stderr``, ``wait``, ``kill``, ``returncode``), so vtool.ssh handles both
alike. When there is no usable master (no socket, a stale one, a refusal), ``open`` raises
``Unavailable`` and vtool starts ``ssh`` as before, which opens a new master. Once the
request is out, no answer is ``Uncertain``: the command may be running, so it is an error,
never a second start.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import IO, Any

HELLO = 0x00000001
NEW_SESSION = 0x10000002
S_PERMISSION_DENIED = 0x80000002
S_FAILURE = 0x80000003
S_EXIT_MESSAGE = 0x80000004
S_SESSION_OPENED = 0x80000006
S_TTY_ALLOC_FAIL = 0x80000008
VERSION = 4
NO_ESCAPE = 0xFFFFFFFF
LOST = 255  # ssh's exit code when the master went away before the command's exit status
# subprocess.PIPE and subprocess.DEVNULL (the same values: vtool.ssh hands them to Popen too),
# without importing subprocess, which was ~3% of a `vtool run`'s start-up
PIPE, DEVNULL = -1, -3


class Unavailable(Exception):
    """No session was opened (the master is gone or refused): run ``ssh`` instead.
    ``stale``: nothing listens at the socket (what a master that was killed leaves)."""

    def __init__(self, message: str, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


class Uncertain(Exception):
    """The request went out and no answer came back (a timeout, the master went away): the
    command may have started, so it must not be started another way."""


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _send(sock: socket.socket, body: bytes) -> None:
    sock.sendall(struct.pack(">I", len(body)) + body)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError("the shared connection's master closed the socket")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> tuple[int, bytes]:
    (length,) = struct.unpack(">I", _read_exact(sock, 4))
    if length < 4 or length > 1 << 20:
        raise EOFError(f"the master sent a message of {length} bytes")
    body = _read_exact(sock, length)
    return struct.unpack(">I", body[:4])[0], body[4:]


def _hello(sock: socket.socket) -> bool:
    """Exchange HELLOs on a connected socket: whether the master speaks our version."""
    _send(sock, struct.pack(">II", HELLO, VERSION))
    kind, body = _recv(sock)
    return kind == HELLO and body[:4] == struct.pack(">I", VERSION)


def _reason(body: bytes) -> str:
    """The text of a PERMISSION_DENIED or FAILURE reply (after its request id)."""
    try:
        (n,) = struct.unpack(">I", body[4:8])
        return body[8 : 8 + n].decode(errors="replace")
    except struct.error:
        return ""


class MuxProcess:
    """A command running in a session of the master at ``control_path``: make it, then
    ``open`` it (so that it can be tracked, and killed, while it opens).

    ``stdin``: ``DEVNULL``, ``PIPE`` (then ``.stdin`` is the write end)
    or a binary file object whose descriptor the master reads itself (a package file).
    ``stdout``/``stderr``: ``PIPE`` (``.stdout``/``.stderr`` are the read ends)
    or ``DEVNULL``. The two are subprocess's own values (so that the same ones go to Popen).
    """

    def __init__(self, control_path: str) -> None:
        self.control_path = control_path
        self.returncode: int | None = None
        self.stdin: IO[bytes] | None = None
        self.stdout: IO[bytes] | None = None
        self.stderr: IO[bytes] | None = None
        self.lost = False  # the session ended without the command's exit status, and the master is gone
        self._killed = False
        self._opened = False
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def open(self, command: str, *, stdin: Any, stdout: Any, stderr: Any, open_timeout: float = 15) -> None:
        """Start ``command``. Raises Unavailable (nothing started: use ssh) or Uncertain (the
        request is out and unanswered, or this was killed meanwhile)."""
        sock = self._sock
        theirs: list[int] = []  # the descriptors the master gets; closed here once passed
        mine: list[int] = []  # our ends, closed if the session does not open
        try:
            sock.settimeout(5)  # a master that accepts but does not say hello is not usable
            try:
                sock.connect(self.control_path)
                if not _hello(sock):
                    raise Unavailable("the master speaks another protocol")
            except (OSError, EOFError) as e:
                stale = isinstance(e, ConnectionRefusedError)
                raise Unavailable(f"no usable master at {self.control_path}: {e}", stale) from None
            fds = [self._end(stdin, True, theirs, mine), self._end(stdout, False, theirs, mine)]
            fds.append(self._end(stderr, False, theirs, mine))
            request = struct.pack(">II", NEW_SESSION, 0) + _string(b"")
            request += struct.pack(">IIIII", 0, 0, 0, 0, NO_ESCAPE)  # no tty, X11, agent, subsystem
            request += _string(b"") + _string(command.encode())  # terminal type, command
            try:
                _send(sock, request)
            except OSError as e:  # nothing of the request arrived, or not all of it
                raise Unavailable(f"the master did not take the request: {e}") from None
            sock.settimeout(open_timeout)
            try:
                for fd in fds:
                    socket.send_fds(sock, [b"\0"], [fd])
            except OSError as e:  # (a master starts nothing before it has all three)
                raise Unavailable(f"the master did not take the request: {e}") from None
            try:
                kind, body = _recv(sock)
            except TimeoutError:
                raise Uncertain(
                    f"timed out after {open_timeout:g}s waiting for the shared connection to open a session"
                ) from None
            except (OSError, EOFError):
                # The master sends the command to the node before it answers: it may run.
                raise Uncertain("the shared connection to the node closed while it opened a session") from None
            if kind in (S_PERMISSION_DENIED, S_FAILURE):
                raise Unavailable(f"the master refused the session: {_reason(body)}")
            if kind != S_SESSION_OPENED:
                raise Uncertain(f"unexpected reply {kind:#x} from the shared connection's master")
            sock.settimeout(None)
        except BaseException:  # Unavailable, Uncertain, Ctrl-C
            for fd in theirs + mine:
                os.close(fd)
            sock.close()
            raise
        for fd in theirs:
            os.close(fd)
        if stdin == PIPE:
            self.stdin = os.fdopen(mine[0], "wb")
            mine = mine[1:]
        files = iter(os.fdopen(fd, "rb") for fd in mine)
        if stdout == PIPE:
            self.stdout = next(files)
        if stderr == PIPE:
            self.stderr = next(files)
        self._opened = True

    @staticmethod
    def _end(spec: Any, reading: bool, theirs: list[int], mine: list[int]) -> int:
        """The descriptor to pass for one of stdin/stdout/stderr (``reading``: the master reads it)."""
        if spec == PIPE:
            r, w = os.pipe()
            theirs.append(r if reading else w)
            mine.append(w if reading else r)
            return theirs[-1]
        if spec == DEVNULL or spec is None:
            fd = os.open(os.devnull, os.O_RDONLY if reading else os.O_WRONLY)
            theirs.append(fd)
            return fd
        return int(spec.fileno())  # a file of the caller's: passed, not closed here

    def wait(self, timeout: float | None = None) -> int:
        """The command's exit code, once the master has closed the session (its output is
        then complete). 255 when no exit status came (the command was killed by a signal,
        as ``ssh`` says); ``lost`` when the master itself went away."""
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            deadline = None if timeout is None else time.monotonic() + timeout
            code = None
            try:
                while True:
                    if deadline is not None:
                        self._sock.settimeout(max(0.001, deadline - time.monotonic()))
                    kind, body = _recv(self._sock)
                    if kind == S_EXIT_MESSAGE and len(body) >= 8:
                        code = struct.unpack(">I", body[4:8])[0]
                    elif kind != S_TTY_ALLOC_FAIL:
                        break
            except TimeoutError:
                import subprocess  # (what Popen.wait raises: callers take both alike)

                raise subprocess.TimeoutExpired("ssh (shared connection)", timeout or 0) from None
            except (OSError, EOFError):
                pass
            self._sock.close()
            if code is None and not self._killed:
                self.lost = not alive(self.control_path)
            # An exit status that arrived before a kill is still the command's (as with a
            # process that had exited before it was killed).
            self.returncode = code if code is not None else -9 if self._killed else LOST
            return self.returncode

    def kill(self) -> None:
        """Stop: end our side of the socket, so the master ends the session (the remote
        command sees end-of-file on its stdin, as when ``ssh`` is killed) and closes it; what
        it sent before (an exit status) is still read. If the master does not close it within
        2 s, or the session was still opening, the socket is cut, so nothing waits on it."""
        if self.returncode is not None or self._killed:
            return
        self._killed = True
        if not self._opened:
            self._cut()
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        timer = threading.Timer(2, self._cut)
        timer.daemon = True
        timer.start()

    def _cut(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def alive(control_path: str) -> bool:
    """Whether a master answers at ``control_path`` (the HELLO exchange)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(control_path)
            return _hello(sock)
    except (OSError, EOFError):
        return False

"""Commands on an open shared SSH connection without starting an ``ssh`` process.

A command on a warm node used to start ``ssh``, which only connects to the node's
ControlMaster socket and hands it the command and its stdin, stdout and stderr. That
program start is most of a warm command's cost (about 4 ms of CPU per node). vtool now
speaks that hand-over itself: OpenSSH's multiplexing protocol (``PROTOCOL.mux`` in
OpenSSH, version 4), the same messages ``ssh`` sends, with the three file descriptors
passed over the socket (SCM_RIGHTS). The master opens the session as it would for ``ssh``.

``MuxProcess`` looks like the ``subprocess.Popen`` that ``ssh`` would have been (``stdin``,
``stdout``, ``stderr``, ``wait``, ``kill``, ``returncode``), so vtool.ssh handles both
alike. When there is no usable master (no socket, a stale one, a refusal before the
session opened), it raises ``Unavailable`` and vtool starts ``ssh`` as before, which opens
a new master.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
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


class Unavailable(Exception):
    """No session was opened (the master is gone or refused): run ``ssh`` instead."""


class Stalled(Exception):
    """The master took the request but did not say whether the session opened."""


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


def _reason(body: bytes) -> str:
    """The text of a PERMISSION_DENIED or FAILURE reply (after its request id)."""
    try:
        (n,) = struct.unpack(">I", body[4:8])
        return body[8 : 8 + n].decode(errors="replace")
    except struct.error:
        return ""


class MuxProcess:
    """A command running in a session of the master at ``control_path``.

    ``stdin``: ``subprocess.DEVNULL``, ``subprocess.PIPE`` (then ``.stdin`` is the write end)
    or a binary file object whose descriptor the master reads itself (a package file).
    ``stdout``/``stderr``: ``subprocess.PIPE`` (``.stdout``/``.stderr`` are the read ends)
    or ``subprocess.DEVNULL``. Raises Unavailable if the master does not open the session,
    Stalled if it took the request and did not answer in ``open_timeout`` seconds.
    """

    def __init__(
        self, control_path: str, command: str, *, stdin: Any, stdout: Any, stderr: Any, open_timeout: float = 15
    ) -> None:
        self.returncode: int | None = None
        self.stdin: IO[bytes] | None = None
        self.stdout: IO[bytes] | None = None
        self.stderr: IO[bytes] | None = None
        self._killed = False
        self.lost = False  # the session ended without the command's exit status
        self._lock = threading.Lock()
        theirs: list[int] = []  # the descriptors the master gets; closed here once passed
        mine: list[int] = []  # our ends, closed if the session does not open
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:
            raise Unavailable(str(e)) from None
        self._sock = sock
        try:
            sock.settimeout(5)  # a master that accepts but does not say hello is not usable
            try:
                sock.connect(control_path)
            except OSError as e:
                raise Unavailable(f"no master at {control_path}: {e}") from None
            fds = [self._end(stdin, True, theirs, mine), self._end(stdout, False, theirs, mine)]
            fds.append(self._end(stderr, False, theirs, mine))
            try:
                _send(sock, struct.pack(">II", HELLO, VERSION))
                kind, body = _recv(sock)
                if kind != HELLO or struct.unpack(">I", body[:4])[0] != VERSION:
                    raise Unavailable(f"the master speaks another protocol ({kind:#x})")
                request = struct.pack(">II", NEW_SESSION, 0) + _string(b"")
                request += struct.pack(">IIIII", 0, 0, 0, 0, NO_ESCAPE)  # no tty, X11, agent, subsystem
                request += _string(b"") + _string(command.encode())  # terminal type, command
                _send(sock, request)
                for fd in fds:
                    socket.send_fds(sock, [b"\0"], [fd])
            except (OSError, EOFError) as e:
                raise Unavailable(f"the master did not take the session: {e}") from None
            sock.settimeout(open_timeout)
            try:
                kind, body = _recv(sock)
            except TimeoutError:
                # The request is out: the session may still open, so running the command
                # another way could run it twice.
                raise Stalled(f"timed out after {open_timeout:g}s waiting for the shared connection to open a session") from None
            except (OSError, EOFError) as e:  # the master is gone, and the session with it
                raise Unavailable(f"the master did not take the session: {e}") from None
            if kind in (S_PERMISSION_DENIED, S_FAILURE):
                raise Unavailable(f"the master refused the session: {_reason(body)}")
            if kind != S_SESSION_OPENED:
                raise Unavailable(f"unexpected reply {kind:#x} from the master")
            sock.settimeout(None)
        except BaseException:  # Unavailable, Stalled, Ctrl-C
            for fd in theirs + mine:
                os.close(fd)
            self.stdin = self.stdout = self.stderr = None
            sock.close()
            raise
        for fd in theirs:
            os.close(fd)
        if stdin == subprocess.PIPE:
            self.stdin = os.fdopen(mine[0], "wb")
            mine = mine[1:]
        files = iter(os.fdopen(fd, "rb") for fd in mine)
        if stdout == subprocess.PIPE:
            self.stdout = next(files)
        if stderr == subprocess.PIPE:
            self.stderr = next(files)

    @staticmethod
    def _end(spec: Any, reading: bool, theirs: list[int], mine: list[int]) -> int:
        """The descriptor to pass for one of stdin/stdout/stderr (``reading``: the master reads it)."""
        if spec == subprocess.PIPE:
            r, w = os.pipe()
            theirs.append(r if reading else w)
            mine.append(w if reading else r)
            return theirs[-1]
        if spec == subprocess.DEVNULL or spec is None:
            fd = os.open(os.devnull, os.O_RDONLY if reading else os.O_WRONLY)
            theirs.append(fd)
            return fd
        return int(spec.fileno())  # a file of the caller's: passed, not closed here

    def wait(self, timeout: float | None = None) -> int:
        """The command's exit code, once the master has closed the session (its output is
        then complete). 255 if the master went away first, as ``ssh`` says."""
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            self._sock.settimeout(timeout)
            code = None
            try:
                while True:
                    kind, body = _recv(self._sock)
                    if kind == S_EXIT_MESSAGE and len(body) >= 8:
                        code = struct.unpack(">I", body[4:8])[0]
                    elif kind != S_TTY_ALLOC_FAIL:
                        break
            except TimeoutError:
                raise subprocess.TimeoutExpired("ssh (shared connection)", timeout or 0) from None
            except (OSError, EOFError):
                pass
            self._sock.close()
            # An exit status that arrived before a kill is still the command's (as with a
            # process that had exited before it was killed).
            self.lost = code is None and not self._killed
            self.returncode = code if code is not None else -9 if self._killed else LOST
            return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        """Stop: end our side of the socket, so the master ends the session (the remote
        command sees end-of-file on its stdin, as when ``ssh`` is killed) and closes it; what
        it sent before (an exit status) is still read. If the master does not close it within
        2 s, the socket is cut, so ``wait`` returns in any case."""
        if self.returncode is not None or self._killed:
            return
        self._killed = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        timer = threading.Timer(2, self._cut)
        timer.daemon = True
        timer.start()

    def _cut(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    terminate = kill

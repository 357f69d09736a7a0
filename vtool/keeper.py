"""One process that holds the SSH connections of a command's nodes, in place of one ``ssh``
master per node (what vtool.early starts for ``run`` and ``logs``).

    python -m vtool.keeper RECORD INDEX...

Opening a node's shared connection with OpenSSH costs the client one ``ssh`` process per
node: about 10 ms of CPU each (5-6 ms of it only to start the program), which on 32 or 64
nodes is most of a cold ``vtool run``. This process opens them all with libssh2 (the
ssh2-python package), about 2 ms of CPU each, and serves them on their own control sockets
(``keeper_path``: the master's path with ``.k``) with the part of OpenSSH's multiplexing
protocol (PROTOCOL.mux) that vtool.mux speaks: a plain command with its stdin, stdout and
stderr passed over the socket, its exit status back; ``ssh -O check`` and ``ssh -O exit``.
Anything else (a terminal, forwarding) is refused, and the client then uses ssh.

It carries commands, not data: libssh2 moves bulk data several times slower than OpenSSH
(measured: 100 MB from a node in 0.7 s against 0.16 s), so vtool sends packages and files
over its OpenSSH masters (``SshClient`` only asks the keeper for a command whose stdin is
not a file, and never for a stream).

The connections are OpenSSH's, checked the same way: the node's host key must be one the
cluster's known_hosts pins under the node's alias (else no session: the client then runs
ssh, which says why), the user's key file, vtool's key exchange and ciphers, a connection
timeout, and a dead node noticed within ServerAliveInterval x ServerAliveCountMax
(keepalives, and TCP_USER_TIMEOUT). A node's socket goes away when its connection ends, or
after ControlPersist seconds without a session, and the process ends with its last one.

vtool.early runs ``main`` in a child of the vtool command itself (a fork, named
``vtool-keeper``: see ``ps -o pid,comm``), as the command's Python is started already. That
process binds every socket, then leaves the connections to a child in a session of its own,
and exits: once it has, the sockets are there (vtool.early waits for that), and a command
that asks before a connection is up waits for it.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import struct
import sys
import threading
import time

from .early import keeper_path, keeper_serves

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HELLO = 0x00000001
NEW_SESSION = 0x10000002
ALIVE_CHECK = 0x10000004
TERMINATE = 0x10000005
S_OK = 0x80000001
S_PERMISSION_DENIED = 0x80000002
S_FAILURE = 0x80000003
S_EXIT_MESSAGE = 0x80000004
S_ALIVE = 0x80000005
S_SESSION_OPENED = 0x80000006
VERSION = 4
CHUNK = 1 << 17


def target(argv: list[str]) -> dict[str, Any] | None:
    """What the keeper needs of a node, from the ``ssh`` command that opens its master (an
    early record's): None when the keeper cannot open it as ssh would (a jump host, another
    ProxyCommand than vtool-connect, checks other than a pinned host key)."""
    if len(argv) < 3 or argv[-2] != "--":
        return None
    o: dict[str, str] = {}
    for i, a in enumerate(argv[:-1]):
        if a == "-o":
            k, _, v = argv[i + 1].partition("=")
            if len(v) >= 2 and v[0] == v[-1] == '"':
                v = v[1:-1]
            o[k] = v
    if not keeper_serves(argv) or not o.get("HostKeyAlias") or not o.get("UserKnownHostsFile"):
        return None
    try:
        return {
            "host": argv[-1],
            "port": int(o.get("Port", "22")),
            "user": o["User"],
            "key": o["IdentityFile"],
            "known_hosts": o["UserKnownHostsFile"],
            "alias": o["HostKeyAlias"],
            "kex": o.get("KexAlgorithms", ""),
            "ciphers": o.get("Ciphers", ""),
            "connect_timeout": float(o.get("ConnectTimeout", "10")),
            "alive_interval": int(o.get("ServerAliveInterval", "5")),
            "alive_count": int(o.get("ServerAliveCountMax", "3")),
            "persist": int(o.get("ControlPersist", "300")),
        }
    except (KeyError, ValueError):
        return None


def pinned(known_hosts: str, alias: str) -> dict[str, bytes]:
    """The host keys ``known_hosts`` pins for ``alias``: key type -> key blob."""
    import base64
    import binascii

    keys: dict[str, bytes] = {}
    with open(known_hosts) as f:
        for line in f:
            words = line.split()
            if len(words) < 3 or line.startswith(("#", "@")) or alias not in words[0].split(","):
                continue
            try:
                keys[words[1]] = base64.b64decode(words[2], validate=True)
            except (binascii.Error, ValueError):
                continue
    return keys


# -- the protocol --------------------------------------------------------------------------


def _pack(*ints: int) -> bytes:
    return struct.pack(f">{len(ints)}I", *ints)


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _message(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _strings(body: bytes, at: int, count: int) -> tuple[list[bytes], int]:
    out = []
    for _ in range(count):
        (n,) = struct.unpack(">I", body[at : at + 4])
        if at + 4 + n > len(body):
            raise ValueError("a string runs past the message")
        out.append(body[at + 4 : at + 4 + n])
        at += 4 + n
    return out, at


class Request:
    """A NEW_SESSION request, parsed."""

    def __init__(self, body: bytes) -> None:
        (self.rid,) = struct.unpack(">I", body[:4])
        _, at = _strings(body, 4, 1)  # reserved
        self.tty, self.x11, self.agent, self.subsystem, _escape = struct.unpack(">5I", body[at : at + 20])
        (_term, command), at = _strings(body, at + 20, 2)
        self.command = command.decode(errors="surrogateescape")
        self.env: list[str] = []
        while at < len(body):
            (var,), at = _strings(body, at, 1)
            self.env.append(var.decode(errors="replace"))
        self.fds: list[int] = []


class Client:
    """One connection to a node's socket: HELLO, then requests (``messages``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.fds: list[int] = []
        self.hello = False
        self.request: Request | None = None  # a session request waiting for its descriptors
        self.channel: Channel | None = None

    def read(self) -> bool:
        """Take what arrived (with any descriptors); False at end of file."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 8)
        except BlockingIOError:
            return True
        except OSError:
            return False
        self.fds += fds
        if not data:
            return False
        self.buf += data
        return True

    def messages(self) -> list[tuple[int, bytes]]:
        out = []
        while self.request is None and len(self.buf) >= 4:
            (n,) = struct.unpack(">I", self.buf[:4])
            if n < 4 or n > 1 << 18:
                raise ValueError(f"a message of {n} bytes")
            if len(self.buf) < 4 + n:
                break
            body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
            kind = struct.unpack(">I", body[:4])[0]
            out.append((kind, body[4:]))
            if kind == NEW_SESSION:
                break  # three descriptors follow, each with a byte of its own
        return out

    def send(self, data: bytes) -> None:
        self.sock.setblocking(True)
        self.sock.settimeout(5)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()


class Channel:
    """A command running on the node, with the descriptors its client passed."""

    def __init__(self, client: Client, channel: Any, fds: list[int], sid: int) -> None:
        self.client, self.ch, self.sid = client, channel, sid
        self.stdin, self.stdout, self.stderr = fds
        self.pending = b""  # read from stdin, not yet taken by the channel
        self.stdin_open = True
        self.stdin_file = False  # a file (epoll cannot watch it): read as the channel takes it
        self.eof_sent = False
        self.out_open = [True, True]
        self.closing = False  # its session is being closed (Link.end)
        self.killed = False  # its client went away first
        self.close_by = 0.0


# -- one node ------------------------------------------------------------------------------


class Link(threading.Thread):
    """One node: its connection, its socket, its clients and their commands."""

    def __init__(
        self, spec: dict[str, Any], listener: socket.socket, path: str, made: tuple[int, int], stop: threading.Event
    ) -> None:
        super().__init__(daemon=True)
        self.spec, self.listener, self.path, self.stopping = spec, listener, path, stop
        self.made = made  # the socket's file as bound (device, inode): see unlink
        self.dialed: socket.socket | None = None  # the TCP connection ``dial`` started, if any
        self.clients: list[Client] = []
        self.channels: list[Channel] = []
        self.session: Any = None
        self.sock: socket.socket | None = None
        self.failed = ""  # why the connection could not be opened (then every request is refused)
        self.closed = False
        self.sids = 0
        self.idle_since = time.monotonic()
        self.sel = selectors.DefaultSelector()

    # the connection

    def connect(self) -> None:
        from ssh2 import session as ssh2

        s = self.spec
        keys = pinned(s["known_hosts"], s["alias"])
        if not keys:
            raise ConnectionError(f"no host key pinned for {s['alias']}")
        sock, self.dialed = self.dialed, None
        if sock is None:
            sock = socket.create_connection((s["host"], s["port"]), timeout=s["connect_timeout"])
        else:  # (dial started it: wait until it is through)
            import select

            try:
                writable = select.select([], [sock], [], s["connect_timeout"])[1]
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if writable else errno.ETIMEDOUT
                if err:
                    raise OSError(err, f"cannot connect to {s['host']} port {s['port']}: {os.strerror(err)}")
            except OSError:
                sock.close()
                raise
            sock.settimeout(s["connect_timeout"])  # (as create_connection leaves it)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dead_after = max(1, s["alive_interval"] * s["alive_count"])
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # sent data unanswered this long: the node is gone
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, dead_after * 1000)
        session = ssh2.Session()
        session.set_timeout(int(s["connect_timeout"] * 1000))
        prefs = [
            (ssh2.LIBSSH2_METHOD_HOSTKEY, ",".join(keys)),
            (ssh2.LIBSSH2_METHOD_KEX, s["kex"]),
            (ssh2.LIBSSH2_METHOD_CRYPT_CS, s["ciphers"]),
            (ssh2.LIBSSH2_METHOD_CRYPT_SC, s["ciphers"]),
        ]
        for method, names in prefs:
            supported = set(session.supported_algs(method))
            wanted = ",".join(n for n in names.split(",") if n in supported)
            if wanted:
                session.method_pref(method, wanted)
        session.handshake(sock)
        key, _kind = session.hostkey()
        if key not in keys.values():
            raise ConnectionError(f"the host key of {s['alias']} is not the one pinned")
        session.userauth_publickey_fromfile(s["user"], s["key"])
        if not session.userauth_authenticated():
            raise ConnectionError("the node refused the key")
        session.keepalive_config(True, max(1, s["alive_interval"]))
        session.set_timeout(0)
        session.set_blocking(False)
        sock.setblocking(False)
        self.session, self.sock = session, sock

    def _again(self, call: Any, *args: Any) -> Any:
        """``call`` on the non-blocking session, waiting on its socket while libssh2 says
        EAGAIN (only for the short exchanges: opening and closing a channel)."""
        import select

        from ssh2.error_codes import LIBSSH2_ERROR_EAGAIN
        from ssh2.session import LIBSSH2_SESSION_BLOCK_INBOUND, LIBSSH2_SESSION_BLOCK_OUTBOUND

        deadline = time.monotonic() + self.spec["connect_timeout"] + 5
        while True:
            r = call(*args)
            if r != LIBSSH2_ERROR_EAGAIN:
                return r
            if time.monotonic() > deadline:
                raise TimeoutError("the node did not answer")
            d = self.session.block_directions()
            r_ = [self.sock] if d & LIBSSH2_SESSION_BLOCK_INBOUND else []
            w_ = [self.sock] if d & LIBSSH2_SESSION_BLOCK_OUTBOUND else []
            select.select(r_, w_, [], 1)

    # the loop

    def run(self) -> None:
        try:
            self.listener.setblocking(False)
            try:
                self.connect()
            except Exception as e:  # (any failure: the clients are refused, and run ssh)
                self.failed = str(e) or type(e).__name__
            self.loop()
        except Exception:
            pass
        finally:
            self.close()

    def loop(self) -> None:
        sel = self.sel
        sel.register(self.listener, selectors.EVENT_READ, None)
        while not self.stopping.is_set() and not self.closed:
            if self.failed and not self.clients:
                return  # (every waiting request was refused)
            busy = self.service()
            if self.closed:
                return
            if not self.channels and not self.clients and time.monotonic() - self.idle_since > self.spec["persist"]:
                return
            watched = {k.fileobj for k in sel.get_map().values()}
            want = {self.listener, *(c.sock for c in self.clients)}
            want |= {
                ch.stdin
                for ch in self.channels
                if ch.stdin_open and not ch.closing and not ch.stdin_file and len(ch.pending) < CHUNK
            }
            if self.sock is not None and self.channels:
                want.add(self.sock)
            for gone in watched - want:
                sel.unregister(gone)
            for new in want - watched:
                try:
                    sel.register(new, selectors.EVENT_READ, None)
                except (PermissionError, ValueError, OSError):  # a file: always readable
                    for ch in self.channels:
                        if ch.stdin == new:
                            ch.stdin_file = True
            timeout = 0.0 if busy else self._wait_time()
            if not busy and self.session is not None and self.channels:
                from ssh2.session import LIBSSH2_SESSION_BLOCK_OUTBOUND

                if self.session.block_directions() & LIBSSH2_SESSION_BLOCK_OUTBOUND:
                    timeout = 0.01  # (libssh2 has more to send once the socket takes it)
            for key, _ in sel.select(timeout):
                obj = key.fileobj
                if obj is self.listener:
                    self.accept()
                elif isinstance(obj, int):
                    self.take_stdin(obj)
            for c in list(self.clients):
                self.serve(c)
            if self.session is not None:
                try:
                    self.session.keepalive_send()
                except Exception:
                    self.lost()

    def _wait_time(self) -> float:
        return 1.0 if not self.channels else 0.5

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, OSError):
                return
            sock.setblocking(False)
            c = Client(sock)
            try:
                c.send(_message(_pack(HELLO, VERSION)))
            except OSError:
                sock.close()
                continue
            self.clients.append(c)

    def serve(self, c: Client) -> None:
        """Read what a client sent and answer its requests."""
        if c.channel is not None:
            if not c.read() or c.buf:  # it went away (killed): end the command's session
                self.end(c.channel, killed=True)
            return
        if not c.read():
            self.drop(c)
            return
        try:
            for kind, body in c.messages():
                if kind == HELLO:
                    c.hello = struct.unpack(">I", body[:4])[0] == VERSION
                    if not c.hello:
                        raise ValueError("another protocol version")
                elif not c.hello:
                    raise ValueError("no hello")
                elif kind == ALIVE_CHECK:
                    c.send(_message(_pack(S_ALIVE, struct.unpack(">I", body[:4])[0], os.getpid())))
                elif kind == TERMINATE:
                    c.send(_message(_pack(S_OK, struct.unpack(">I", body[:4])[0])))
                    self.drop(c)
                    self.closed = True
                    return
                elif kind == NEW_SESSION:
                    c.request = Request(body)
                else:
                    rid = struct.unpack(">I", body[:4])[0] if len(body) >= 4 else 0
                    c.send(_message(_pack(S_FAILURE, rid) + _string(b"not served by vtool's keeper")))
            if c.request is not None and len(c.fds) >= 3 and len(c.buf) >= 3:
                request, c.request = c.request, None
                request.fds, c.fds, c.buf = c.fds[:3], c.fds[3:], c.buf[3:]
                self.open(c, request)
        except (ValueError, struct.error, OSError):
            self.drop(c)

    def refuse(self, c: Client, request: Request, why: str) -> None:
        for fd in request.fds:
            os.close(fd)
        try:
            c.send(_message(_pack(S_PERMISSION_DENIED, request.rid) + _string(why.encode())))
        except OSError:
            pass
        self.drop(c)

    def open(self, c: Client, request: Request) -> None:
        if request.tty or request.x11 or request.agent:
            self.refuse(c, request, "vtool's keeper runs commands without a terminal or forwarding")
            return
        if self.session is None:  # (connect failed: self.failed says why)
            self.refuse(c, request, f"vtool's keeper has no connection to the node: {self.failed}")
            return
        from ssh2.error_codes import LIBSSH2_ERROR_CHANNEL_REQUEST_DENIED

        sent = False  # the command went out: from then on, no answer is no "no" (vtool.mux)
        try:
            if hasattr(socket, "TCP_QUICKACK"):  # (see vtool.early: the first command is then prompt)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            channel = self._again(self.session.open_session)
            if not hasattr(channel, "execute"):
                raise ConnectionError("the node refused a session")
            for var in request.env:
                name, eq, value = var.partition("=")
                if eq:
                    self._again(channel.setenv, name, value)
            sent = True
            if request.subsystem:
                rc = self._again(channel.subsystem, request.command)
            else:
                rc = self._again(channel.execute, request.command)
            if rc == LIBSSH2_ERROR_CHANNEL_REQUEST_DENIED:
                sent = False  # (the node said no: nothing runs)
            if rc != 0:
                raise ConnectionError(f"the node refused the command ({rc})")
        except Exception as e:
            if sent:  # it may run: the client hears nothing, and reports it (never a second start)
                for fd in request.fds:
                    os.close(fd)
                self.drop(c)
            else:  # nothing runs: the client may start ssh
                self.refuse(c, request, f"vtool's keeper could not open a session: {e}")
            if self.session is not None and not self._alive():
                self.lost()
            return
        self.sids += 1
        ch = Channel(c, channel, request.fds, self.sids)
        try:
            os.set_blocking(ch.stdin, False)
        except OSError:
            pass
        self.channels.append(ch)
        c.channel = ch
        try:
            c.send(_message(_pack(S_SESSION_OPENED, request.rid, ch.sid)))
        except OSError:
            self.end(ch, killed=True)

    def _alive(self) -> bool:
        try:
            self.session.keepalive_send()
            return True
        except Exception:
            return False

    def take_stdin(self, fd: int) -> None:
        for ch in self.channels:
            if ch.stdin == fd and not ch.closing:
                self._read_stdin(ch)

    def _read_stdin(self, ch: Channel) -> None:
        try:
            data = os.read(ch.stdin, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            ch.pending += data
        else:
            ch.stdin_open = False

    def service(self) -> bool:
        """Move what can move for every command; True when something moved (then more may
        move at once: the loop looks again without waiting). Input goes first: libssh2 reads
        what the node sent while it writes, and the reads after it take that too."""
        from ssh2.error_codes import LIBSSH2_ERROR_EAGAIN

        moved = False
        try:
            for ch in list(self.channels):
                if ch.closing:
                    continue
                if ch.stdin_file and ch.stdin_open and len(ch.pending) < CHUNK:
                    self._read_stdin(ch)
                if ch.pending:
                    # (with EAGAIN, part of it may have gone: ``wrote`` says how much)
                    n, wrote = ch.ch.write(ch.pending[:CHUNK])
                    if n < 0 and n != LIBSSH2_ERROR_EAGAIN:
                        raise ConnectionError(f"writing failed ({n})")
                    if wrote > 0:
                        ch.pending = ch.pending[wrote:]
                        moved = True
                if not ch.pending and not ch.stdin_open and not ch.eof_sent:
                    if ch.ch.send_eof() != LIBSSH2_ERROR_EAGAIN:
                        ch.eof_sent = True
            for ch in list(self.channels):
                if ch.closing:
                    self._finish_close(ch)
                    if self.closed:
                        return False
                    continue
                drained = True
                for i, (read, fd) in enumerate(((ch.ch.read, ch.stdout), (ch.ch.read_stderr, ch.stderr))):
                    for _ in range(64):
                        n, data = read(CHUNK)
                        if n == LIBSSH2_ERROR_EAGAIN or n == 0:
                            break
                        if n < 0:
                            raise ConnectionError(f"reading failed ({n})")
                        moved = True
                        if ch.out_open[i]:
                            try:
                                _write_all(fd, data)
                            except OSError:  # the reader went away: the rest is dropped
                                ch.out_open[i] = False
                    else:
                        drained = False
                if drained and ch.ch.eof():
                    self.end(ch)
        except Exception:  # libssh2 failed on the connection itself (a node that died)
            self.lost()
            return False
        return moved

    def end(self, ch: Channel, killed: bool = False) -> None:
        """The command ended (its exit status goes to the client once the node has closed the
        session), or its client went away (killed): the session is closed at once (the
        command sees the end of its stdin, as when ssh goes away) and the client dropped.
        Closing waits for the node's answer without holding up the others (``closing``)."""
        if ch not in self.channels or ch.closing:
            return
        ch.closing, ch.killed = True, killed
        ch.close_by = time.monotonic() + self.spec["connect_timeout"] + 5
        if killed:
            try:
                ch.ch.send_eof()
            except Exception:
                pass
            self._close_fds(ch)
            self.drop(ch.client)
        self._finish_close(ch)

    def _finish_close(self, ch: Channel) -> None:
        """Go on closing ``ch``: once the node has closed it too, the exit status (if the
        command had one) goes to its client."""
        from ssh2.error_codes import LIBSSH2_ERROR_EAGAIN

        try:
            rc = ch.ch.close()
        except Exception:
            rc = -1
        if rc == LIBSSH2_ERROR_EAGAIN:
            if time.monotonic() < ch.close_by:
                return
            if ch.killed:  # (a command that ignores the end of its stdin: left to its node)
                self.channels.remove(ch)
                return
            rc = -1
        if rc != 0:  # no answer from the node: the connection is gone
            self.lost()
            return
        self.channels.remove(ch)
        if ch.killed:
            return
        status: int | None = None
        try:
            signal = ch.ch.get_exit_signal()
            if not (len(signal) > 1 and signal[1]):
                status = ch.ch.get_exit_status()
        except Exception:
            pass
        self._close_fds(ch)
        if status is not None:  # (none: killed by a signal, as ssh reports it: 255)
            try:
                ch.client.send(_message(_pack(S_EXIT_MESSAGE, ch.sid, status & 0xFFFFFFFF)))
            except OSError:
                pass
        self.drop(ch.client)

    def drop(self, c: Client) -> None:
        if c in self.clients:
            self.clients.remove(c)
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError, OSError):
            pass
        c.close()
        if not self.channels:
            self.idle_since = time.monotonic()

    def lost(self) -> None:
        """The connection is gone: the socket first (a client then finds no keeper and runs
        ssh), then every client, without an exit status (vtool.mux: the master went away)."""
        self.unlink()
        for ch in list(self.channels):
            self.channels.remove(ch)
            self._close_fds(ch)
        for c in list(self.clients):
            self.drop(c)
        self.closed = True

    def _close_fds(self, ch: Channel) -> None:
        """Close a command's descriptors, first taking its stdin off the watch (a number
        closed while watched would be missed when a new command gets it)."""
        try:
            self.sel.unregister(ch.stdin)
        except (KeyError, ValueError, OSError):
            pass
        for fd in (ch.stdin, ch.stdout, ch.stderr):
            try:
                os.close(fd)
            except OSError:
                pass

    def unlink(self) -> None:
        """Remove this node's socket (only the one this process made: not a later one)."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.made:
                os.unlink(self.path)
        except OSError:
            pass

    def decline(self, c: Client) -> None:
        """As the keeper stops: a client whose session request it holds (read whole, or waiting
        in the socket) gets "no" with that request's id, so it runs ssh itself; any other gets
        end of file, on which OpenSSH's ssh connects by itself too (a reply with another id, or
        a "no" to its alive check, would make it give up instead). What the client writes from
        here on fails (the socket is shut for reading), so no request of its goes unanswered."""
        try:
            c.sock.shutdown(socket.SHUT_RD)
            while True:  # (what it sent before the shutdown: then end of file)
                size = len(c.buf)
                if not c.read() or len(c.buf) == size:
                    break
            for kind, body in c.messages():  # (none once a request waits for its descriptors)
                if kind == NEW_SESSION:
                    c.request = Request(body)
            if c.request is not None:
                c.send(_message(_pack(S_PERMISSION_DENIED, c.request.rid) + _string(b"vtool's keeper is stopping")))
        except (ValueError, IndexError, struct.error, OSError):
            pass

    def close(self) -> None:
        self.unlink()
        if self.dialed is not None:
            self.dialed.close()
        try:  # whoever connected meanwhile gets end of file (then runs ssh)
            while True:
                sock, _ = self.listener.accept()
                sock.close()
        except OSError:
            pass
        self.listener.close()
        for ch in list(self.channels):
            self.end(ch, killed=True)
        for c in list(self.clients):
            if c.channel is None:
                self.decline(c)
            self.drop(c)
        if self.session is not None:
            try:
                self.session.set_blocking(True)
                self.session.set_timeout(2000)
                self.session.disconnect()
            except Exception:
                pass
        if self.sock is not None:
            self.sock.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select

            select.select([], [fd], [], 1)
            continue
        view = view[n:]


# -- the process ---------------------------------------------------------------------------


def dial(spec: dict[str, Any]) -> socket.socket | None:
    """A TCP connection to the node, started (a non-blocking connect) and not waited for:
    the node's sshd starts up while this process starts libssh2 (``Link.connect`` then waits
    for it). None when the node is named, not numbered (``connect`` resolves the name)."""
    host = spec["host"]
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        if sock.connect_ex((host, spec["port"])) not in (0, errno.EINPROGRESS):
            sock.close()
            return None  # (connect tries again, and says why)
        return sock
    return None


def bind(path: str) -> tuple[socket.socket, tuple[int, int]] | None:
    """A listening socket at ``path`` (only this user can connect) and its file's identity,
    or None when a live one is there already. One that nothing listens at any more (its
    keeper was killed) is replaced."""
    if os.path.lexists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return None
        except ConnectionRefusedError:
            try:
                os.unlink(path)
            except OSError:
                return None
        except OSError:
            return None
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        old = os.umask(0o077)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old)
        sock.listen(64)
        os.link(tmp, path)  # (fails if one appeared meanwhile: never replaces another's)
        os.unlink(tmp)
        st = os.lstat(path)
    except OSError:
        sock.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return None
    return sock, (st.st_dev, st.st_ino)


def main(argv: list[str]) -> int:
    """``RECORD INDEX...``: serve those nodes of vtool.early's record. Exit 0 once the sockets
    are bound (the connections go on in the background), 3 when there is nothing to serve."""
    if len(argv) < 2:
        sys.stderr.write("usage: python -m vtool.keeper RECORD INDEX...\n")
        return 2
    with open(argv[0]) as f:
        record = json.load(f)
    links = []
    for index in argv[1:]:
        node = record["nodes"].get(index)
        spec = target(node["argv"]) if node else None
        if spec is None:
            continue
        path = keeper_path(node["socket"])
        bound = bind(path)
        if bound is not None:
            links.append((spec, bound[0], path, bound[1]))
    if not links:
        return 3
    dialed = [dial(spec) for spec, *_ in links]
    if os.fork():
        return 0
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # (here, while the nodes' sshd answer the connections; the links' imports find it)
        import ssh2.session  # noqa: F401
    except ImportError:  # (each link fails to connect, and refuses its clients: they run ssh)
        pass

    threads = [Link(spec, listener, path, made, stop) for spec, listener, path, made in links]
    for t, sock in zip(threads, dialed, strict=True):
        t.dialed = sock
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

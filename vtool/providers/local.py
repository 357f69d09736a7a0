"""The local provider: every node is a real OpenSSH ``sshd -D`` on 127.0.0.1.

Each node has its own port, host key (generated here, so it is pinned before the first
connection), authorized_keys (the cluster's client key) and home folder under
``$VTOOL_HOME/clusters/<cluster>/nodes/<index>/``. Every session is started in that home
(``ForceCommand`` runs a small wrapper), so nodes never share files. Nodes run detached
and outlive vtool; ``terminate`` stops the node's sshd (after checking the PID still is
that sshd) and every process started through it.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ProviderError
from ..models import Node, NodeResult, SshTarget
from ..ssh import which_local
from ..state import (
    ClusterPaths,
    ensure_client_key,
    ensure_private_dir,
    forget_host_keys,
    list_cluster_names,
    pin_host_key,
    read_json,
    write_json,
    write_private,
)
from .base import Progress

if TYPE_CHECKING:
    import subprocess

NAME = "local"

_SHELL = """#!/bin/sh
# vtool local node: every session starts in this node's own home folder.
cd "$HOME" || exit 1
cmd=$SSH_ORIGINAL_COMMAND
unset SSH_ORIGINAL_COMMAND
if [ -n "$cmd" ]; then exec "${SHELL:-/bin/sh}" -c "$cmd"; fi
exec "${SHELL:-/bin/sh}" -l
"""

_PROFILE = """# written by vtool for local node {name}
[ -n "$BASH_VERSION" ] && [ -f "$HOME/.bashrc" ] && . "$HOME/.bashrc"
"""

_BASHRC = """# written by vtool for local node {name}
case $- in *i*) ;; *) return ;; esac
[ -r "$HOME/.vtool/cluster.env" ] && . "$HOME/.vtool/cluster.env"
PS1='[vtool {name}] \\w\\$ '
"""

_SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/ssh/sftp-server",
)


# A node's host key: ECDSA on P-256 (OpenSSL's code) for nodes made now. A client verifies it
# in less CPU than an ed25519 key, which OpenSSH checks with its own portable code: measured
# here, 7.95 ms of the client's CPU per new connection against 9.2 ms. Nodes made by an older
# vtool keep the ed25519 key they have.
_HOST_KEYS = ("ssh_host_ecdsa_key", "ssh_host_ed25519_key")


def host_key_file(d: Path) -> Path:
    """The private host key of the node in folder ``d`` (the first of _HOST_KEYS it has)."""
    for name in _HOST_KEYS:
        if (d / name).exists():
            return d / name
    return d / _HOST_KEYS[0]


def _public_key(private: Path) -> str:
    """``"TYPE BASE64"`` of a key ssh-keygen wrote (its ``.pub``, without the comment)."""
    return " ".join(Path(f"{private}.pub").read_text().split()[:2])


def _q(value: str | Path) -> str:
    value = str(value)
    if '"' in value or "\n" in value:
        raise ProviderError(f"cannot use a path containing quotes or newlines for a local node: {value!r}")
    return f'"{value}"'


def _proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _proc_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _is_node_sshd(pid: int, config: Path) -> bool:
    """True if ``pid`` is alive and still is the sshd serving ``config`` (not a reused PID)."""
    if pid <= 1 or not _proc_alive(pid):
        return False
    argv = _proc_cmdline(pid)
    if not argv:
        return False
    joined = " ".join(argv)
    return "sshd" in joined and str(config) in joined


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _has_token(pid: int, token: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return token in f.read().split(b"\0")
    except OSError:
        return False


def node_processes(sshd_pid: int | None, token: str) -> list[int]:
    """Every process of a node: its sshd, the sshd's descendants, and any process carrying
    the node's VTOOL_NODE token in its environment (detached launch scripts, screen)."""
    me = os.getpid()
    pids = _all_pids()
    parent = {p: _ppid(p) for p in pids}
    found: set[int] = set()
    if sshd_pid:
        found.add(sshd_pid)
        changed = True
        while changed:
            changed = False
            for p, pp in parent.items():
                if pp in found and p not in found:
                    found.add(p)
                    changed = True
    marker = f"VTOOL_NODE={token}".encode()
    for p in pids:
        if p not in found and _has_token(p, marker):
            found.add(p)
            # The per-session sshd above a node's shell belongs to the node too (it outlives a
            # killed listener while a shared connection keeps it open).
            pp = parent.get(p, -1)
            if pp > 1 and pp not in found and (_proc_cmdline(pp) or [""])[0].startswith("sshd:"):
                found.add(pp)
    found.discard(me)
    return sorted(found)


def _kill_all(pids: list[int], grace: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds; return survivors."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            pids = [p for p in pids if _proc_alive(p)]
            if not pids:
                return []
            time.sleep(0.05)
    return [p for p in pids if _proc_alive(p)]


def _screen_dir(home: Path, token: str) -> Path:
    """The node's own folder for screen's sockets: in its home when the socket path fits
    (screen needs it under ~100 bytes), else a private folder named after the node's token."""
    inside = home / ".screen"
    if len(str(inside)) <= 70:
        return inside
    import tempfile

    return Path(tempfile.gettempdir()) / f"vtool-screen-{os.getuid()}-{token[:16]}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalProvider:
    """Nodes as sshd processes on 127.0.0.1. See the module docstring."""

    name = NAME

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.home: Path = settings.home
        self.user = settings.ssh.user or pwd.getpwuid(os.getuid()).pw_name
        self._files: dict[str, tuple[str, str]] = {}  # cluster -> (key file, known_hosts) (ssh_target)

    # -- checks -------------------------------------------------------------------------
    def _sshd(self) -> str:
        path = self.settings.local_sshd or which_local("sshd")
        if not path or not os.access(path, os.X_OK):
            raise ProviderError(
                "sshd not found: the local provider runs each node as an OpenSSH server; install it "
                "(Debian/Ubuntu: sudo apt-get install openssh-server) or set local.sshd in vtool.yaml"
            )
        return os.path.abspath(path)

    def check(self) -> None:
        self._sshd()
        for tool in ("ssh", "ssh-keygen"):
            if which_local(tool) is None:
                raise ProviderError(
                    f"{tool} not found: install the OpenSSH client (Debian/Ubuntu: sudo apt-get install openssh-client)"
                )
        me = pwd.getpwuid(os.getuid()).pw_name
        if self.user != me:
            raise ProviderError(f"local nodes run as you ({me}); unset ssh.user ({self.user!r}) for the local provider")

    # -- listing ------------------------------------------------------------------------
    def clusters(self) -> list[str]:
        return [c for c in list_cluster_names(self.home) if self._node_dirs(c)]

    def _node_dirs(self, cluster: str) -> list[Path]:
        base = ClusterPaths(self.home, cluster).nodes
        if not base.is_dir():
            return []
        return sorted(
            (p for p in base.iterdir() if p.name.isdigit() and (p / "node.json").is_file()), key=lambda p: int(p.name)
        )

    def _node(self, cluster: str, d: Path) -> Node | None:
        meta = read_json(d / "node.json", None)
        if not isinstance(meta, dict):
            return None
        alive = _is_node_sshd(int(meta.get("pid", 0)), d / "sshd_config")
        return Node(
            cluster=cluster,
            index=int(meta["index"]),
            id=str(meta["id"]),
            provider=NAME,
            address="127.0.0.1",
            port=int(meta["port"]),
            user=str(meta["user"]),
            private_address="127.0.0.1",
            state="running" if alive else ("stopped" if meta.get("stopped") else "dead"),
            launched_at=float(meta.get("launched_at", 0)),
            extra=(("pid", str(meta.get("pid", ""))),),
        )

    def nodes(self, cluster: str) -> list[Node]:
        out = [n for n in (self._node(cluster, d) for d in self._node_dirs(cluster)) if n is not None]
        return sorted(out, key=lambda n: n.index)

    # -- launch -------------------------------------------------------------------------
    def launch(self, cluster: str, indices: Sequence[int], progress: Progress, wait: bool = True) -> list[Node]:
        sshd = self._sshd()
        paths = ClusterPaths(self.home, cluster).create()
        ensure_client_key(paths)
        ensure_private_dir(paths.nodes)
        if os.getuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        made: list[Node] = []
        try:
            for index in indices:
                made.append(self._start_node(sshd, paths, cluster, index))
                progress(f"node {index}: sshd started on 127.0.0.1:{made[-1].port}")
        except BaseException:
            self.terminate(cluster, made, lambda _m: None)
            raise
        return made

    def _start_node(self, sshd: str, paths: ClusterPaths, cluster: str, index: int) -> Node:
        import subprocess

        d = paths.nodes / str(index)
        if d.exists():
            import shutil

            shutil.rmtree(d)  # leftovers of a node that failed to start
        ensure_private_dir(d)
        home = ensure_private_dir(d / "home")
        name = f"{cluster}-{index}"
        write_private(home / ".profile", _PROFILE.format(name=name), 0o644)
        write_private(home / ".bashrc", _BASHRC.format(name=name), 0o644)
        hostkey = d / _HOST_KEYS[0]
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "256", "-N", "", "-C", f"vtool-{name}", "-f", str(hostkey)],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        os.chmod(hostkey, 0o600)
        write_private(d / "authorized_keys", paths.pubkey.read_text(), 0o600)
        write_private(d / "shell", _SHELL, 0o755)
        token = os.urandom(12).hex()  # (as secrets.token_hex, without importing hashlib and OpenSSL)
        screendir = ensure_private_dir(_screen_dir(home, token))  # `screen -r` sees only this node's sessions
        node_id = f"local-{cluster}-{index}-{token[:8]}"
        alias = f"vtool-{cluster}-{index}"
        pin_host_key(paths, alias, _public_key(hostkey))
        launched = time.time()
        port, pid = self._serve(sshd, d, home, token, screendir)
        meta = {
            "index": index,
            "id": node_id,
            "port": port,
            "pid": pid,
            "user": self.user,
            "token": token,
            "launched_at": launched,
            "cluster": cluster,
            "screendir": str(screendir),
        }
        write_json(d / "node.json", meta)
        return Node(
            cluster,
            index,
            node_id,
            NAME,
            "127.0.0.1",
            port,
            self.user,
            "127.0.0.1",
            "running",
            launched,
            (("pid", str(pid)),),
        )

    def _serve(self, sshd: str, d: Path, home: Path, token: str, screendir: Path, port: int = 0) -> tuple[int, int]:
        """Start the node's sshd (on ``port`` if it is still free, else on a new one)."""
        import subprocess

        last_error = ""
        for _attempt in range(8):
            port = port or _free_port()
            self._write_config(d, port, home, token, screendir)
            log = d / "sshd.log"
            pidfile = d / "sshd.pid"
            pidfile.unlink(missing_ok=True)
            proc = subprocess.Popen(
                [sshd, "-D", "-f", str(d / "sshd_config"), "-E", str(log)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                env=_sshd_env(),
            )
            pid = self._wait_listening(proc, port, pidfile)
            if pid:
                return port, pid
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            last_error = (err + (log.read_text(errors="replace") if log.exists() else "")).strip()
            if "Bind" not in last_error and "bind" not in last_error and "Address already in use" not in last_error:
                break
            port = 0
        raise ProviderError(
            f"node {d.name}: sshd did not start: {last_error.splitlines()[-1] if last_error else 'no output'}"
        )

    @staticmethod
    def _stop_processes(d: Path) -> tuple[dict[str, Any], list[int], list[int]]:
        """Stop every process of the node in folder ``d`` (its sshd checked to still be its
        sshd first); return (its node.json, the processes found, those that would not stop)."""
        meta = read_json(d / "node.json", {}) or {}
        pid = int(meta.get("pid", 0) or 0)
        sshd_pid = pid if _is_node_sshd(pid, d / "sshd_config") else None
        token = str(meta.get("token", ""))
        victims = node_processes(sshd_pid, token) if token else ([sshd_pid] if sshd_pid else [])
        return meta, victims, _kill_all(victims)

    # -- stop and start: keep the node's files, stop its processes --------------------------
    def stop(self, cluster: str, nodes: Sequence[Node], progress: Progress) -> list[NodeResult]:
        paths = ClusterPaths(self.home, cluster)
        out = []
        for node in nodes:
            d = paths.nodes / str(node.index)
            meta, _victims, survivors = self._stop_processes(d)
            if survivors:
                out.append(NodeResult(node.index, False, error=f"processes {survivors} did not stop"))
                continue
            meta.update(stopped=True, pid=0)
            write_json(d / "node.json", meta)
            progress(f"node {node.index}: stopped")
            out.append(NodeResult(node.index, True))
        return out

    def start(self, cluster: str, nodes: Sequence[Node], progress: Progress) -> list[NodeResult]:
        sshd = self._sshd()
        paths = ClusterPaths(self.home, cluster)
        out = []
        for node in nodes:
            d = paths.nodes / str(node.index)
            meta = read_json(d / "node.json", {}) or {}
            if node.state == "running":
                out.append(NodeResult(node.index, True))
                continue
            home = d / "home"
            screendir = Path(meta.get("screendir") or _screen_dir(home, str(meta["token"])))
            ensure_private_dir(screendir)
            port, pid = self._serve(sshd, d, home, str(meta["token"]), screendir, port=int(meta.get("port", 0)))
            meta.update(stopped=False, pid=pid, port=port)
            write_json(d / "node.json", meta)
            progress(f"node {node.index}: started on 127.0.0.1:{port}")
            out.append(NodeResult(node.index, True))
        return out

    def _write_config(self, d: Path, port: int, home: Path, token: str, screendir: Path) -> None:
        lines = [
            f"# vtool local node {d.name}: written by vtool, read by sshd -D",
            f"ListenAddress 127.0.0.1:{port}",
            f"HostKey {_q(host_key_file(d))}",
            f"PidFile {_q(d / 'sshd.pid')}",
            # vtool's client key, then the node's own file (where the cluster-internal key
            # lets the other nodes in, as on a cloud machine).
            f"AuthorizedKeysFile {_q(d / 'authorized_keys')} {_q(home / '.ssh' / 'authorized_keys')}",
            "AuthenticationMethods publickey",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # The node's files are 0600/0700 in vtool's 0700 folders; their parents (e.g. a
            # world-writable /tmp in tests) would make StrictModes refuse the key.
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {self.user}",
            "AllowAgentForwarding no",
            "X11Forwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            # Fan-out opens many connections and sessions at once (see shared notes).
            "MaxStartups 1000",
            "MaxSessions 1000",
            f"SetEnv {_q(f'HOME={home}')} {_q(f'SCREENDIR={screendir}')} VTOOL_NODE={token}",
            f"ForceCommand {_q(d / 'shell')}",
        ]
        sftp = next((p for p in _SFTP_SERVERS if os.access(p, os.X_OK)), None)
        if sftp:
            lines.append(f"Subsystem sftp {sftp}")
        write_private(d / "sshd_config", "\n".join(lines) + "\n", 0o600)

    @staticmethod
    def _wait_listening(proc: subprocess.Popen[bytes], port: int, pidfile: Path, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return 0
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.settimeout(2)
                    if s.recv(4).startswith(b"SSH-") and pidfile.exists():
                        return proc.pid
            except OSError:
                pass
            time.sleep(0.02)
        proc.kill()
        return 0

    def host_keys(self, node: Node) -> list[str]:
        """The node's host key, read from the key vtool generated for it (never trusted on
        first use)."""
        try:
            return [_public_key(host_key_file(ClusterPaths(self.home, node.cluster).nodes / str(node.index)))]
        except OSError:
            return []

    # -- reaching a node ------------------------------------------------------------------
    def ssh_target(self, node: Node) -> SshTarget:
        files = self._files.get(node.cluster)
        if files is None:  # (once per cluster, not per node: paths are slow to make)
            paths = ClusterPaths(self.home, node.cluster)
            files = self._files[node.cluster] = (str(paths.key), str(paths.known_hosts))
        return SshTarget(
            host=node.address,
            port=node.port,
            user=node.user,
            key_file=files[0],
            known_hosts=files[1],
            host_key_alias=node.host_key_alias,
        )

    # -- tear-down ------------------------------------------------------------------------
    def terminate(self, cluster: str, nodes: Sequence[Node], progress: Progress) -> list[NodeResult]:
        import shutil

        paths = ClusterPaths(self.home, cluster)
        results = []
        for node in nodes:
            d = paths.nodes / str(node.index)
            meta, victims, survivors = self._stop_processes(d)
            if survivors:
                results.append(NodeResult(node.index, False, error=f"processes {survivors} did not stop"))
                continue
            shutil.rmtree(d, ignore_errors=True)
            if meta.get("screendir") and not str(meta["screendir"]).startswith(str(d)):
                shutil.rmtree(meta["screendir"], ignore_errors=True)
            forget_host_keys(paths, [node.host_key_alias])
            progress(f"node {node.index}: stopped ({len(victims)} process{'es' * (len(victims) != 1)})")
            results.append(NodeResult(node.index, True, value=len(victims)))
        return results

    def forget(self, cluster: str) -> None:
        nodes_dir = ClusterPaths(self.home, cluster).nodes
        if nodes_dir.is_dir() and not any(nodes_dir.iterdir()):
            nodes_dir.rmdir()


def _sshd_env() -> dict[str, str]:
    """sshd's own environment: minimal, so nothing of the user's shell leaks into nodes."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ")
    return {k: os.environ[k] for k in keep if k in os.environ}

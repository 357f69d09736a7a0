"""Local state under $VTOOL_HOME: per-cluster folders, keys, known_hosts, the cluster cache.

Layout::

    $VTOOL_HOME/                      0700
      clusters/<name>/                0700
        id_ed25519, id_ed25519.pub    the cluster's client key (0600)
        known_hosts                   pinned host keys of the cluster's nodes (0600)
        state.json                    cache: provider, current release (atomic writes)
        packages/                     archives of injected releases
        nodes/<index>/                local provider only: one sshd node
      cm/                             SSH connection-sharing sockets (0700)

The provider stays the source of truth for which nodes exist; this is a cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, ProviderError
from .models import Release


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as 0700 whatever the umask; refuse a group/world-writable one."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link; vtool keeps its state only in real folders you own")
    st = path.stat()
    if st.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to another user; vtool keeps its state only in folders you own")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Write ``data`` atomically to ``path`` with ``mode``, whatever the umask."""
    raw = data.encode() if isinstance(data, str) else data
    import tempfile  # (here: a command that writes nothing does not import it, ~1.5 ms)

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_json(path: Path, default: Any = None) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read vtool state ({e}); remove the file to rebuild it") from None


def write_json(path: Path, data: Any) -> None:
    write_private(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class ClusterPaths:
    """Where one cluster's local files live."""

    def __init__(self, home: Path, cluster: str) -> None:
        self.home = home
        self.cluster = cluster
        self.root = home / "clusters" / cluster
        self.key = self.root / "id_ed25519"
        self.pubkey = self.root / "id_ed25519.pub"
        self.relay_key = self.root / "relay_ed25519"  # the nodes' key to reach each other
        self.relay_pubkey = self.root / "relay_ed25519.pub"
        self.known_hosts = self.root / "known_hosts"
        self.state_file = self.root / "state.json"
        self.packages = self.root / "packages"
        self.nodes = self.root / "nodes"

    def exists(self) -> bool:
        return self.root.is_dir()

    def create(self) -> ClusterPaths:
        ensure_private_dir(self.home)
        ensure_private_dir(self.home / "clusters")
        ensure_private_dir(self.root)
        if not self.known_hosts.exists():
            write_private(self.known_hosts, "")
        return self


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block: vtool
    commands running at once on one cluster take turns for what must not interleave."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def list_cluster_names(home: Path) -> list[str]:
    base = home / "clusters"
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_private_key(path: Path) -> None:
    """Refuse a private key that other users can read."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        raise ConfigError(f"{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")


def ensure_client_key(paths: ClusterPaths) -> Path:
    """The cluster's ed25519 client key: generated once (0600 in a 0700 folder), then checked."""
    return _ensure_key(paths, paths.key, paths.pubkey, f"vtool-{paths.cluster}")


def ensure_relay_key(paths: ClusterPaths) -> Path:
    """The cluster-internal key the nodes use to reach each other (relayed injects, MPI):
    a key of its own, so the client's key never leaves the client."""
    return _ensure_key(paths, paths.relay_key, paths.relay_pubkey, f"vtool-{paths.cluster}-nodes")


def _ensure_key(paths: ClusterPaths, key: Path, pubkey: Path, comment: str) -> Path:
    paths.create()
    if key.exists():
        check_private_key(key)
        return key
    import shutil
    import subprocess

    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise ProviderError(
            "ssh-keygen not found: install the OpenSSH client (Debian/Ubuntu: apt-get install openssh-client)"
        )
    import tempfile

    tmpdir = Path(tempfile.mkdtemp(dir=paths.root, prefix=".keygen."))
    try:
        tmpkey = tmpdir / "key"
        subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(tmpkey)],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.chmod(tmpkey, 0o600)
        os.replace(tmpkey.with_suffix(".pub"), pubkey)
        os.replace(tmpkey, key)
    except subprocess.CalledProcessError as e:
        raise ProviderError(f"ssh-keygen failed: {e.stderr.decode(errors='replace').strip()}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return key


def pin_host_key(paths: ClusterPaths, alias: str, key_line: str) -> None:
    """Record ``alias``'s host key (``"ssh-ed25519 AAAA..."``) in the cluster's known_hosts."""
    forget_host_keys(paths, [alias], add=[f"{alias} {key_line.strip()}"])


def forget_host_keys(paths: ClusterPaths, aliases: list[str], add: list[str] | None = None) -> None:
    if not paths.root.is_dir():
        return
    with open(paths.root / ".known_hosts.lock", "a") as lock:  # threads and processes pin at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            lines = paths.known_hosts.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        drop = set(aliases)
        kept = [ln for ln in lines if ln.split(" ", 1)[0] not in drop]
        kept.extend(add or [])
        write_private(paths.known_hosts, "".join(f"{ln}\n" for ln in kept))


def pinned_aliases(paths: ClusterPaths) -> set[str]:
    try:
        return {ln.split(" ", 1)[0] for ln in paths.known_hosts.read_text().splitlines() if ln.strip()}
    except FileNotFoundError:
        return set()


def sha256_hex(data: bytes) -> str:
    """``hashlib.sha256(data).hexdigest()``. Python's own sha256 where it has one: importing
    hashlib loads OpenSSL, 2-3 ms of every command's start-up here, for a few short names."""
    try:
        from _sha256 import sha256  # CPython up to 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # type: ignore  # (3.12 and later)
        except ImportError:
            from hashlib import sha256  # type: ignore
    return sha256(data).hexdigest()  # type: ignore[no-any-return]


def control_dir_path(home: Path) -> Path:
    """Where the SSH connection-sharing sockets for ``home`` live (not created)."""
    candidate = home / "cm"
    # sun_path holds 107 bytes; OpenSSH adds "/" + a 40-char hash + a 17-char temporary suffix.
    if len(str(candidate)) > 48:
        digest = sha256_hex(str(home).encode())[:10]
        import tempfile

        candidate = Path(tempfile.gettempdir()) / f"vtool-{os.getuid()}-{digest}"
    return candidate


def control_dir(home: Path) -> Path:
    """A private folder for SSH connection-sharing sockets, short enough for a socket path."""
    return ensure_private_dir(control_dir_path(home))


class ClusterCache:
    """state.json: the provider name and the release the cluster runs. A cache: it can be lost."""

    def __init__(self, paths: ClusterPaths) -> None:
        self.paths = paths

    def load(self) -> dict[str, Any]:
        data = read_json(self.paths.state_file, {})
        return data if isinstance(data, dict) else {}

    def update(self, **changes: Any) -> None:
        self.paths.create()
        with locked(self.paths.root / ".state.lock"):
            data = self.load()
            data.update(changes)
            write_json(self.paths.state_file, data)

    def release(self) -> Release | None:
        r = self.load().get("release")
        if not isinstance(r, dict):
            return None
        try:
            rel = Release(**r)
        except TypeError:
            return None
        return rel if Path(rel.archive).is_file() else None

    def set_release(self, release: Release) -> None:
        self.update(release=release.__dict__.copy())

    def next_index(self) -> int:
        value = self.load().get("next_index", 0)
        return value if isinstance(value, int) and value >= 0 else 0

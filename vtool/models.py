"""Frozen dataclasses passed across every seam (providers, plugins, api, tasks). No I/O here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, UsageError

CLUSTER_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,40}$")


def check_cluster_name(name: str) -> str:
    """Return ``name`` if it is a valid cluster name, else raise ConfigError."""
    if not isinstance(name, str) or not CLUSTER_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid cluster name {name!r}: use a lower-case letter, then up to 40 lower-case letters, digits or '-'"
        )
    return name


@dataclass(frozen=True)
class SshTarget:
    """Everything needed to open an SSH connection to one node, strictly verified."""

    host: str
    port: int
    user: str
    key_file: str
    known_hosts: str
    host_key_alias: str
    proxy_jump: str | None = None


@dataclass(frozen=True)
class Node:
    """One machine of a cluster. ``index`` is stable for the node's whole life."""

    cluster: str
    index: int
    id: str
    provider: str
    address: str  # where vtool's SSH connects
    port: int
    user: str
    private_address: str  # where the other nodes reach it
    state: str = "running"  # running | stopped | pending | dead
    launched_at: float = 0.0  # epoch seconds
    extra: tuple[tuple[str, str], ...] = ()  # provider-specific facts, shown by status

    @property
    def name(self) -> str:
        return f"{self.cluster}-{self.index}"

    @property
    def host_key_alias(self) -> str:
        return f"vtool-{self.cluster}-{self.index}"


@dataclass(frozen=True)
class Release:
    """A package injected into a cluster: its name, its content hash, the local copy."""

    name: str
    hash: str
    compression: str  # "gz" | "bz2" | "none" (a plain tar)
    archive: str  # local path of the package archive (kept for nodes launched later)
    launcher: str = "vtool-launch"

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.hash[:12]}"

    def payload(self, zstd: bool = False) -> str:
        """The name of the package as a node keeps it (``~/.vtool/packages``) and the client
        its zstd copy: a plain tar, or that tar compressed with zstd."""
        return f"{self.dirname}.tar.zst" if zstd else f"{self.dirname}.tar"


@dataclass(frozen=True)
class ClusterInfo:
    """A cluster as vtool knows it: its nodes and the release they should run."""

    name: str
    provider: str
    nodes: tuple[Node, ...]
    release: Release | None = None

    def node(self, index: int) -> Node:
        for n in self.nodes:
            if n.index == index:
                return n
        from .errors import NodeNotFound

        have = ", ".join(str(n.index) for n in self.nodes) or "none"
        raise NodeNotFound(f"cluster {self.name!r} has no node {index} (nodes: {have})")


@dataclass(frozen=True)
class CommandResult:
    """What one remote command did."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""


@dataclass(frozen=True)
class NodeResult:
    """The outcome of one operation on one node. ``error`` is set when it failed."""

    index: int
    ok: bool
    exit_code: int | None = None
    error: str | None = None
    value: Any = None
    seconds: float = 0.0


@dataclass(frozen=True)
class GroupResult:
    """One result per node, in index order (as fabric's GroupResult)."""

    results: tuple[NodeResult, ...] = ()

    @property
    def succeeded(self) -> tuple[NodeResult, ...]:
        return tuple(r for r in self.results if r.ok)

    @property
    def failed(self) -> tuple[NodeResult, ...]:
        return tuple(r for r in self.results if not r.ok)

    @property
    def ok(self) -> bool:
        return not self.failed

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.results)


@dataclass(frozen=True)
class NodeStatus:
    """What ``status`` reports about one node."""

    node: Node
    reachable: bool
    release: str | None = None
    launch_state: str = "none"  # none | running | exited | unknown
    launch_exit: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class FetchReport:
    """What a fetch wrote, and what it refused to write (hostile or unsupported entries)."""

    path: str
    files: int = 0
    bytes: int = 0
    skipped: tuple[str, ...] = field(default_factory=tuple)


def parse_node_spec(spec: str | None, existing: list[int]) -> list[int]:
    """Turn ``"0,2,5-7"`` into sorted indices; every one must exist. None or "all" -> all."""
    if spec is None or str(spec).strip() in ("", "all"):
        return sorted(existing)
    wanted: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UsageError(f"invalid node list {spec!r}: use indices and ranges like 0,2,5-7")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UsageError(f"invalid node range {part!r}: {hi} is smaller than {lo}")
        top = max(existing, default=-1)
        if hi > top:  # checked before the range is built: `0-999999999999` is refused at once
            from .errors import NodeNotFound

            have = ",".join(str(i) for i in sorted(existing)) or "none"
            raise NodeNotFound(f"no node {hi if lo <= top else lo} in this cluster (nodes: {have})")
        wanted.update(range(lo, hi + 1))
    missing = sorted(wanted - set(existing))
    if missing:
        from .errors import NodeNotFound

        have = ",".join(str(i) for i in sorted(existing)) or "none"
        raise NodeNotFound(f"no node {','.join(map(str, missing))} in this cluster (nodes: {have})")
    return sorted(wanted)

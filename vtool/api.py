"""The verbs as plain functions returning dataclasses. Nothing here prints: progress goes
to an optional callback, remote output to an optional line callback.

    from vtool import Cluster
    c = Cluster("demo")
    c.launch(3)
    c.inject("pkg-examples/hello")
    c.get_all("hello-result.txt", "out/r")
    c.terminate()
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pluggy

from . import early, fanout, remote
from . import plugin_manager as plugins
from .config import VTOOL_DEFAULTS, Settings, load_settings
from .errors import (
    ConfigError,
    NodeError,
    NodeNotFound,
    NodeUnreachable,
    PartialFailure,
    PluginError,
    UsageError,
    VtoolError,
)
from .models import (
    ClusterInfo,
    CommandResult,
    FetchReport,
    GroupResult,
    Node,
    NodeResult,
    NodeStatus,
    Release,
    check_cluster_name,
    parse_node_spec,
)
from .providers.base import Provider
from .ssh import SshClient, check_algorithms, connect_helper, ssh_config_block
from .state import (
    ClusterCache,
    ClusterPaths,
    check_private_key,
    control_dir,
    ensure_relay_key,
    list_cluster_names,
    locked,
    pin_host_key,
    pinned_aliases,
    sha256_hex,
)

Progress = Callable[[str], None]
LineSink = Callable[[int, str, str], None]  # (node index, "out"|"err", line)

MAX_LAUNCH = 1000


def _quiet(_msg: str) -> None:
    pass


def settings(
    *,
    cluster: str | None = None,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    pm: pluggy.PluginManager | None = None,
) -> Settings:
    """The effective settings (config files, profile, VTOOL_* variables, these arguments)."""
    pm = pm or plugins.get()
    defaults = plugins.config_defaults(pm)
    clash = sorted(set(defaults) & set(VTOOL_DEFAULTS))
    if clash:
        raise PluginError(f"a plugin declares vtool's own setting {clash[0]!r}")
    if cluster is not None:
        check_cluster_name(cluster)
    return load_settings(cluster=cluster, profile=profile, overrides=overrides, plugin_defaults=defaults)


class Session:
    """What one command needs: settings, plugins, the provider, one SSH client per node."""

    def __init__(self, settings: Settings, pm: pluggy.PluginManager | None = None) -> None:
        self.settings = settings
        self.pm = pm or plugins.get()
        self.cluster = settings.cluster
        self.paths = ClusterPaths(settings.home, self.cluster)
        self.cache = ClusterCache(self.paths)
        self._provider: Provider | None = None
        self._clients: dict[int, SshClient] = {}
        self._lock = threading.Lock()
        self._checked_keys: set[str] = set()  # private keys whose mode was checked (client)
        self._ssh_common: dict[str, Any] | None = None  # what every client shares (client)
        self._remember: ClusterInfo | None = None

    @property
    def provider(self) -> Provider:
        if self._provider is None:
            self._provider = provider_for(self.settings, self.pm, self.settings.provider)
        return self._provider

    def info(self) -> ClusterInfo:
        nodes = tuple(self.provider.nodes(self.cluster))
        return ClusterInfo(self.cluster, self.provider.name, nodes, self.cache.release())

    def existing(self) -> ClusterInfo:
        """The cluster, which must have nodes (else NodeNotFound naming the clusters there are)."""
        info = self.info()
        if not info.nodes:
            names = ", ".join(self.provider.clusters()) or "none"
            raise NodeNotFound(f"no cluster named {self.cluster!r} (clusters: {names}); start one with `vtool launch`")
        return info

    def select(self, info: ClusterInfo, spec: str | int | None, only_failed: str | None = None) -> list[Node]:
        """The nodes named by ``spec`` (default all); with ``only_failed=VERB``, only those
        of them that failed the last time VERB ran on this cluster."""
        wanted = parse_node_spec(None if spec is None else str(spec), [n.index for n in info.nodes])
        if only_failed is not None:
            failed = set(self.cache.load().get("last_failed", {}).get(only_failed, []))
            wanted = [i for i in wanted if i in failed]
            if not wanted:
                raise UsageError(
                    f"no failed nodes to re-run: the last `{only_failed}` on cluster {self.cluster!r} succeeded everywhere"
                )
        if early.remembering():
            self._remember = info  # written down once the command contacts the nodes (fan_out)
        return [info.node(i) for i in wanted]

    def remember_connections(self, info: ClusterInfo) -> None:
        """Write down how to open each node's connection, for the next command's start-up
        (vtool.early). Not again when the record this command started from was written for
        the same nodes and the same ``ssh`` command line (its first node's): building an SSH
        client for every node of the cluster only to find the record unchanged was 3.5 ms of
        a command's CPU on a 64-node cluster."""
        running = [n for n in info.nodes if n.state == "running"]
        try:
            first = self.client(running[0]).opener_argv() if running else None
        except VtoolError:
            first = None
        nodes_now = [[n.index, n.id, n.address, n.port, n.user] for n in running[: early.RECORD_NODES]]
        signature = [self.settings.concurrency, first, nodes_now]
        if first is not None and early.unchanged(signature):
            return
        nodes: dict[int, tuple[str, list[str]]] = {}
        connector = None
        for node in running:
            if len(nodes) >= early.RECORD_NODES:
                break
            try:
                c = self.client(node)
            except VtoolError:
                continue
            opener = c.opener_argv()
            if opener is not None and c.control_path is not None:
                nodes[node.index] = (c.control_path, opener)
                connector = connector or c.connector
        paths = [str(self.paths.known_hosts), str(self.paths.nodes)]
        early.remember(paths, self.settings.concurrency, nodes, connector, signature)

    def record(self, verb: str, result: GroupResult) -> GroupResult:
        """Remember which nodes failed ``verb`` (for --only-failed)."""
        data = self.cache.load().get("last_failed", {})
        data = data if isinstance(data, dict) else {}
        failed = [r.index for r in result.failed]
        if data.get(verb) == failed:
            return result  # (as written last time: no write, no fsync)
        data[verb] = failed
        if self.paths.exists():
            self.cache.update(last_failed=data)
        return result

    def client(self, node: Node) -> SshClient:
        with self._lock:
            c = self._clients.get(node.index)
            if c is None:
                target = self.provider.ssh_target(node)
                if target.key_file not in self._checked_keys:
                    check_private_key(Path(target.key_file))
                    self._checked_keys.add(target.key_file)
                address = self.pm.hook.vtool_node_address(node=node, settings=self.settings)
                if address:
                    target = replace(target, host=str(address[0]), port=int(address[1]))
                jump = self.pm.hook.vtool_gateway(node=node, settings=self.settings)
                if jump:
                    target = replace(target, proxy_jump=str(jump))
                if self._ssh_common is None:
                    s = self.settings
                    self._ssh_common = dict(
                        program=s.ssh.program,
                        persist=s.ssh.persist,
                        connect_timeout=s.timeout.connect,
                        kex=s.ssh.kex,
                        ciphers=s.ssh.ciphers,
                        hostkeys=s.ssh.hostkeys,
                        control_dir=control_dir(s.home),
                        # (in VTOOL_HOME or ~/.vtool: a project's vtool.yaml may set `home`, and a
                        # program vtool runs must not come from a folder a project chose)
                        connector=connect_helper(Path(early.state_home()) / "bin") if s.ssh.nodelay else None,
                    )
                c = SshClient(
                    target,
                    **self._ssh_common,
                    # One shared connection per node *identity*: a leftover connection to a
                    # dead node is never reused for another node at the same address and port.
                    control_name=sha256_hex(
                        f"{node.host_key_alias}\0{node.id}\0{target.host}\0{target.port}\0{target.user}".encode()
                    )[:32],
                )
                self._clients[node.index] = c
            return c

    def remote(self, node: Node) -> Callable[..., CommandResult]:
        client = self.client(node)

        def run(command: str, input: bytes | None = None) -> CommandResult:
            return client.run(command, input=input)

        return run

    def fan_out(
        self, nodes: Sequence[Node], op: Callable[[Node], Any], on_done: Callable[[NodeResult], None] | None = None
    ) -> GroupResult:
        if self._remember is not None:  # past every check of the command's input
            info, self._remember = self._remember, None
            self.remember_connections(info)
        return fanout.fan_out(
            nodes, op, concurrency=self.settings.concurrency, on_done=on_done, debug=self.settings.debug
        )


def provider_for(settings: Settings, pm: pluggy.PluginManager, name: str) -> Provider:
    factories = plugins.providers(pm)
    if name not in factories:
        raise ConfigError(
            f"unknown provider {name!r} (available: {', '.join(sorted(factories))}); set `provider:` in vtool.yaml or VTOOL_PROVIDER"
        )
    return factories[name](settings)  # type: ignore[no-any-return]


# -- launch -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchResult:
    cluster: ClusterInfo  # the whole cluster after the launch
    new: tuple[Node, ...]  # the nodes this launch made (ready ones)
    ready: GroupResult  # one result per node created: did it accept SSH in time
    injected: GroupResult | None = None  # the cluster's release sent to the new nodes
    informed: GroupResult | None = None  # cluster files rewritten on every node (when no release was sent)


def check_count(count: Any) -> int:
    try:
        n = int(str(count).strip())
    except ValueError:
        raise UsageError(f"launch needs a whole number of nodes, not {count!r}") from None
    if n < 1 or n > MAX_LAUNCH:
        raise UsageError(f"launch needs between 1 and {MAX_LAUNCH} nodes, not {n}")
    return n


def wait_ready(s: Session, node: Node, deadline: float) -> None:
    """Wait until ``node`` accepts SSH. A node whose host key is not pinned yet (a cloud
    node's first contact) has its key recorded by that first connection, into the cluster's
    known_hosts; every later connection checks it strictly."""
    client = s.client(node)
    timeout = s.settings.timeout
    last = ""
    while True:
        try:
            if node.host_key_alias not in pinned_aliases(s.paths):
                # A provider that knows the key says so; otherwise trust on first use.
                known = getattr(s.provider, "host_keys", None)
                keys = known(node) if known is not None else []
                if not keys:
                    keys = client.first_contact(timeout=max(1.0, timeout.connect))
                for line in keys:
                    pin_host_key(s.paths, node.host_key_alias, line)
            client.run("true", timeout=max(1.0, timeout.connect), check=True)
            return
        except NodeUnreachable as e:  # not up yet; anything else fails at once
            last = str(e)
        if time.monotonic() >= deadline:
            raise NodeError(f"did not accept SSH within {timeout.ready:g}s ({last})")
        time.sleep(0.5)


def launch(
    count: int | str,
    *,
    settings: Settings,
    inject: bool | None = None,
    progress: Progress = _quiet,
    wait: bool = True,
    keep_unready: bool = False,
) -> LaunchResult:
    """Add ``count`` nodes to the cluster (additive, stable indices), wait until each accepts
    SSH, run the after-launch hooks, and send them the cluster's current release.

    ``wait=False`` returns once the provider has the nodes (``inject`` waits for them).
    Nodes that never accept SSH are terminated unless ``keep_unready``."""
    import shutil

    n = check_count(count)
    if shutil.which(settings.ssh.program) is None:
        raise ConfigError(f"ssh.program {settings.ssh.program!r} was not found; install the OpenSSH client")
    check_algorithms(settings.ssh.program, settings.ssh)  # a typo is refused before a node is made
    s = Session(settings)
    s.provider.check()
    s.paths.create()
    with locked(s.paths.root / ".launch.lock"):  # two launches at once get distinct indices
        before = s.provider.nodes(s.cluster)
        start = max([s.cache.next_index()] + [x.index + 1 for x in before])
        indices = list(range(start, start + n))
        s.cache.update(provider=s.provider.name, next_index=start + n)
        progress(
            f"launching {n} node{'s' * (n != 1)} ({indices[0]}-{indices[-1]}) on {s.provider.name} "
            f"for cluster {s.cluster!r}"
        )
        created = s.provider.launch(s.cluster, indices, progress, wait=wait)
    if not wait:
        return LaunchResult(s.info(), tuple(created), GroupResult(tuple(NodeResult(x.index, True) for x in created)))

    deadline = time.monotonic() + settings.timeout.ready
    counter = {"ready": 0}

    def ready_done(r: NodeResult) -> None:
        if r.ok:
            counter["ready"] += 1
        progress(
            f"waiting for SSH: {counter['ready']}/{len(created)} ready" + ("" if r.ok else f" (node {r.index} failed)")
        )

    progress(f"waiting for SSH on {len(created)} node(s) (at most {settings.timeout.ready:g}s)")
    ready = s.fan_out(created, lambda node: wait_ready(s, node, deadline), on_done=ready_done)
    failed = {r.index for r in ready.failed}
    if failed and keep_unready:
        progress(f"keeping {len(failed)} node(s) that never accepted SSH: {', '.join(map(str, sorted(failed)))}")
        created = [x for x in created if x.index not in failed]  # kept in the cluster, not set up
        failed = set()
    if failed:
        progress(f"terminating {len(failed)} node(s) that never accepted SSH: {', '.join(map(str, sorted(failed)))}")
        s.provider.terminate(s.cluster, [x for x in created if x.index in failed], progress)
    new = [x for x in created if x.index not in failed]
    info = s.info()

    def after(node: Node) -> None:
        s.pm.hook.vtool_after_launch(cluster=info, node=node, settings=settings, remote=s.remote(node))

    hooked = s.fan_out(new, after)
    bad = {r.index for r in hooked.failed}
    if bad:
        # Same policy as for nodes that never answered: a node a plugin could not set up is
        # not left half-configured in the cluster.
        progress(f"terminating {len(bad)} node(s) whose set-up failed: {', '.join(map(str, sorted(bad)))}")
        s.provider.terminate(s.cluster, [x for x in new if x.index in bad], progress)
        failures = {h.index: h for h in hooked.failed}
        ready = GroupResult(tuple(failures.get(r.index, r) for r in ready.results))
        new = [x for x in new if x.index not in bad]
        info = s.info()

    release = s.cache.release()
    do_inject = settings.inject_auto if inject is None else inject
    injected = informed = None
    live = [x for x in info.nodes if x.state == "running"]
    if release is not None and do_inject and new:
        progress(f"sending release {release.dirname} to the new node(s)")
        injected = _inject_release(s, info, release, targets=new, everyone=live, progress=progress)
    else:
        informed = _tell_cluster(s, info, live, None)
    return LaunchResult(s.info(), tuple(new), ready, injected, informed)


# -- inject -----------------------------------------------------------------------------


def prepare_release(path: str | Path, *, settings: Settings) -> Release:
    """Validate and pack ``path`` into the cluster's package store (no node is contacted)."""
    from . import package

    return package.build_release(path, ClusterPaths(settings.home, settings.cluster).packages)


def inject(
    path: str | Path,
    *,
    settings: Settings,
    nodes: str | None = None,
    progress: Progress = _quiet,
    only_failed: bool = False,
) -> GroupResult:
    """Send a package to the nodes, unpack it into its release folder, switch ``~/NAME`` to
    it and start its launch script. Refuses bad input before any node is contacted."""
    from . import package

    src = Path(path).expanduser()
    if not src.exists():
        raise ConfigError(f"{path}: no such folder or file")
    if src.is_dir():
        package.find_launcher(src)
    else:
        package.inspect_archive(src)
    s = Session(settings)
    info = s.existing()
    targets = s.select(info, nodes, "inject" if only_failed else None)
    release = prepare_release(src, settings=settings)
    s.pm.hook.vtool_before_inject(cluster=info, nodes=tuple(targets), release=release, settings=settings)
    previous = s.cache.release()
    s.cache.set_release(release)
    package.prune_store(
        s.paths.packages, release.name, also=(release.dirname,) + ((previous.dirname,) if previous else ())
    )
    progress(f"injecting {release.dirname} into {len(targets)} node(s)")
    live = [x for x in info.nodes if x.state == "running"]
    return s.record(
        "inject",
        _inject_release(
            s,
            info,
            release,
            targets=targets,
            everyone=live,
            progress=progress,
            before_hook_done=True,
            tell_others=False,
        ),
    )


def _node_env(s: Session, info: ClusterInfo, node: Node) -> dict[str, str]:
    env: dict[str, str] = {}
    for answer in s.pm.hook.vtool_node_env(cluster=info, node=node, settings=s.settings):
        for key, value in (answer or {}).items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)):
                raise PluginError(f"vtool_node_env returned an invalid variable name {key!r}")
            env[str(key)] = str(value)
    return env


def _trust(s: Session, everyone: Sequence[Node]) -> tuple[tuple[str, str, str], bytes]:
    """What prepare writes so the nodes can reach each other: (public key, known_hosts,
    ssh_config) and the private key (sent on stdin)."""
    key = ensure_relay_key(s.paths)
    pub = s.paths.relay_pubkey.read_text().strip()
    aliases = {x.host_key_alias for x in everyone}
    try:
        pinned = s.paths.known_hosts.read_text().splitlines()
    except FileNotFoundError:
        pinned = []
    known = "".join(f"{line}\n" for line in pinned if line.split(" ", 1)[0] in aliases)
    address: dict[int, tuple[str, int]] = {}
    for x in everyone:
        answer = s.pm.hook.vtool_peer_address(node=x, settings=s.settings)
        if answer:
            address[x.index] = (str(answer[0]), int(answer[1]))
    config = remote.node_ssh_config(everyone, s.settings.ssh.kex, s.settings.ssh.ciphers, address)
    return (pub, known, config), key.read_bytes()


def _tell_cluster(
    s: Session,
    info: ClusterInfo,
    nodes: Sequence[Node],
    release: Release | None,
    everyone: Sequence[Node] = (),
    *,
    trusted: tuple[tuple[str, str, str], bytes] | None = None,
    before: Callable[[Node], None] | None = None,
    warm: Mapping[str, Sequence[str]] | None = None,
) -> GroupResult:
    """Write cluster.env/hosts/other_hosts and the nodes' SSH set-up on ``nodes``; with a
    release, each result's value is ``have`` (``have kept``: it can pass the package on) or
    ``need BASE`` for it. ``trusted``: what ``_trust`` gave (computed here if not);
    ``before(node)`` runs first on each node; ``warm``: by node name, the nodes it will
    likely pass the package on to (``remote.prepare``)."""
    everyone = everyone or [x for x in info.nodes if x.state == "running"]
    trust, secret = trusted or _trust(s, everyone)

    def op(node: Node) -> str:
        if before is not None:
            before(node)
        cmd = remote.prepare(
            s.cluster, node, everyone, _node_env(s, info, node), release, trust, (warm or {}).get(node.name, ())
        )
        r = s.client(node).run(cmd, input=secret, timeout=s.settings.timeout.transfer or None, check=True)
        return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""

    return s.fan_out(nodes, op)


RELAY_MIN_BYTES = 1_000_000  # payloads smaller than this are never relayed


def _relays(s: Session, size: int, count: int) -> bool:
    """Whether a payload of ``size`` bytes for ``count`` nodes is sent once and passed on by
    the nodes (else the client sends it to each)."""
    at = s.settings.inject_relay
    return bool(at) and size >= RELAY_MIN_BYTES and count >= at


@dataclass(frozen=True)
class _Payload:
    path: Path  # on the client
    name: str  # as kept in ~/.vtool/packages on the nodes
    install: str  # the node command that keeps it and unpacks it from stdin (sent directly)
    size: int  # of the kept copy
    unpack: str  # the node command that unpacks the kept copy (relayed: received first, passed on, then this)
    sent: int = 0  # bytes the client sends (the file at path); 0: size
    inflate: str = ""  # the compression of what the client sends, undone by the node that receives it

    @property
    def sent_size(self) -> int:
        return self.sent or self.size


def _full_payload(release: Release, zstd: bool = False) -> _Payload:
    """The whole package. With ``zstd`` (this machine and every node receiving it have zstd)
    its zstd copy, kept so on the nodes. Else the client sends its archive as it is (gzip);
    the nodes keep it as a plain tar (the first decompresses it), so that only one node in a
    relay spends the CPU to decompress it: measured on 32 local nodes, gunzip on every node
    was a third of an inject's CPU. The plain copy also unpacks ~4x faster."""
    from . import package

    made = package.zstd_archive(release) if zstd else None
    if made is not None:
        size = made.stat().st_size
        return _Payload(
            made,
            made.name,
            remote.install(release, made.name, size, compression="zst"),
            size,
            remote.install(release, made.name, size, compression="zst", kept=True),
        )
    path = Path(release.archive)
    name = release.payload()
    inflate = "" if release.compression == "none" else release.compression
    size = package.plain_size(release)
    return _Payload(
        path,
        name,
        remote.install(release, name, size, compression="none", inflate=inflate),
        size,
        remote.install(release, name, size, compression="none", kept=True),
        sent=path.stat().st_size,
        inflate=inflate,
    )


def _delta_payload(release: Release, base: str) -> _Payload | None:
    """A delta from release folder ``base`` when vtool packed both and it is clearly smaller."""
    from . import package

    made = package.write_delta(release, base)
    if made is None:
        return None
    path = made
    size = path.stat().st_size
    if size > 0.7 * Path(release.archive).stat().st_size:
        return None
    return _Payload(
        path,
        path.name,
        remote.install(release, path.name, size, base=base, compression="gz"),
        size,
        remote.install(release, path.name, size, base=base, compression="gz", kept=True),
    )


def _send_payload(
    s: Session,
    nodes: Sequence[Node],
    payload: _Payload,
    *,
    holders: Sequence[Node] = (),
    progress: Progress,
    what: str,
) -> dict[int, str | VtoolError]:
    """``distribute`` wired to SSH. Sent directly, a node keeps and unpacks the payload in one
    pass (``install``). Relayed, every node first only keeps it (``receive``), so it can pass
    it on at once, and all unpack at the end in parallel: unpacking is then off the relay's
    critical path."""
    from .distribute import BaseChanged, HolderLost, distribute

    timeout = s.settings.timeout.transfer or None
    count = {"done": 0}
    # A small payload (a delta, a script) goes straight to each node over the connections
    # vtool already has: a relay round would cost more than the bytes it saves.
    relay_min = s.settings.inject_relay if payload.sent_size >= RELAY_MIN_BYTES else 0
    relaying = _relays(s, payload.sent_size, len(nodes))
    # From the client: compressed (the node decompresses it); from a node: as kept.
    transfer = remote.receive(payload.name, payload.size, payload.inflate) if relaying else payload.install
    passed_on = remote.receive(payload.name, payload.size)

    def check(r: CommandResult, where: str) -> None:
        if r.exit_code == remote.BASE_CHANGED:
            raise BaseChanged("the release it had was changed on the node")
        if r.exit_code != 0:
            last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.exit_code}"
            raise NodeError(f"unpacking failed{where}: {last}")

    def send(node: Node) -> str:
        with open(payload.path, "rb") as f:
            r = s.client(node).run(transfer, input=f, timeout=timeout)
        check(r, "")
        return "direct"

    def relay(holder: Node, target: Node) -> str:
        try:
            r = s.client(holder).run(remote.relay(target, payload.name, payload.size, passed_on), timeout=timeout)
        except NodeError as e:
            raise HolderLost(f"node {holder.index}, passing the package on, failed: {e}") from None
        if r.exit_code == remote.RELAY_NO_PAYLOAD:
            raise HolderLost(f"node {holder.index} no longer has the package")
        if r.exit_code == remote.RELAY_UNREACHABLE:
            last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "SSH failed"
            raise NodeError(f"node {holder.index} could not reach it: {last}")
        check(r, f" (sent by node {holder.index})")
        return "relay"

    def done(index: int, error: VtoolError | None) -> None:
        count["done"] += 1
        verb = "received" if relaying else "on"
        progress(
            f"inject: {what} {verb} {count['done']}/{len(nodes)} node(s)" + (f" (node {index} failed)" if error else "")
        )

    out: dict[int, str | VtoolError] = {}
    unpacked_by_fan: dict[int, int] = {}  # node index -> the exit code of its unpack
    rest = list(nodes)
    if relaying:
        progress(f"inject: sending {what} ({_size(payload.sent_size)}) once; the nodes pass it on")
        if not holders and all(_PLAIN.fullmatch(x) for x in [payload.name, *(n.name for n in nodes)]):
            progress(f"inject: passing it on through a tree of {len(nodes)} nodes")
            out, unpacked_by_fan, kept = _broadcast(s, nodes, payload, timeout, done, progress)
            rest = [x for x in nodes if x.index not in out]
            if rest:
                progress(f"inject: {len(rest)} node(s) did not get it through the tree; sending it to them again")
            holders = [x for x in nodes if x.index in kept]  # (only nodes whose copy is complete say so)
            if rest and not holders:  # the first node failed: another one is tried first
                rest = rest[1:] + rest[:1]
    if rest:
        out.update(
            distribute(
                rest,
                send=send,
                relay=relay,
                relay_min=1 if relaying and holders else relay_min,
                concurrency=s.settings.concurrency,
                holders=holders,
                on_done=done,
            )
        )
    if not relaying:
        return out

    def unpack(node: Node) -> str:
        try:
            check(s.client(node).run(payload.unpack, timeout=timeout), "")
        except BaseChanged:
            return "base changed"
        return str(out[node.index])

    for index, code in unpacked_by_fan.items():
        try:
            check(CommandResult(code, "", ""), "")
        except VtoolError as e:  # BaseChanged included: the caller sends those the whole package
            out[index] = e
    got = [x for x in nodes if isinstance(out.get(x.index), str) and x.index not in unpacked_by_fan]
    if not got:
        return out
    unpacked_count = {"done": 0}

    def unpacked_one(r: NodeResult) -> None:
        unpacked_count["done"] += 1
        progress(
            f"inject: unpacked on {unpacked_count['done']}/{len(got)} node(s)"
            + ("" if r.ok else f" (node {r.index} failed)")
        )

    unpacked = s.fan_out(got, unpack, on_done=unpacked_one)
    for r in unpacked.results:
        if not r.ok:
            out[r.index] = NodeError(r.error or "unpacking failed")
        elif r.value == "base changed":
            out[r.index] = BaseChanged("the release it had was changed on the node")
    return out


_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")


def _broadcast(
    s: Session,
    nodes: Sequence[Node],
    payload: _Payload,
    timeout: float | None,
    done: Callable[[int, VtoolError | None], None],
    on_unpacked: Progress = _quiet,
) -> tuple[dict[int, str | VtoolError], dict[int, int], set[int]]:
    """Stream the payload to the first node, which keeps it and passes it on through the
    others as it arrives (``remote.FAN``, a pipelined tree), and each unpacks it (a plain tar
    as it comes, without keeping it).
    Returns the nodes whose copy is complete ("direct" for the first, "relay" for the
    others), the exit codes of the installs that ran and the nodes that kept the payload
    (they can pass it on later); any other node is left to ``distribute`` (and to the
    unpack phase), whatever went wrong on the way."""
    first = nodes[0]
    by_name = {x.name: x for x in nodes}
    got: dict[int, str | VtoolError] = {}
    unpacked: dict[int, int] = {}
    kept: set[int] = set()
    lock = threading.Lock()

    def line(stream: str, text: str) -> None:
        words = text.split()
        if stream != "out" or len(words) < 2 or words[1] not in by_name:
            return
        node = by_name[words[1]]
        if words[0] == "vtool-unpacked" and len(words) == 3 and words[2].isdigit():
            with lock:
                if node.index not in got or node.index in unpacked:
                    return
                unpacked[node.index] = int(words[2])
                count = len(unpacked)
            failed = "" if words[2] == "0" else f" (node {node.index} failed)"
            on_unpacked(f"inject: unpacked on {count}/{len(nodes)} node(s){failed}")
        elif words[0] == "vtool-got" and words[2:] in ([], ["kept"]):
            with lock:
                if node.index in got:
                    return
                got[node.index] = "direct" if node is first else "relay"
                if words[2:]:
                    kept.add(node.index)
            done(node.index, None)

    command = remote.fan(
        first.name, payload.name, payload.size, [x.name for x in nodes[1:]], payload.unpack, payload.inflate
    )
    try:
        with open(payload.path, "rb") as f:
            s.client(first).run(command, input=f, timeout=timeout, on_line=line)
    except VtoolError:
        pass  # whatever arrived is counted; the rest goes through distribute
    return got, unpacked, kept


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _inject_release(
    s: Session,
    info: ClusterInfo,
    release: Release,
    *,
    targets: Sequence[Node],
    everyone: Sequence[Node],
    progress: Progress,
    before_hook_done: bool = False,
    tell_others: bool = True,
) -> GroupResult:
    """Check which targets need ``release`` (and which release they have), send each group
    the smallest payload (nothing, a delta, or the package) through ``distribute``, then
    switch ``~/NAME`` and start the launch script on every target that has it."""
    from . import package
    from .distribute import BaseChanged

    target_ids = {x.index for x in targets}
    if not before_hook_done:
        s.pm.hook.vtool_before_inject(cluster=info, nodes=tuple(targets), release=release, settings=s.settings)
    others = [x for x in everyone if x.index not in target_ids]
    trusted = _trust(s, everyone)
    holders: list[Node] = []
    if others and tell_others:  # after a launch: the cluster changed (and they may pass the package on)
        told = _tell_cluster(s, info, others, release, everyone, trusted=trusted)
        holders = [info.node(r.index) for r in told.succeeded if str(r.value).split() == ["have", "kept"]]
    timeout = s.settings.timeout.transfer or None
    ready_by = time.monotonic() + s.settings.timeout.ready
    pinned = pinned_aliases(s.paths)

    def ready(node: Node) -> None:
        if node.state not in ("running", "pending"):
            raise NodeError(f"node is {node.state}")
        if node.host_key_alias not in pinned:  # launched with --no-wait
            wait_ready(s, node, ready_by)

    # If every target needs the whole package, it streams through this tree (``_broadcast``):
    # the nodes connect to the ones they will pass it on to while the others are prepared.
    tree = None
    if not holders and _relays(s, Path(release.archive).stat().st_size, len(targets)):
        tree = remote.fan_children([x.name for x in targets])
    checked = _tell_cluster(s, info, targets, release, everyone, trusted=trusted, before=ready, warm=tree)
    failed: dict[int, NodeResult] = {r.index: r for r in checked.failed}
    how: dict[int, str] = {}
    by_base: dict[str, list[Node]] = {}
    zstd: set[int] = set()  # the nodes that have zstd
    for r in checked.succeeded:
        words = str(r.value).split()
        if words[:1] == ["have"]:
            how[r.index] = "there"
        else:
            base = words[1] if len(words) > 1 else "-"
            by_base.setdefault(base, []).append(info.node(r.index))
            if "zstd" in words[2:]:
                zstd.add(r.index)

    def collect(outcome: dict[int, str | VtoolError], prefix: str, retry: list[Node]) -> None:
        for index, v in outcome.items():
            if isinstance(v, BaseChanged):
                retry.append(info.node(index))
            elif isinstance(v, VtoolError):
                failed[index] = NodeResult(index, False, error=str(v))
            else:
                how[index] = prefix + v

    whole = by_base.pop("-", [])
    for base, group in sorted(by_base.items()):
        delta = _delta_payload(release, base)
        if delta is None:
            whole += group
            continue
        collect(_send_payload(s, group, delta, progress=progress, what=f"the changes since {base}"), "delta ", whole)
    if whole:
        use_zstd = s.settings.inject_zstd and release.compression != "none" and all(x.index in zstd for x in whole)
        if use_zstd and not package.zstd_path(release).exists():
            progress("inject: making a zstd copy of the package (once per release)")
        full = _full_payload(release, use_zstd)
        collect(_send_payload(s, whole, full, holders=holders, progress=progress, what=release.dirname), "", [])

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())

    def start(node: Node) -> dict[str, Any]:
        command = s.pm.hook.vtool_launch_command(cluster=info, node=node, release=release, settings=s.settings)
        command = command or f"./{release.launcher}"
        r = s.client(node).run(remote.start(release, command, s.settings.inject_screen, stamp), timeout=timeout)
        if r.exit_code != 0:
            raise NodeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"start failed ({r.exit_code})")
        mode = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        return {"sent": how[node.index] != "there", "how": how[node.index], "mode": mode}

    started = s.fan_out([x for x in targets if x.index in how], start)
    merged = {r.index: r for r in started.results}
    merged.update(failed)
    results = GroupResult(tuple(merged[i] for i in sorted(merged)))
    s.pm.hook.vtool_after_inject(
        cluster=info, nodes=tuple(targets), release=release, results=results, settings=s.settings
    )
    return results


def mkpkg(folder: str | Path, output: str | Path | None = None) -> Path:
    """Write the package archive ``inject`` would send (vcloud's mkpkg)."""
    from . import package

    return package.make_package(folder, output)


# -- run, logs --------------------------------------------------------------------------


def run(
    command: str,
    *,
    settings: Settings,
    nodes: str | None = None,
    on_line: LineSink | None = None,
    only_failed: bool = False,
) -> GroupResult:
    """Run a shell command on the nodes in parallel; a result (exit code) per node.

    Connection failures are retried; the command's own non-zero exit never is."""
    if not command or not command.strip():
        raise UsageError("run needs a command, e.g. vtool run 'hostname'")
    s = Session(settings)
    info = s.existing()
    targets = s.select(info, nodes, "run" if only_failed else None)

    def op(node: Node) -> CommandResult:
        sink = (lambda stream, line: on_line(node.index, stream, line)) if on_line else None
        return s.client(node).run(
            remote.supervised(command),
            timeout=settings.timeout.command or None,
            on_line=sink,
            supervision=remote.SUPERVISION,
        )

    return s.record("run", s.fan_out(targets, op))


def logs(
    *,
    settings: Settings,
    nodes: str | None = None,
    follow: bool = False,
    lines: int | None = None,
    on_line: LineSink | None = None,
) -> GroupResult:
    """The launch scripts' output from the nodes; with ``follow``, until interrupted."""
    s = Session(settings)
    info = s.existing()
    targets = s.select(info, nodes)
    cmd = remote.logs(follow, lines)
    if follow:  # every node's stream stays open: one worker each
        s.settings = settings.replace(concurrency=max(settings.concurrency, len(targets)))

    def op(node: Node) -> CommandResult:
        sink = (lambda stream, line: on_line(node.index, stream, line)) if on_line else None
        r = s.client(node).run(cmd, on_line=sink)
        if r.exit_code == 3:
            raise NodeError(r.stderr.strip() or "no log")
        return r

    return s.fan_out(targets, op)


# -- transfers --------------------------------------------------------------------------


def _local_target(remote_path: str, local: str | None, suffix: str | None) -> Path:
    base = Path(remote_path.rstrip("/")).name
    if base in ("", ".", ".."):
        raise UsageError(f"cannot name a local file after {remote_path!r}: give a local path")
    if local is None:
        dest = Path(base)
    else:
        dest = Path(local).expanduser()
        if dest.is_dir() or local.endswith("/"):
            dest = dest / base
    if suffix is not None:
        dest = dest.with_name(f"{dest.name}.{suffix}")
    return dest


def _check_remote(remote_path: str) -> str:
    if not remote_path or "\0" in remote_path:
        raise UsageError("give the remote file's path (relative to the node's home folder)")
    return remote_path


def _fetch(s: Session, node: Node, remote_path: str, dest: Path, recursive: bool) -> FetchReport:
    from .fetch import NothingSent, extract_stream

    client = s.client(node)
    stream = client.popen_stdout(remote.fetch(remote_path, recursive))
    limit = s.settings.timeout.transfer
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        stream.proc.kill()

    timer = threading.Timer(limit, expire) if limit else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    report = None
    error: VtoolError | None = None
    try:
        try:
            report = extract_stream(stream.stdout, dest, recursive=recursive)
        except VtoolError as e:
            error = e
        except OSError as e:  # the local side: a full disk, too many files, a name in the way
            error = NodeError(f"cannot write {dest}: {e.strerror or e}")
    except BaseException:
        client.finish_stream(stream, abort=True)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    # (a node that sent nothing has closed its output: its exit status, which killing its
    # client could lose, says why, e.g. "use -r")
    result = client.finish_stream(stream, abort=error is not None and not isinstance(error, NothingSent))
    if timed_out.is_set():
        raise NodeError(f"timed out after {limit:g}s")
    if result.exit_code in (44, 45):
        raise NodeError(result.stderr.strip().splitlines()[-1])
    if error is not None:
        raise error
    if result.exit_code != 0:
        raise NodeError(
            result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"tar exited {result.exit_code}"
        )
    assert report is not None
    return report


def _one(s: Session, info: ClusterInfo, index: int | str) -> Node:
    """Exactly one node, by index."""
    if not str(index).strip().isdigit():
        raise UsageError(f"give one node index, not {str(index)!r}")
    return s.select(info, str(index).strip())[0]


def get(
    remote_path: str, local: str | None = None, *, settings: Settings, node: int | str = 0, recursive: bool = False
) -> FetchReport:
    """Fetch a file (or, with ``recursive``, a folder) from one node (vcloud's scpget)."""
    _check_remote(remote_path)
    s = Session(settings)
    info = s.existing()
    target = _one(s, info, node)
    dest = _local_target(remote_path, local, None)
    return _fetch(s, target, remote_path, dest, recursive)


def get_all(
    remote_path: str,
    local: str | None = None,
    *,
    settings: Settings,
    nodes: str | None = None,
    recursive: bool = False,
    on_done: Callable[[NodeResult], None] | None = None,
    only_failed: bool = False,
) -> GroupResult:
    """Fetch from every node in parallel into ``LOCAL.0``, ``LOCAL.1`` ... by stable index."""
    _check_remote(remote_path)
    s = Session(settings)
    info = s.existing()
    targets = s.select(info, nodes, "scpgetall" if only_failed else None)
    _local_target(remote_path, local, "0")  # validate before any node is contacted
    return s.record(
        "scpgetall",
        s.fan_out(
            targets,
            lambda n: _fetch(s, n, remote_path, _local_target(remote_path, local, str(n.index)), recursive),
            on_done,
        ),
    )


def _pack_upload(local: Path) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        # The file or folder the argument names, not a symlink to it (links inside stay links).
        tar.add(str(local.resolve()), arcname="x", recursive=True)
    return buf.getvalue()


def put(local: str, remote_path: str, *, settings: Settings, nodes: str | None = None) -> GroupResult:
    """Copy a local file or folder to the nodes (atomically replaced on each)."""
    src = Path(local).expanduser()
    if not src.exists():
        raise ConfigError(f"{local}: no such file or folder")
    _check_remote(remote_path)
    s = Session(settings)
    info = s.existing()
    targets = s.select(info, nodes)
    payload = _pack_upload(src)
    cmd = remote.put(remote_path, src.resolve().name, src.is_dir())

    def op(node: Node) -> str:
        r = s.client(node).run(cmd, input=payload, timeout=settings.timeout.transfer or None)
        if r.exit_code != 0:
            raise NodeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.exit_code}")
        return r.stdout.strip()

    return s.fan_out(targets, op)


# -- status, connect --------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterStatus:
    name: str
    provider: str
    release: str | None
    nodes: tuple[NodeStatus, ...]


def status(*, settings: Settings, all_clusters: bool = True) -> list[ClusterStatus]:
    """Every cluster (or just ``settings.cluster``) with each node's state and launch script."""
    pm = plugins.get()
    prov = provider_for(settings, pm, settings.provider)
    names = (
        sorted(set(prov.clusters()) | set(list_cluster_names(settings.home))) if all_clusters else [settings.cluster]
    )
    out = []
    for name in names:
        s = Session(settings.replace(cluster=name), pm)
        s._provider = prov
        info = s.info()
        if not info.nodes and all_clusters:
            continue
        if not info.nodes and not all_clusters:
            s.existing()

        def probe(node: Node, s: Session = s) -> NodeStatus:
            if node.state != "running":
                return NodeStatus(node, False, error=f"node is {node.state}")
            # One quick try: status reports an unreachable node rather than waiting for it.
            r = s.client(node).run(remote.STATUS, timeout=max(5.0, settings.timeout.connect + 5), retries=0)
            words = (r.stdout.strip().splitlines() or ["unknown"])[-1].split()
            state = words[0] if words else "unknown"
            code = int(words[1]) if state == "exited" and len(words) > 1 and words[1].lstrip("-").isdigit() else None
            rel = words[2] if len(words) > 2 else None
            return NodeStatus(node, True, release=rel, launch_state=state, launch_exit=code)

        res = s.fan_out(list(info.nodes), probe)
        rows = tuple(r.value if r.ok else NodeStatus(info.node(r.index), False, error=r.error) for r in res.results)
        out.append(ClusterStatus(name, info.provider, info.release.dirname if info.release else None, rows))
    return out


def ssh_argv(index: int | str = 0, *, settings: Settings, command: str | None = None) -> list[str]:
    """The OpenSSH command line for an interactive shell on one node (``connect``)."""
    s = Session(settings)
    info = s.existing()
    node = _one(s, info, index)
    if node.state != "running":
        raise NodeNotFound(f"node {node.index} of cluster {s.cluster!r} is {node.state}")
    return s.client(node).argv(command, tty=True)


def ssh_config(*, settings: Settings) -> str:
    """OpenSSH config blocks for every node: ``ssh -F FILE <cluster>-<index>``."""
    s = Session(settings)
    info = s.existing()
    blocks = []
    for node in info.nodes:
        target = s.client(node).target
        blocks.append(ssh_config_block(node.name, target))
    return "\n".join(blocks)


def connection(index: int = 0, *, settings: Settings) -> Any:
    """A ``fabric.Connection`` to one node, verifying its pinned host key (for your own tasks)."""
    import paramiko
    from fabric import Connection

    s = Session(settings)
    node = s.select(s.existing(), str(index))[0]
    target = s.client(node).target
    if target.proxy_jump:
        raise ConfigError(
            f"node {node.index} is reached through a gateway ({target.proxy_jump}); connection() does not "
            "support gateways yet: use `vtool run` or ssh_argv()"
        )
    conn = Connection(
        host=target.host,
        port=target.port,
        user=target.user,
        connect_kwargs={"key_filename": target.key_file, "look_for_keys": False, "allow_agent": False},
    )
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    keys = paramiko.HostKeys(target.known_hosts)
    for keytype, key in (keys.lookup(target.host_key_alias) or {}).items():
        conn.client.get_host_keys().add(f"[{target.host}]:{target.port}", keytype, key)
    return conn


# -- terminate --------------------------------------------------------------------------


def terminate(*, settings: Settings, nodes: str | None = None, progress: Progress = _quiet) -> GroupResult:
    """Destroy the cluster's nodes (or those in ``nodes``) and everything they run. Idempotent."""
    s = Session(settings)
    info = s.info()
    if not info.nodes:
        if nodes is not None:
            s.existing()
        return GroupResult(())
    targets = s.select(info, nodes)

    def hook_remote(index: int, command: str) -> CommandResult:
        return s.client(info.node(index)).run(command)

    try:
        s.pm.hook.vtool_before_terminate(cluster=info, nodes=tuple(targets), settings=settings, remote=hook_remote)
    except Exception as e:  # reported, never blocks the tear-down
        progress(f"warning: a before-terminate hook failed: {e}")
    for node in targets:
        s.client(node).close()  # also for a dead node: its shared connection may still be open
    results = GroupResult(tuple(s.provider.terminate(s.cluster, targets, progress)))
    left = s.provider.nodes(s.cluster)
    if not left:
        s.provider.forget(s.cluster)
        import shutil

        shutil.rmtree(s.paths.root, ignore_errors=True)  # key, known_hosts, cached releases
    elif nodes is not None:
        _tell_cluster(s, s.info(), [x for x in left if x.state == "running"], None)
    return results


def stop(*, settings: Settings, nodes: str | None = None, progress: Progress = _quiet) -> GroupResult:
    """Stop the nodes but keep their disks: no compute to pay for; ``start`` brings them back."""
    s = Session(settings)
    targets = s.select(s.existing(), nodes)
    for node in targets:
        s.client(node).close()
    return GroupResult(tuple(s.provider.stop(s.cluster, targets, progress)))


def start(*, settings: Settings, nodes: str | None = None, progress: Progress = _quiet) -> GroupResult:
    """Start stopped nodes, wait until they accept SSH, and tell every node the (possibly new)
    addresses. Indices, tags and the injected release stay."""
    s = Session(settings)
    targets = s.select(s.existing(), nodes)
    started = GroupResult(tuple(s.provider.start(s.cluster, targets, progress)))
    ok = {r.index for r in started.succeeded}
    info = s.info()  # fresh addresses
    fresh = [n for n in info.nodes if n.index in ok]
    deadline = time.monotonic() + settings.timeout.ready
    s._clients.clear()
    ready = s.fan_out(fresh, lambda node: wait_ready(s, node, deadline))
    _tell_cluster(s, info, [n for n in info.nodes if n.state == "running"], None)
    failures = {r.index: r for r in [*started.failed, *ready.failed]}
    return GroupResult(tuple(failures.get(i, NodeResult(i, True)) for i in sorted({n.index for n in targets})))


def raise_for_failures(result: GroupResult, what: str) -> None:
    if result.failed:
        idx = ", ".join(str(r.index) for r in result.failed)
        raise PartialFailure(f"{what} failed on {len(result.failed)} of {len(result.results)} node(s): {idx}", result)


# -- an object API, as elasticluster had ------------------------------------------------


class Cluster:
    """A named cluster, for programs and notebooks. Every method returns dataclasses."""

    def __init__(self, name: str | None = None, *, profile: str | None = None, **overrides: Any) -> None:
        self.settings = settings(cluster=name, profile=profile, overrides=overrides or None)
        self.name = self.settings.cluster

    def launch(self, count: int = 1, **kw: Any) -> LaunchResult:
        return launch(count, settings=self.settings, **kw)

    def inject(self, path: str | Path, **kw: Any) -> GroupResult:
        return inject(path, settings=self.settings, **kw)

    def run(self, command: str, **kw: Any) -> GroupResult:
        return run(command, settings=self.settings, **kw)

    def get(self, remote_path: str, local: str | None = None, **kw: Any) -> FetchReport:
        return get(remote_path, local, settings=self.settings, **kw)

    def get_all(self, remote_path: str, local: str | None = None, **kw: Any) -> GroupResult:
        return get_all(remote_path, local, settings=self.settings, **kw)

    def put(self, local: str, remote_path: str, **kw: Any) -> GroupResult:
        return put(local, remote_path, settings=self.settings, **kw)

    def status(self) -> ClusterStatus | None:
        found = status(settings=self.settings, all_clusters=False)
        return found[0] if found else None

    def nodes(self) -> tuple[Node, ...]:
        return Session(self.settings).info().nodes

    def connection(self, index: int = 0) -> Any:
        return connection(index, settings=self.settings)

    def terminate(self, **kw: Any) -> GroupResult:
        return terminate(settings=self.settings, **kw)

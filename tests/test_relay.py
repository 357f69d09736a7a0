"""inject sends a package once and the nodes pass it on (relay); a changed package sends a
delta. The scheduler on its own (fake transfers), then real nodes, including nodes that die
in the middle of a relay."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import Env, close_shared_connections, make_package, stop_all_nodes, wait_for

from vtool import remote
from vtool.distribute import BaseChanged, HolderLost, distribute
from vtool.errors import NodeError, NodeUnreachable
from vtool.models import Node
from vtool.providers.local import LocalProvider
from vtool.ssh import q

# -- the scheduler, with fake transfers -----------------------------------------------------


def _nodes(n: int) -> list[Node]:
    return [Node("c", i, f"id{i}", "fake", "127.0.0.1", 22, "u", "127.0.0.1") for i in range(n)]


class Fake:
    """Records who sent to whom; ``dead`` nodes fail as a target, ``lost`` ones as a holder."""

    def __init__(self, dead: set[int] = frozenset(), lost: set[int] = frozenset(), broken_relay: bool = False):  # type: ignore[assignment]
        self.dead, self.lost, self.broken_relay = dead, lost, broken_relay
        self.sends: list[int] = []
        self.relays: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def send(self, node: Node) -> str:
        with self.lock:
            self.sends.append(node.index)
        if node.index in self.dead:
            raise NodeUnreachable("connection refused")
        return "direct"

    def relay(self, holder: Node, target: Node) -> str:
        with self.lock:
            self.relays.append((holder.index, target.index))
        if holder.index in self.lost:
            raise HolderLost("holder gone")
        if self.broken_relay or target.index in self.dead:
            raise NodeError("could not reach it")
        return "relay"


def _go(fake: Fake, n: int, relay_min: int = 4, concurrency: int = 8) -> dict[int, object]:
    return distribute(_nodes(n), send=fake.send, relay=fake.relay, relay_min=relay_min, concurrency=concurrency)


def test_the_client_sends_once_and_every_node_receives() -> None:
    fake = Fake()
    out = _go(fake, 40)
    assert fake.sends == [0]  # one upload from the client, whatever the size
    assert sorted(out) == list(range(40)) and all(v in ("direct", "relay") for v in out.values())
    assert sorted(t for _h, t in fake.relays) == list(range(1, 40))
    received = {0}
    for holder, target in fake.relays:  # nobody passes on what it does not have
        assert holder in received
        received.add(target)


def test_below_relay_min_the_client_sends_to_each() -> None:
    fake = Fake()
    out = _go(fake, 3, relay_min=4)
    assert sorted(fake.sends) == [0, 1, 2] and not fake.relays
    assert set(out.values()) == {"direct"}
    fake = Fake()
    _go(fake, 10, relay_min=0)  # 0: never relay
    assert sorted(fake.sends) == list(range(10)) and not fake.relays


def test_a_lost_holder_is_dropped_and_its_target_served_by_another() -> None:
    fake = Fake(lost={1})
    out = _go(fake, 12)
    assert all(isinstance(v, str) for v in out.values()), out  # everyone got it
    assert sum(1 for h, _t in fake.relays if h == 1) == 1  # used once, then never again


def test_a_dead_target_gets_one_direct_attempt_and_is_reported() -> None:
    fake = Fake(dead={5})
    out = _go(fake, 12)
    assert isinstance(out[5], NodeUnreachable)
    assert all(isinstance(v, str) for i, v in out.items() if i != 5)
    assert fake.sends.count(5) == 1 and fake.sends.count(0) == 1


def test_a_dead_seed_makes_the_client_seed_another_node() -> None:
    fake = Fake(dead={0})
    out = _go(fake, 8)
    assert isinstance(out[0], NodeUnreachable)
    assert fake.sends[:2] == [0, 1]
    assert all(isinstance(v, str) for i, v in out.items() if i != 0)


def test_when_relaying_fails_everywhere_the_client_sends_to_each() -> None:
    fake = Fake(broken_relay=True)
    out = _go(fake, 6)
    assert set(out.values()) == {"direct"} and sorted(fake.sends) == list(range(6))


def test_a_changed_base_is_reported_for_a_whole_resend() -> None:
    def relay(holder: Node, target: Node) -> str:
        if target.index == 2:
            raise BaseChanged("changed")
        return "relay"

    out = distribute(_nodes(6), send=lambda n: "direct", relay=relay, relay_min=4, concurrency=4)
    assert isinstance(out[2], BaseChanged) and sum(isinstance(v, str) for v in out.values()) == 5


# -- real nodes --------------------------------------------------------------------------


def _big_package(root: Path, name: str, mb: int, version: str) -> Path:
    pkg = make_package(root, name, "#!/bin/sh\ncat version.txt > \"$HOME/started-$(cat version.txt)\"\n",
                       {"version.txt": version})
    with open(pkg / "blob.bin", "wb") as f:
        f.write(os.urandom(mb << 20))
    return pkg


def _release_dir(env: Env, index: int, name: str) -> Path | None:
    link = env.node_home(index) / name
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def test_relayed_inject_sends_once_and_nodes_reach_each_other(venv: Env) -> None:
    venv.ok("launch", "6")
    pkg = make_package(venv.root, "hello", "#!/bin/sh\necho hi > \"$HOME/ran\"\n", {"data.txt": "x" * 5000})
    (pkg / "blob.bin").write_bytes(os.urandom(1_100_000))  # (under 1 MB, each node would get it directly)
    r = venv.ok("inject", str(pkg))
    assert r.stdout.count("package sent)") == 1, r.stdout
    assert r.stdout.count("package from another node)") == 5, r.stdout
    assert "once; the nodes pass it on" in r.stderr
    assert "through a tree of 6 nodes" in r.stderr and "did not get it through the tree" not in r.stderr, r.stderr
    for i in range(6):
        assert (_release_dir(venv, i, "hello") / "data.txt").read_text() == "x" * 5000  # type: ignore[operator]
        wait_for((venv.node_home(i) / "ran").exists)
    # The nodes reach each other with the cluster's internal key, host keys checked.
    r = venv.ok("run", "ssh -F ~/.vtool/ssh_config default-4 'echo from; pwd'", "--nodes", "1")
    assert f"{venv.node_home(4)}" in r.stdout
    # The client's own key never leaves the client.
    client_key = (venv.vhome / "clusters" / "default" / "id_ed25519").read_text()
    for i in range(6):
        assert (venv.node_home(i) / ".vtool" / "relay_key").read_text() != client_key
        assert stat.S_IMODE((venv.node_home(i) / ".vtool" / "relay_key").stat().st_mode) == 0o600
    # Unchanged: nothing sent again.
    r = venv.ok("inject", str(pkg))
    assert r.stdout.count("package already there)") == 6


def test_the_nodes_connect_ahead_to_the_ones_they_pass_the_package_on_to(venv: Env, tmp_path: Path) -> None:
    """While vtool prepares the nodes, each opens a shared SSH connection to the nodes it
    will pass the package on to (remote.fan_children), and the transfer goes through it. (A
    Unix socket name is short: a short VTOOL_HOME keeps the node paths short enough for it.)"""
    short = Path(tempfile.mkdtemp(prefix="vt", dir="/tmp"))
    long_home = venv.vhome
    try:
        venv.vhome = short
        venv.env["VTOOL_HOME"] = str(short)
        venv.ok("launch", "6")
        pkg = make_package(venv.root, "hello", "#!/bin/sh\ntrue\n", {"data.txt": "x"})
        (pkg / "blob.bin").write_bytes(os.urandom(1_100_000))
        r = venv.ok("inject", str(pkg))
        assert r.stdout.count("package from another node)") == 5, r.stdout
        tree = {"0": ["1", "2"], "1": ["3", "5"], "2": ["4"]}  # remote.fan_children over 6 nodes
        assert remote.fan_children([f"default-{i}" for i in range(6)]) == {
            **{f"default-{k}": [f"default-{x}" for x in v] for k, v in tree.items()},
            **{f"default-{k}": [] for k in ("3", "4", "5")},
        }
        for parent, kids in tree.items():
            cm = venv.node_home(int(parent)) / ".vtool" / "cm"
            assert sorted(p.name for p in cm.iterdir() if p.is_socket()) == [f"default-{k}" for k in kids]
        # The users' own SSH between nodes (MPI) goes through them too.
        r = venv.ok("run", "ssh -F ~/.vtool/ssh_config -O check default-4 2>&1; echo rc=$?", "--nodes", "2")
        assert "Master running" in r.stdout and "rc=0" in r.stdout, r.stdout
    finally:
        survivors = stop_all_nodes(short)  # the nodes' shared connections included
        venv.vhome = long_home
        venv.env["VTOOL_HOME"] = str(long_home)
        shutil.rmtree(short, ignore_errors=True)
        assert not survivors, survivors


def _kept(env: Env, index: int) -> list[Path]:
    return sorted((env.node_home(index) / ".vtool" / "packages").iterdir())


def _sent_by_the_client(stdout: str, index: int) -> bool:
    """Whether inject's output says node ``index`` got the package from the client (the first
    node of a tree, or any node the package went to directly)."""
    return any(
        line.startswith(f"node {index}: started") and line.endswith("package sent)") for line in stdout.splitlines()
    )


def test_a_compressed_package_is_decompressed_by_one_node_and_kept_plain(venv: Env) -> None:
    """The client sends its .tar.gz once; only the node that receives it from the client
    decompresses it, and passes on the plain tar. Sent directly (2 nodes, under
    ``inject.relay``) the nodes keep it plain, checked by size, so a later launch can have
    them pass it on to the new nodes (which keep it too). Through the tree, only its first
    node keeps it: the others unpack it as it arrives and write it once. (Without zstd:
    with it, see below.)"""
    venv.env["VTOOL_INJECT_ZSTD"] = "false"
    venv.ok("launch", "2")
    pkg = make_package(venv.root, "texty", "#!/bin/sh\ntrue\n", {"data.txt": os.urandom(1_500_000).hex()})
    r = venv.ok("inject", str(pkg))
    assert r.stdout.count("package sent)") == 2 and "pass it on" not in r.stderr, r.stdout + r.stderr
    store = venv.vhome / "clusters" / "default" / "packages"
    (archive,) = store.glob("texty-*.tar.gz")  # gzip pays here: hex text
    dirname = archive.name[: -len(".tar.gz")]
    plain = int((store / f"{dirname}.tar-size").read_text())
    with tarfile.open(archive) as t:
        members = t.getnames()
    assert plain > 1.5 * archive.stat().st_size

    def check(index: int, keeps: bool = True) -> None:
        if keeps:
            (kept,) = _kept(venv, index)
            assert kept.name == f"{dirname}.tar" and kept.stat().st_size == plain, (index, kept)
            with tarfile.open(kept, "r:") as t:  # plain: "r:" refuses a compressed file
                assert t.getnames() == members
        else:
            assert _kept(venv, index) == [], index
        got = _release_dir(venv, index, "texty")
        assert got is not None and (got / "data.txt").read_text() == (pkg / "data.txt").read_text()

    for i in range(2):
        check(i)
    # Four nodes more: they get it (the two that have it may pass on what they kept).
    r = venv.ok("launch", "4")
    assert "received 4/4 node(s)" in r.stderr and "FAILED" not in r.stdout + r.stderr, r.stderr
    for i in range(6):
        check(i)
    # A new version into all six: through the tree, fed with the .tar.gz.
    (pkg / "data.txt").write_text(os.urandom(1_500_000).hex())
    r = venv.ok("inject", str(pkg))
    assert "through a tree of 6 nodes" in r.stderr and "did not get it through the tree" not in r.stderr, r.stderr
    assert r.stdout.count("package from another node)") == 5, r.stdout
    (archive,) = [a for a in store.glob("texty-????????????.tar.gz") if not a.name.startswith(dirname)]
    dirname = archive.name[: -len(".tar.gz")]
    plain = int((store / f"{dirname}.tar-size").read_text())
    with tarfile.open(archive) as t:
        members = t.getnames()
    for i in range(6):
        check(i, keeps=_sent_by_the_client(r.stdout, i))
    # Four nodes more: they still get it (only the node that kept it can pass it on: the next test).
    r = venv.ok("launch", "4")
    assert "received 4/4 node(s)" in r.stderr and "FAILED" not in r.stdout + r.stderr, r.stderr
    for i in range(6, 10):
        check(i)


def test_a_node_says_whether_it_keeps_the_package_of_the_release_it_has(tmp_path: Path) -> None:
    """``prepare`` prints ``have kept`` only when the node keeps the release's package (plain
    or zstd), so that only such nodes are asked to pass it on; ``have`` when it has only the
    release (a node that got it through the tree), or a delta of it."""
    import subprocess

    from vtool.models import Node, Release

    release = Release("proj", "0123456789ab", "gz", str(tmp_path / "proj.tar.gz"))
    node = Node(
        cluster="c", index=0, id="n0", provider="local", address="127.0.0.1", port=22, user="u",
        private_address="127.0.0.1", state="running", launched_at=0.0,
    )
    home = tmp_path / "home"
    (home / ".vtool" / "releases" / release.dirname).mkdir(parents=True)
    packages = home / ".vtool" / "packages"
    packages.mkdir()
    script = remote.prepare("c", node, [node], {}, release)

    def says() -> str:
        r = subprocess.run(["/bin/sh", "-c", script], env={"HOME": str(home), "PATH": os.environ["PATH"]},
                           capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().splitlines()[-1]

    assert says() == "have"
    (packages / f"{release.dirname}.from-proj-ba9876543210.tar.gz").write_bytes(b"delta")
    assert says() == "have"
    for name in (f"{release.dirname}.tar", f"{release.dirname}.tar.zst"):
        (packages / name).write_bytes(b"package")
        assert says() == "have kept", name
        (packages / name).unlink()
    shutil.rmtree(home / ".vtool" / "releases" / release.dirname)
    assert says().startswith("need ")


def test_with_zstd_the_package_travels_and_stays_zstd_compressed(venv: Env) -> None:
    """When this machine and every node receiving it have zstd (scripts/bootstrap.sh
    installs it), vtool makes a zstd copy of the archive once, in its store, and sends that:
    directly, or through the tree, where every node keeps it as it came (zstd unpacks ~5x
    faster than gzip)."""
    assert shutil.which("zstd"), "zstd is missing (scripts/bootstrap.sh installs it)"
    venv.ok("launch", "6")
    pkg = make_package(venv.root, "texty", "#!/bin/sh\ntrue\n", {"data.txt": os.urandom(1_500_000).hex()})
    store = venv.vhome / "clusters" / "default" / "packages"
    for nodes, count in (("0-1", 2), ("0-5", 6)):
        r = venv.ok("inject", str(pkg), "--nodes", nodes)
        if count == 6:
            assert "through a tree of 6 nodes" in r.stderr, r.stderr
        (zst,) = store.glob("texty-????????????.tar.zst")
        (gz,) = store.glob("texty-????????????.tar.gz")
        assert zst.name[: -len(".tar.zst")] == gz.name[: -len(".tar.gz")]
        assert zst.stat().st_size < gz.stat().st_size
        for i in range(count):
            (kept,) = _kept(venv, i)
            assert kept.name == zst.name and kept.read_bytes() == zst.read_bytes(), i
            got = _release_dir(venv, i, "texty")
            assert got is not None and (got / "data.txt").read_text() == (pkg / "data.txt").read_text()
        (pkg / "data.txt").write_text(os.urandom(1_500_000).hex())  # the next one: a new release
        for old in [*store.glob("texty-*.tar.zst"), *store.glob("texty-*.tar.gz")]:
            old.unlink()


@pytest.mark.parametrize(
    "case", ["zstd missing", "checker killed", "zst damaged", "tar damaged", "zst fine", "tar fine"]
)
def test_a_kept_copy_is_deleted_only_when_its_check_says_damaged(tmp_path: Path, case: str) -> None:
    """A node unpacks the copy of the package it keeps (``install`` with ``kept``). When that
    fails, the copy's own check decides: the checker's "no" (exit 1 or 2) deletes it and says
    it is damaged; a checker that is missing (a node whose zstd went away: exit 127) or was
    killed (137) could not judge it, so the copy stays for a later inject and nothing says
    "damaged". A copy that unpacks is kept and unpacked, with or without the checker's help."""
    import subprocess

    from vtool.models import Release

    compression = "zst" if case.startswith("zst") else "none"
    release = Release("proj", "0123456789ab", "gz", str(tmp_path / "proj.tar.gz"))
    payload = release.payload(zstd=compression == "zst")
    src = tmp_path / "src"
    (src / "proj").mkdir(parents=True)
    (src / "proj" / "run.sh").write_text("#!/bin/sh\ntrue\n")
    home = tmp_path / "home"
    packages = home / ".vtool" / "packages"
    packages.mkdir(parents=True)
    kept = packages / payload
    with tarfile.open(tmp_path / "p.tar", "w") as tar:
        tar.add(src / "proj", arcname="proj")
    if compression == "zst":
        assert shutil.which("zstd"), "zstd is missing (scripts/bootstrap.sh installs it)"
        subprocess.run(["zstd", "-q", "-o", str(kept), str(tmp_path / "p.tar")], check=True)
    else:
        shutil.copy(tmp_path / "p.tar", kept)
    data = bytearray(kept.read_bytes())
    if case.endswith("damaged"):  # (a tar's first header, or zstd's checksum at the end)
        data[100 if compression == "none" else -4] ^= 0xFF
        kept.write_bytes(bytes(data))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ["mkdir", "mktemp", "rm", "mv", "touch", "cat", "sh", *(["zstd"] if case != "zstd missing" else [])]:
        found = shutil.which(tool)
        assert found, tool
        os.symlink(found, bindir / tool)
    real_tar = shutil.which("tar")
    assert real_tar
    if case == "checker killed":  # the unpack fails (as on a full disk); the check is killed
        (bindir / "tar").write_text(f'#!/bin/sh\ncase "$1" in -t*) kill -9 $$;; -x) exit 2;; esac\nexec {real_tar} "$@"\n')
        (bindir / "tar").chmod(0o755)
    else:
        os.symlink(real_tar, bindir / "tar")
    script = remote.install(release, payload, len(data), compression=compression, kept=True)
    r = subprocess.run(["/bin/sh", "-c", script], env={"HOME": str(home), "PATH": str(bindir)},
                       capture_output=True, text=True, timeout=60, check=False)
    unpacked = home / ".vtool" / "releases" / release.dirname / "run.sh"
    if case.endswith("fine"):
        assert r.returncode == 0 and unpacked.exists() and kept.exists(), (case, r)
        return
    assert r.returncode != 0 and not unpacked.exists(), (case, r)
    damaged = case.endswith("damaged")
    assert ("damaged" in r.stderr) == damaged, (case, r.stderr)
    assert kept.exists() != damaged, (case, r.stderr)
    if not damaged:
        assert kept.read_bytes() == bytes(data), case


@pytest.mark.parametrize("damage", ["middle", "checksum"])
@pytest.mark.parametrize("zstd", ["true", "false"])
@pytest.mark.parametrize("nodes", ["1-2", "1-5"])
def test_a_damaged_archive_is_refused_by_the_nodes(venv: Env, nodes: str, zstd: str, damage: str) -> None:
    """The archives in vtool's store, damaged after they were made (64 bytes in the middle,
    or only the checksum at the end: every byte then decompresses, and only the check says
    no): the node that checks it refuses it, directly (2 nodes) or at the root of the tree
    (5 nodes: the others keep their copy only once the root said "ok"). Every node is
    reported, none keeps or unpacks it, and the error says why."""
    venv.env["VTOOL_INJECT_ZSTD"] = zstd
    venv.ok("launch", "6")
    pkg = make_package(venv.root, "texty", "#!/bin/sh\ntrue\n", {"data.txt": os.urandom(1_500_000).hex()})
    venv.ok("inject", str(pkg), "--nodes", "0")
    store = venv.vhome / "clusters" / "default" / "packages"
    archives = [*store.glob("texty-*.tar.gz"), *store.glob("texty-*.tar.zst")]
    assert len(archives) == (2 if zstd == "true" else 1), archives
    for archive in archives:
        data = bytearray(archive.read_bytes())
        if damage == "middle":
            middle = len(data) // 2
            data[middle : middle + 64] = bytes(64)
        else:  # gzip's trailer: CRC32, then the length; zstd's frame (one, with -T0 on this size) ends with its checksum
            data[-8 if archive.suffix == ".gz" else -4] ^= 0xFF
        archive.write_bytes(bytes(data))
    r = venv.cli("inject", str(pkg), "--nodes", nodes, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    first, last = (int(x) for x in nodes.split("-"))
    for i in range(first, last + 1):
        assert f"node {i}: FAILED" in r.stdout + r.stderr, (i, r.stdout, r.stderr)
        assert _release_dir(venv, i, "texty") is None
        assert not [p for p in os.listdir(venv.node_home(i) / ".vtool" / "releases") if p.startswith("texty")]
        assert not (venv.node_home(i) / ".vtool" / "packages").exists() or not _kept(venv, i), i
    assert "damaged" in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("perl", [True, False])
def test_a_node_copies_the_stream_to_its_children_with_or_without_perl(tmp_path: Path, perl: bool) -> None:
    """FAN's ``keep``: stdin into every child's fifo, whole, and its payload (without the
    trailing "ok") into the node's own copy, with perl (1 MB blocks) or, on a node without
    perl, with tee -p. A child that stops reading (here after 1000 bytes) is dropped and the
    others still get everything. The node keeps its copy only when it has the expected size
    and that "ok". With perl, the payload also goes to the unpack's fifo, and a node that
    keeps no copy ("-") writes none; its fifos to a child and to the unpack are 1 MB pipes
    (or as large as the system allows), and a stdin that is no pipe (a file) is fine."""
    import subprocess

    start = remote.FAN.index("keep() {")
    keep = remote.FAN[start : remote.FAN.index("\n}\n", start) + 3]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ["tee", "cat", "head", "mkfifo", "stat", "tail", "truncate", "mv", *(["perl"] if perl else [])]:
        found = shutil.which(tool)
        assert found, tool
        os.symlink(found, bindir / tool)
    data = os.urandom(3_000_000)
    cases = {"whole": (data + b"ok", True), "no ok": (data + b"no", False), "short": (data[:-1] + b"ok", False)}
    copies = ["part", "-"] if perl else ["part"]
    for (name, (stream, complete)), copy in [(c, k) for c in cases.items() for k in copies]:
        (tmp_path / "in").write_bytes(stream)
        for f in ("got-a", "got-b", "got-x", "got-a.pipe", "got-x.pipe", "part", "final"):
            (tmp_path / f).unlink(missing_ok=True)
        unpack = "x" if perl else "-"
        # (this reader also says how large the pipe it read from was)
        sized = f"{q(sys.executable)} -c {q(_SIZED_READER)}"
        reader = f"{sized} got-x < x &\n" if perl else ""
        script = keep + (
            f"mkfifo a b x 2>/dev/null\n{sized} got-a < a &\nhead -c 1000 b > got-b &\n{reader}"
            f"keep {copy} final {len(data)} {unpack} a b < in\nrc=$?\nwait\nexit $rc\n"
        )
        r = subprocess.run(
            ["/bin/sh", "-c", script], cwd=tmp_path, env={"PATH": str(bindir)}, capture_output=True, timeout=60, check=False
        )
        case = (name, copy, r)
        assert (tmp_path / "got-a").read_bytes() == stream, case
        if perl:
            big = min(1 << 20, int(Path("/proc/sys/fs/pipe-max-size").read_text()))
            assert [(tmp_path / f"got-{c}.pipe").read_text() for c in "ax"] == [str(big)] * 2, case
        assert (tmp_path / "got-b").read_bytes() == stream[:1000], case
        if perl:  # the unpack gets the payload, up to its size, whatever follows
            assert (tmp_path / "got-x").read_bytes() == stream[: len(data)], case
        assert (r.returncode == 0) == complete, case
        if copy == "-":
            assert not (tmp_path / "part").exists() and not (tmp_path / "final").exists(), case
        elif complete:
            assert (tmp_path / "final").read_bytes() == data and not (tmp_path / "part").exists(), case
        else:  # (FAN's exit trap removes the part)
            assert not (tmp_path / "final").exists() and (tmp_path / "part").exists(), case


# Copies stdin to the file named, then writes the size of the pipe it came through next to it.
_SIZED_READER = (
    "import fcntl, shutil, sys\n"
    "with open(sys.argv[1], 'wb') as f:\n"
    "    shutil.copyfileobj(sys.stdin.buffer, f)\n"
    "with open(sys.argv[1] + '.pipe', 'w') as f:\n"
    "    f.write(str(fcntl.fcntl(0, 1032)))  # F_GETPIPE_SZ\n"
)


def _node_dir(env: Env, index: int) -> Path:
    return env.vhome / "clusters" / "default" / "nodes" / str(index)


def _kill_node_when(env: Env, watch: int, kill: int, hits: list[str]) -> threading.Thread:
    """A thread that kills node ``kill`` (all its processes) the moment node ``watch`` starts
    receiving a package (~/.vtool/releases/.incoming.* appears: where a node unpacks it, as it
    arrives through the tree, or when sent directly; ~/.vtool/packages/.PAYLOAD.part.* where a
    node keeps it first and unpacks it afterwards, relayed by ``distribute``)."""
    places = [(env.node_home(watch) / ".vtool" / "packages", ".part."),
              (env.node_home(watch) / ".vtool" / "releases", ".incoming.")]

    def watcher() -> None:
        import time

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            incoming = []
            for folder, mark in places:
                try:
                    incoming += [p for p in os.listdir(folder) if mark in p]
                except FileNotFoundError:
                    pass
            if incoming:
                LocalProvider._stop_processes(_node_dir(env, kill))
                hits.append(incoming[0])
                return
            time.sleep(0.001)

    t = threading.Thread(target=watcher, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("who", ["receiving", "passing on"])
def test_a_node_dying_mid_relay_does_not_stop_the_others(venv: Env, who: str) -> None:
    """Node 1 dies while receiving (it passes the package on to nodes 3 and 5 as it
    arrives: they lose their stream too), or node 0 (the first, fed by the client) dies
    while passing it on to node 1: every other node still gets it, the dead node is
    reported, and a re-run (after `vtool start`) completes it."""
    venv.ok("launch", "6")
    dead, watch = (1, 1) if who == "receiving" else (0, 1)
    for attempt in range(3):  # a 24 MB transfer is long enough to be caught; if not, again
        pkg = _big_package(venv.root, "big", 24, f"v{attempt}")
        hits: list[str] = []
        watcher = _kill_node_when(venv, watch, dead, hits)
        r = venv.cli("inject", str(pkg), timeout=300)
        watcher.join(timeout=130)
        assert hits, "the watched node never started receiving"
        if r.returncode != 0 or _release_dir(venv, dead, "big") is None:
            break
        venv.ok("start", "--nodes", str(dead))  # caught too late: the transfer was over
    else:
        pytest.fail("the node could never be stopped during a transfer")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"node {dead}: FAILED" in r.stdout + r.stderr
    # The tree lost the nodes below the dead one (or all, with the first): they were served again.
    assert "through a tree of 6 nodes" in r.stderr and "did not get it through the tree" in r.stderr, r.stderr
    version = (pkg / "version.txt").read_text()
    for i in range(6):
        got = _release_dir(venv, i, "big")
        if i == dead:
            assert got is None or (got / "version.txt").read_text() != version
            continue
        assert got is not None and (got / "version.txt").read_text() == version, (i, r.stdout)
        assert (got / "blob.bin").read_bytes() == (pkg / "blob.bin").read_bytes()
    # No half-received package is left behind on the nodes that got it.
    for i in range(6):
        if i != dead:
            assert not [p for p in os.listdir(venv.node_home(i) / ".vtool" / "releases") if p.startswith(".incoming")]
            assert not [p for p in os.listdir(venv.node_home(i) / ".vtool" / "packages") if ".part." in p]
    # The re-run completes the failed node.
    venv.ok("start", "--nodes", str(dead))
    r = venv.ok("inject", str(pkg), "--only-failed", timeout=300)
    assert f"node {dead}: started" in r.stdout
    got = _release_dir(venv, dead, "big")
    assert got is not None and (got / "blob.bin").read_bytes() == (pkg / "blob.bin").read_bytes()


# -- deltas --------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[str, bytes | str, bool]]:
    """path -> (kind, content or link target, executable) for everything under root."""
    out: dict[str, tuple[str, bytes | str, bool]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p), False)
            elif p.is_dir():
                out[rel] = ("dir", b"", False)
            else:
                out[rel] = ("file", p.read_bytes(), bool(p.stat().st_mode & 0o100))
    return out


def test_small_packages_and_deltas_go_directly(venv: Env) -> None:
    venv.ok("launch", "5")
    pkg = make_package(venv.root, "small", "#!/bin/sh\ntrue\n", {"a.txt": "a" * 1000})
    r = venv.ok("inject", str(pkg))
    assert r.stdout.count("package sent)") == 5 and "pass it on" not in r.stderr


def test_a_changed_package_sends_only_the_changes(cluster3: Env) -> None:
    files = {f"src/m{i}.py": f"# module {i}\n" + "x = 1\n" * 200 for i in range(40)}
    files.update({"data/big.bin": "", "doc/a.txt": "a\n", "doc/gone.txt": "bye\n"})
    pkg = make_package(cluster3.root, "proj", "#!/bin/sh\ntrue\n", files)
    (pkg / "data" / "big.bin").write_bytes(os.urandom(2 << 20))
    (pkg / "tool.sh").write_text("#!/bin/sh\n")
    (pkg / "tool.sh").chmod(0o755)
    os.symlink("doc/a.txt", pkg / "link")
    cluster3.ok("inject", str(pkg))
    # The program writes results into its release folder: they are not carried over.
    (_release_dir(cluster3, 0, "proj") / "results.csv").write_text("1,2\n")  # type: ignore[operator]

    (pkg / "src" / "m7.py").write_text("# changed\n")
    (pkg / "doc" / "gone.txt").unlink()
    (pkg / "doc" / "new.txt").write_text("new\n")
    (pkg / "tool.sh").chmod(0o644)
    os.remove(pkg / "link")
    os.symlink("src/m1.py", pkg / "link")
    r = cluster3.ok("inject", str(pkg))
    assert r.stdout.count("package changes sent)") == 3, r.stdout
    for i in range(3):
        assert _tree(_release_dir(cluster3, i, "proj")) == _tree(pkg)  # type: ignore[arg-type]
    # What went over the wire: the changed and new files, not the 2 MB that stayed the same.
    deltas = list((cluster3.vhome / "clusters" / "default" / "packages").glob("proj-*.from-proj-*.tar.gz"))
    assert len(deltas) == 1
    with tarfile.open(deltas[0]) as tar:
        sent = {m.name for m in tar.getmembers() if m.isfile()}
    assert sent == {".vtool-keep", ".vtool-sums", "proj/src/m7.py", "proj/doc/new.txt", "proj/tool.sh"}
    assert deltas[0].stat().st_size < 10_000


@pytest.mark.parametrize("when", ["later", "in the tick its stamp was written"])
def test_a_base_changed_on_a_node_gets_the_whole_package(cluster3: Env, when: str) -> None:
    """A delta trusts the base release's files unread when none is newer than the stamp
    written when the base was unpacked. A file changed right after it, within the same tick
    of the file system's clock (a few ms on ext4), has the stamp's very time: it must still
    count as changed (the stamp is set back)."""
    pkg = make_package(cluster3.root, "proj", "#!/bin/sh\ntrue\n", {"a.txt": "a\n", "b.txt": "b\n"})
    (pkg / "big.bin").write_bytes(os.urandom(200_000))  # (a delta is sent when clearly smaller)
    cluster3.ok("inject", str(pkg))
    rel = _release_dir(cluster3, 1, "proj")
    assert rel is not None
    (rel / "b.txt").write_text("edited on the node\n")
    if when != "later":
        stamped = (rel.parent / f".{rel.name}.unpacked").stat().st_ctime_ns  # (when it was written)
        os.utime(rel / "b.txt", ns=(stamped, stamped))
    (pkg / "a.txt").write_text("a2\n")
    r = cluster3.ok("inject", str(pkg))
    assert "node 1: started (in screen; package sent)" in r.stdout or "node 1: started (detached; package sent)" in r.stdout
    assert r.stdout.count("package changes sent)") == 2
    for i in range(3):
        assert _tree(_release_dir(cluster3, i, "proj")) == _tree(pkg)  # type: ignore[arg-type]


@pytest.mark.parametrize("shell", ["dash", "bash"])
def test_prepare_writes_the_cluster_files_and_the_key_with_shell_builtins(tmp_path: Path, shell: str) -> None:
    """prepare, run by the node's shell in an empty home: the files land in place with the
    modes ssh wants, the private key (on stdin, last line without a newline) is copied
    whole, and the cluster key is added to authorized_keys once, after a last line that
    had no newline (which keeps its own line)."""
    import subprocess

    if not shutil.which(shell):
        pytest.skip(f"{shell} is not installed")
    nodes = [Node("c", i, f"id{i}", "local", "127.0.0.1", 2200 + i, "u", f"10.0.0.{i}") for i in range(3)]
    pub = "ssh-ed25519 AAAAC3Nza-cluster c-relay"
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"
    cmd = remote.prepare("c", nodes[1], nodes, {}, None, trust=(pub, "vtool-c-0 ssh-ed25519 AAAA\n", "Host c-0\n"))
    home = Path(tempfile.mkdtemp(dir="/tmp"))  # (short: ~/.vtool/cm/NAME must fit a socket path)
    try:
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAAother user@laptop")  # no newline
        for _ in range(2):  # the second time changes nothing
            r = subprocess.run([shutil.which(shell) or shell, "-c", cmd], input=key.encode(), env={"HOME": str(home), "PATH": os.environ["PATH"]},
                               capture_output=True, timeout=30, check=False)
            assert r.returncode == 0, r.stderr
        d = home / ".vtool"
        assert (d / "relay_key").read_text() == key + "\n"
        assert stat.S_IMODE((d / "relay_key").stat().st_mode) == 0o600
        assert stat.S_IMODE((d / "cm").stat().st_mode) == 0o700
        assert stat.S_IMODE((d / "releases").stat().st_mode) == 0o755
        assert "VTOOL_NODE_INDEX=1\n" in (d / "cluster.env").read_text()
        assert (d / "hosts").read_text() == "10.0.0.0\n10.0.0.1\n10.0.0.2\n"
        assert (d / "bin" / "vtool-fan").read_text() == remote.FAN
        assert (d / "bin" / "vtool-run").read_text() == remote.RUN_WRAPPER
        assert "ControlPath" in (d / "ssh_config").read_text() and (d / "ssh_config").read_text().endswith("Host c-0\n")
        assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == [".prepared"]  # no staging folder left
        assert (home / ".ssh" / "authorized_keys").read_text() == f"ssh-ed25519 AAAAother user@laptop\n{pub}\n"

        def again(command: str, path: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run([shutil.which(shell) or shell, "-c", command], input=key.encode(),
                                  env={"HOME": str(home), "PATH": path}, capture_output=True, timeout=30, check=False)

        # With every file as it wrote them, it starts no program (none could be found here).
        empty = home / "no-programs"
        empty.mkdir()
        assert again(cmd, str(empty)).returncode == 0
        # A file changed since (an older vtool writes no digest) is newer than the digest.
        time.sleep(0.05)
        (d / "hosts").write_text("10.0.0.0\n")
        assert again(cmd, str(empty)).returncode != 0
        assert again(cmd, os.environ["PATH"]).returncode == 0 and (d / "hosts").read_text().count("\n") == 3
        assert again(cmd, str(empty)).returncode == 0
        (d / "hosts").unlink()  # one file gone: all are written again
        assert again(cmd, str(empty)).returncode != 0
        assert again(cmd, os.environ["PATH"]).returncode == 0
        assert (d / "hosts").read_text() == "10.0.0.0\n10.0.0.1\n10.0.0.2\n"
        fewer = remote.prepare("c", nodes[1], nodes[:2], {}, None, trust=(pub, "", "Host c-0\n"))
        assert again(fewer, os.environ["PATH"]).returncode == 0  # other contents: written
        assert (d / "hosts").read_text() == "10.0.0.0\n10.0.0.1\n"
        # A write cut short leaves no digest: the files are written again, even if the
        # contents go back to what they were.
        (d / ".prepared").write_text("")
        assert again(cmd, str(empty)).returncode != 0
        assert again(cmd, os.environ["PATH"]).returncode == 0 and (d / "hosts").read_text().count("\n") == 3
    finally:
        shutil.rmtree(home)


def test_a_node_whose_unpack_fails_mid_stream_is_reported_and_the_others_get_it(venv: Env) -> None:
    """Node 1, which unpacks the plain tar as it arrives and passes it on to nodes 3 and 5,
    has a ``tar`` that gives up part-way: node 1 is reported with tar's own error, every
    other node gets the package (nodes 3 and 5 still from node 1, which passes the stream
    on), nothing half-unpacked is left on node 1, and a re-run with a working tar completes it."""
    venv.ok("launch", "6")
    node = _node_dir(venv, 1)
    fake = venv.root / "fakebin"
    fake.mkdir()
    real_tar = shutil.which("tar")
    # it unpacks nothing (as on a full disk) but lists archives as tar does
    (fake / "tar").write_text(
        "#!/bin/sh\n"
        "case $1 in -x*) head -c 300000 >/dev/null; echo 'tar: broken here' >&2; exit 2;; esac\n"
        f'exec {real_tar} "$@"\n'
    )
    (fake / "tar").chmod(0o755)
    # node 1's sessions find that tar first (SetEnv: only its first line counts, so extend it)
    lines = (node / "sshd_config").read_text().splitlines()
    lines = [f'{ln} "PATH={fake}:/usr/local/bin:/usr/bin:/bin"' if ln.startswith("SetEnv ") else ln for ln in lines]
    (node / "sshd_config").write_text("\n".join(lines) + "\n")
    os.kill(int((node / "sshd.pid").read_text()), signal.SIGHUP)

    def sees_the_fake_tar() -> bool:
        # A connection keeps the settings of the sshd that accepted it: until sshd has started
        # again with the new config, each try closes the shared one and opens another.
        close_shared_connections()
        return venv.cli("run", "--nodes", "1", "command -v tar").stdout.strip().endswith(f"{fake}/tar")

    wait_for(sees_the_fake_tar)
    pkg = _big_package(venv.root, "big", 4, "v1")
    r = venv.cli("inject", str(pkg), timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "node 1: FAILED" in r.stdout + r.stderr and "tar: broken here" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "through a tree of 6 nodes" in r.stderr, r.stderr
    for i in (0, 2, 3, 4, 5):
        got = _release_dir(venv, i, "big")
        assert got is not None and (got / "blob.bin").read_bytes() == (pkg / "blob.bin").read_bytes(), (i, r.stdout)
    # node 1 still passed the stream on: its children got it from it, not from the client again
    for i in (3, 5):
        assert f"node {i}: started (in screen; package from another node)" in r.stdout, r.stdout
    assert _release_dir(venv, 1, "big") is None
    assert not list((venv.node_home(1) / ".vtool" / "releases").glob(".incoming*"))
    # with its own sshd config again (and the system's tar), a re-run completes node 1
    venv.ok("stop", "--nodes", "1")
    venv.ok("start", "--nodes", "1")
    r = venv.ok("inject", str(pkg), "--only-failed", timeout=300)
    assert "node 1: started" in r.stdout
    got = _release_dir(venv, 1, "big")
    assert got is not None and (got / "blob.bin").read_bytes() == (pkg / "blob.bin").read_bytes()

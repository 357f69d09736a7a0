"""inject: releases, the atomic switch, re-inject while running, archives, later launches."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile

from conftest import Env, make_package, wait_for

SLEEPER = """#!/bin/sh
echo "$$" > "$HOME/pid-$(cat version.txt)"
echo started $(cat version.txt)
exec sleep 600
"""


def _pid_cwd(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/cwd")


def test_inject_twice_while_first_release_runs(cluster3: Env) -> None:
    pkg = make_package(cluster3.root, "job", SLEEPER, {"version.txt": "v1\n"})
    cluster3.ok("inject", str(pkg))
    pid_file = cluster3.node_home(0) / "pid-v1"
    wait_for(pid_file.exists)
    old_pid = int(pid_file.read_text())
    old_release = (cluster3.node_home(0) / "job").resolve()

    (pkg / "version.txt").write_text("v2\n")
    cluster3.ok("inject", str(pkg))
    wait_for((cluster3.node_home(0) / "pid-v2").exists)
    new_release = (cluster3.node_home(0) / "job").resolve()
    assert new_release != old_release
    assert (cluster3.node_home(0) / "job").is_symlink()
    # The first release's process still runs, in its own release folder, with its files.
    assert os.path.exists(f"/proc/{old_pid}")
    assert _pid_cwd(old_pid) == str(old_release)
    assert (old_release / "version.txt").read_text() == "v1\n"
    assert (new_release / "version.txt").read_text() == "v2\n"
    status = json.loads(cluster3.ok("status", "--json").stdout)[0]
    assert status["release"] == new_release.name
    assert {n["launch"] for n in status["nodes"]} == {"running"}


def test_gitignore_and_git_are_not_shipped(cluster3: Env) -> None:
    pkg = make_package(
        cluster3.root, "proj", "#!/bin/sh\nfind . -type f | sort > \"$HOME/files.txt\"\n",
        {".gitignore": "*.o\nbuild/\n!keep.o\n", "main.c": "int main(){}\n", "x.o": "obj", "keep.o": "kept",
         "build/out.bin": "big", ".git/config": "[core]", "sub/.gitignore": "secret.txt\n", "sub/secret.txt": "s",
         "sub/ok.txt": "ok"},
    )
    cluster3.ok("inject", str(pkg), "--nodes", "1")
    files = wait_for(lambda: (cluster3.node_home(1) / "files.txt").exists() and (cluster3.node_home(1) / "files.txt").read_text())
    assert files.split() == ["./.gitignore", "./keep.o", "./main.c", "./sub/.gitignore", "./sub/ok.txt", "./vtool-launch"]
    assert not (cluster3.node_home(0) / "proj").exists()  # --nodes 1 only


def test_archives_made_by_hand_and_vcloud_launch(cluster3: Env) -> None:
    pkg = make_package(cluster3.root, "oldstyle", "", {"data.txt": "payload\n"})
    (pkg / "vtool-launch").unlink()
    launcher = pkg / "vcloud-launch"
    launcher.write_text("#!/bin/sh\ncp data.txt \"$HOME/got-$VTOOL_NODE_INDEX.txt\"\n")
    launcher.chmod(0o755)
    archive = cluster3.work / "oldstyle.tar.bz2"
    subprocess.run(["tar", "cjf", str(archive), "-C", str(cluster3.root), "oldstyle"], check=True)
    cluster3.ok("inject", str(archive))
    for i in range(3):
        wait_for((cluster3.node_home(i) / f"got-{i}.txt").exists)
    tgz = cluster3.work / "again.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(str(pkg), arcname="oldstyle")
    cluster3.ok("inject", str(tgz))


def test_nodes_launched_later_receive_the_release(venv: Env) -> None:
    pkg = make_package(venv.root, "grow", "#!/bin/sh\necho \"$VTOOL_NODE_INDEX/$VTOOL_NODE_COUNT\" > \"$HOME/seen.txt\"\n")
    venv.ok("launch", "2")
    venv.ok("inject", str(pkg))
    wait_for(lambda: all((venv.node_home(i) / "seen.txt").exists() for i in range(2)))
    first = (venv.node_home(0) / "seen.txt").stat().st_mtime_ns
    r = venv.ok("launch", "1")
    assert "sending release grow-" in r.stderr
    assert wait_for(lambda: (venv.node_home(2) / "seen.txt").exists() and (venv.node_home(2) / "seen.txt").read_text()) == "2/3\n"
    # The nodes already running the release were not restarted, but know the new size.
    assert (venv.node_home(0) / "seen.txt").stat().st_mtime_ns == first
    assert "VTOOL_NODE_COUNT=3\n" in (venv.node_home(0) / ".vtool" / "cluster.env").read_text()
    assert (venv.node_home(0) / ".vtool" / "hosts").read_text().count("\n") == 3
    venv.ok("launch", "1", "--no-inject")
    assert not (venv.node_home(3) / "grow").exists()


def test_screen_session_when_the_node_has_screen(cluster3: Env) -> None:
    import shutil

    if shutil.which("screen") is None:
        import pytest

        pytest.skip("screen is not installed (scripts/bootstrap.sh installs it)")
    pkg = make_package(cluster3.root, "scr", "#!/bin/sh\necho in-screen\nexec sleep 600\n")
    r = cluster3.ok("inject", str(pkg), "--nodes", "0")
    assert "in screen" in r.stdout
    out = wait_for(lambda: (lambda x: "vtool-scr" in x.stdout and x)(cluster3.ok("run", "screen -ls || true", "--nodes", "0")))
    assert "Detached" in out.stdout


def test_connect_then_screen_r_shows_the_launch_script(cluster3: Env) -> None:
    """As in vcloud: `connect 1`, then `screen -r` attaches to that node's launch script."""
    import pty
    import select
    import shutil
    import sys
    import time

    if shutil.which("screen") is None:
        import pytest

        pytest.skip("screen is not installed (scripts/bootstrap.sh installs it)")
    pkg = make_package(cluster3.root, "live", "#!/bin/sh\necho marker-from-node-$VTOOL_NODE_INDEX\nexec sleep 600\n")
    cluster3.ok("inject", str(pkg))
    r = cluster3.ok("run", "screen -ls | grep -c vtool-live || true", "--nodes", "1")
    assert "[1] 1" in r.stdout  # exactly one session: nodes do not share screen's sockets
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vtool", "connect", "1"], stdin=slave, stdout=slave, stderr=slave,
                            env=dict(cluster3.env, TERM="xterm"), cwd=cluster3.work, start_new_session=True)
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 30) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break

    try:
        read_until(b"[vtool default-1]")  # the node's prompt
        os.write(master, b"screen -r\n")
        read_until(b"marker-from-node-1")
        assert b"marker-from-node-1" in seen
        os.write(master, b"\x01d")  # detach: the script keeps running
        read_until(b"detached")
        os.write(master, b"exit\n")
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    r = cluster3.ok("status", "--json")
    assert {n["launch"] for n in json.loads(r.stdout)[0]["nodes"]} == {"running"}


def test_before_inject_hook_sees_launch_sending_the_release(venv: Env) -> None:
    import vtool
    from vtool import api, hookimpl
    from vtool import plugin_manager as plugins

    calls: list[tuple[str, tuple[int, ...]]] = []

    class Recorder:
        @hookimpl
        def vtool_before_inject(self, cluster, nodes, release, settings):  # type: ignore[no-untyped-def]
            calls.append((release.name, tuple(n.index for n in nodes)))

        @hookimpl
        def vtool_after_inject(self, cluster, nodes, release, results, settings):  # type: ignore[no-untyped-def]
            calls.append(("after", tuple(r.index for r in results.succeeded)))

    pm = plugins.get()
    rec = Recorder()
    pm.register(rec, name="recorder")
    try:
        s = vtool.settings()
        api.launch(2, settings=s)
        pkg = make_package(venv.root, "hooked", "#!/bin/sh\n")
        api.inject(str(pkg), settings=s)
        api.launch(1, settings=s)
    finally:
        pm.unregister(rec)
    assert calls == [("hooked", (0, 1)), ("after", (0, 1)), ("hooked", (2,)), ("after", (2,))]

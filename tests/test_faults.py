"""Faults: a node that dies or hangs mid-command, stable indices, host keys, clean tear-down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import Env, make_package, pids_whose_cmdline_has, wait_for

from vtool.providers.local import _proc_alive, node_processes


def _node_pids(env: Env, index: int, cluster: str = "default") -> list[int]:
    meta = env.node_meta(index, cluster)
    return node_processes(int(meta["pid"]), str(meta["token"]))  # type: ignore[arg-type]


def _kill_node(env: Env, index: int, sig: int = signal.SIGKILL) -> list[int]:
    """The node 'dies': its sshd and every process on it get ``sig``."""
    pids = _node_pids(env, index)
    for p in pids:
        os.kill(p, sig)
    return pids


def test_node_killed_in_the_middle_of_inject(cluster3: Env) -> None:
    """kill -9 of node 1 while inject is under way: 0 and 2 finish, 1 is reported, exit non-zero."""
    import vtool
    from vtool import api, hookimpl
    from vtool import plugin_manager as plugins

    class KillNodeOneMidway:
        @hookimpl
        def vtool_node_env(self, cluster, node, settings):  # type: ignore[no-untyped-def]
            if node.index == 1:  # called while node 1's inject is under way
                _kill_node(cluster3, 1)
            return {}

    pm = plugins.get()
    plugin = KillNodeOneMidway()
    pm.register(plugin, name="kill-node-1")
    try:
        pkg = make_package(cluster3.root, "mid", "#!/bin/sh\ntouch \"$HOME/ran\"\n")
        result = api.inject(str(pkg), settings=vtool.settings())
    finally:
        pm.unregister(plugin)
    assert [r.index for r in result.failed] == [1]
    assert [r.index for r in result.succeeded] == [0, 2]
    wait_for(lambda: (cluster3.node_home(0) / "ran").exists() and (cluster3.node_home(2) / "ran").exists())
    with pytest.raises(vtool.PartialFailure, match="failed on 1 of 3 node"):
        api.raise_for_failures(result, "inject")
    # Through the CLI: the dead node is reported by index, the command exits 1.
    r = cluster3.cli("inject", str(pkg))
    assert r.returncode == 1
    assert "node 1: FAILED: node is dead" in r.stderr
    assert "node 0: started" in r.stdout and "node 2: started" in r.stdout


def test_hung_node_does_not_block_the_others(cluster3: Env) -> None:
    cluster3.ok("run", "true")  # connections are open and shared
    pids = _kill_node(cluster3, 2, signal.SIGSTOP)
    try:
        r = cluster3.cli("run", "echo alive-$VTOOL_NODE_INDEX", extra_env={"VTOOL_TIMEOUT_COMMAND": "4", "VTOOL_TIMEOUT_CONNECT": "2"})
    finally:
        for p in pids:
            os.kill(p, signal.SIGCONT)
    assert r.returncode == 1
    assert "[0] alive-0" in r.stdout and "[1] alive-1" in r.stdout
    assert "alive-2" not in r.stdout
    assert "timed out" in r.stderr and "failed on 1 of 3 node(s): 2" in r.stderr


def test_indices_are_stable(cluster3: Env) -> None:
    cluster3.ok("terminate", "--nodes", "1", "--yes")
    doc = json.loads(cluster3.ok("status", "--json").stdout)
    assert [n["index"] for n in doc[0]["nodes"]] == [0, 2]
    assert "VTOOL_NODE_COUNT=2\n" in (cluster3.node_home(2) / ".vtool" / "cluster.env").read_text()
    r = cluster3.ok("launch", "1")
    assert "(3-3)" in r.stderr
    cluster3.ok("run", "echo $VTOOL_NODE_INDEX > idx.txt")
    cluster3.ok("scpgetall", "idx.txt", "got")
    assert sorted(p.name for p in cluster3.work.glob("got.*")) == ["got.0", "got.2", "got.3"]
    for i in (0, 2, 3):
        assert (cluster3.work / f"got.{i}").read_text() == f"{i}\n"
    r = cluster3.cli("run", "true", "--nodes", "1")
    assert r.returncode == 4 and "no node 1" in r.stderr


def test_host_keys_are_verified_strictly(cluster3: Env) -> None:
    kh = cluster3.vhome / "clusters" / "default" / "known_hosts"
    lines = kh.read_text().splitlines()
    other = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(cluster3.root / "k")], check=True)
    del other
    fake = (cluster3.root / "k.pub").read_text().split()[:2]
    tampered = [f"vtool-default-0 {' '.join(fake)}" if ln.startswith("vtool-default-0 ") else ln for ln in lines]
    tampered = [ln for ln in tampered if not ln.startswith("vtool-default-1 ")]  # and node 1 unknown
    kh.write_text("\n".join(tampered) + "\n")
    # Fresh connections only: close the shared ones.
    import vtool
    from vtool import api

    session = api.Session(vtool.settings())
    for node in session.info().nodes:
        session.client(node).close()
    r = cluster3.cli("run", "echo ok-$VTOOL_NODE_INDEX")
    assert r.returncode == 1
    assert "[2] ok-2" in r.stdout and "ok-0" not in r.stdout and "ok-1" not in r.stdout
    assert "does not match the key pinned for vtool-default-0" in r.stderr
    assert kh.read_text() == "\n".join(tampered) + "\n"  # nothing was auto-accepted
    assert not (cluster3.home / ".ssh").exists()


def _control_dir(env: Env) -> Path:
    from vtool.state import control_dir

    return control_dir(env.vhome)


def test_terminate_leaves_no_process_and_spares_other_clusters(cluster3: Env) -> None:
    cluster3.ok("launch", "1", "--cluster", "other")
    daemons = """#!/bin/sh
setsid sleep 1001 </dev/null >/dev/null 2>&1 &
nohup sleep 1002 </dev/null >/dev/null 2>&1 &
( sleep 1003 </dev/null >/dev/null 2>&1 & )
echo spawned > "$HOME/spawned"
exec sleep 1000
"""
    pkg = make_package(cluster3.root, "daemons", daemons)
    cluster3.ok("inject", str(pkg))
    cluster3.ok("run", "setsid sleep 1004 </dev/null >/dev/null 2>&1 &")
    wait_for(lambda: all((cluster3.node_home(i) / "spawned").exists() for i in range(3)))
    before = {i: _node_pids(cluster3, i) for i in range(3)}
    assert all(len(p) >= 5 for p in before.values()), before  # sshd + wrapper + 4 sleeps at least
    other_pid = int(cluster3.node_meta(0, "other")["pid"])

    cluster3.ok("terminate", "--yes")
    for pids in before.values():
        assert not [p for p in pids if _proc_alive(p)]
    assert not (cluster3.vhome / "clusters" / "default").exists()
    assert _proc_alive(other_pid)
    r = cluster3.ok("run", "echo still-here", "--cluster", "other")
    assert "[0] still-here" in r.stdout


def test_node_whose_after_launch_hook_fails_is_not_kept(venv: Env) -> None:
    import vtool
    from vtool import api, hookimpl
    from vtool import plugin_manager as plugins

    class FailOnNodeOne:
        @hookimpl
        def vtool_after_launch(self, cluster, node, settings, remote):  # type: ignore[no-untyped-def]
            assert remote("echo set-up > ~/hooked").exit_code == 0
            if node.index == 1:
                raise vtool.NodeError("could not mount the shared volume")

    pm = plugins.get()
    plugin = FailOnNodeOne()
    pm.register(plugin, name="fail-node-1")
    try:
        result = api.launch(3, settings=vtool.settings())
    finally:
        pm.unregister(plugin)
    assert [r.index for r in result.ready.failed] == [1]
    assert "could not mount the shared volume" in (result.ready.failed[0].error or "")
    assert [n.index for n in result.cluster.nodes] == [0, 2]
    assert "VTOOL_NODE_COUNT=2\n" in (venv.node_home(2) / ".vtool" / "cluster.env").read_text()
    assert (venv.node_home(0) / "hooked").exists()


def test_only_failed_reruns_just_the_failed_nodes(cluster3: Env) -> None:
    r = cluster3.cli("run", "test $VTOOL_NODE_INDEX != 1 || test -f ok", "--nodes", "0-2")
    assert r.returncode == 1 and "failed on 1 of 3 node(s): 1" in r.stderr
    (cluster3.work / "ok").write_text("")
    cluster3.ok("put", "ok", "ok", "--nodes", "1")
    r = cluster3.ok("run", "echo again-$VTOOL_NODE_INDEX; test $VTOOL_NODE_INDEX != 1 || test -f ok", "--only-failed")
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("[")] == ["[1] again-1"]
    r = cluster3.cli("run", "true", "--only-failed")
    assert r.returncode == 2 and "no failed nodes to re-run" in r.stderr

    # inject: node 2 dead, then back; --only-failed completes the cluster.
    pkg = make_package(cluster3.root, "redo", "#!/bin/sh\ntouch \"$HOME/redo-ran\"\n")
    pids = _kill_node(cluster3, 2, signal.SIGSTOP)
    try:
        r = cluster3.cli("inject", str(pkg), extra_env={"VTOOL_TIMEOUT_TRANSFER": "3", "VTOOL_TIMEOUT_CONNECT": "2"})
        assert r.returncode == 1 and "node 2: FAILED" in r.stderr
    finally:
        for p in pids:
            os.kill(p, signal.SIGCONT)
    wait_for(lambda: (cluster3.node_home(0) / "redo-ran").exists())
    r = cluster3.ok("inject", str(pkg), "--only-failed")
    assert "node 2: started" in r.stdout and "node 0" not in r.stdout
    wait_for(lambda: (cluster3.node_home(2) / "redo-ran").exists())


def test_node_whose_sshd_died_is_cleaned_up_completely(cluster3: Env) -> None:
    """Only node 1's listening sshd dies; its open shared connection must not outlive terminate."""
    cluster3.ok("run", "true")  # opens a shared connection to every node
    listener = int(cluster3.node_meta(1)["pid"])
    children = [p for p in _node_pids(cluster3, 1) if p != listener]
    assert children, "the shared connection's sshd should be a child of the listener"
    os.kill(listener, signal.SIGKILL)
    doc = json.loads(cluster3.ok("status", "--json").stdout)
    assert [n["state"] for n in doc[0]["nodes"]] == ["running", "dead", "running"]
    cm = _control_dir(cluster3)
    cluster3.ok("terminate", "--yes")
    wait_for(lambda: not [p for p in children if _proc_alive(p)])
    muxes = pids_whose_cmdline_has(str(cm))
    assert not muxes, f"shared SSH connections left open: {muxes}"


def test_a_node_that_hangs_mid_command_keeps_a_timeout_waiting_only_briefly(cluster3: Env) -> None:
    """Node 0 stops answering (SIGSTOP) while its command runs, with its guard up: the
    timeout still ends vtool's wait within STOP_WITHIN per try (the guard's and the stop
    session's), not a connection timeout each; once the node runs again, the guard's closed
    session stops the command. The other nodes finish as usual."""
    import sys
    import time

    from vtool.ssh import GUARD_AFTER, STOP_WITHIN

    cluster3.ok("run", "true")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vtool", "run", "echo started; sleep 1401; echo never"],
        cwd=cluster3.work,
        env={**cluster3.env, "VTOOL_TIMEOUT_COMMAND": "4", "VTOOL_TIMEOUT_CONNECT": "10"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    for _ in range(3):
        assert "started" in proc.stdout.readline()
    time.sleep(GUARD_AFTER + 0.5)
    t0 = time.monotonic()
    pids = _kill_node(cluster3, 0, signal.SIGSTOP)
    try:
        out, err = proc.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert proc.returncode == 1 and "timed out after 4s" in err and "never" not in out, err
    # (4 s of the command's time were left; a connection timeout per try would be 15 s each)
    assert waited < 4 + 3 * STOP_WITHIN + 4, waited
    wait_for(lambda: not pids_whose_cmdline_has("sleep 1401"), timeout=30)

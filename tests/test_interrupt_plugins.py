"""Ctrl-C during launch, following logs, and plugins that are broken."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import Env, fake_dist, make_package, pids_whose_cmdline_has, wait_for


def _sshd_pids_under(vhome: Path) -> set[int]:
    return {p for p in pids_whose_cmdline_has("sshd -D", str(vhome))}


def test_ctrl_c_during_launch_leaves_no_untracked_node(venv: Env) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vtool", "launch", "6"], cwd=venv.work, env=venv.env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen = ""
    while "sshd started" not in seen:  # interrupt while nodes are being created
        line = proc.stderr.readline()
        assert line, f"launch ended early: {seen}"
        seen += line
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, seen + err)
    assert "vtool: interrupted" in err and "vtool terminate -c default --yes" in err and "Traceback" not in err
    listed = json.loads(venv.ok("status", "--json").stdout)
    tracked = {n["id"] for c in listed for n in c["nodes"]}
    running = _sshd_pids_under(venv.vhome)
    # Every sshd still running belongs to a node that status lists; nothing is orphaned.
    metas = [json.loads(p.read_text()) for p in venv.vhome.glob("clusters/*/nodes/*/node.json")]
    assert running == {m["pid"] for m in metas if m["id"] in tracked}
    venv.ok("terminate", "--yes")
    assert not _sshd_pids_under(venv.vhome)


def test_logs_follow_until_interrupted(cluster3: Env) -> None:
    pkg = make_package(cluster3.root, "ticker", "#!/bin/sh\ni=0\nwhile true; do echo tick-$i; i=$((i+1)); sleep 0.2; done\n")
    cluster3.ok("inject", str(pkg))
    proc = subprocess.Popen([sys.executable, "-m", "vtool", "logs", "-f", "--nodes", "0,2"], cwd=cluster3.work,
                            env=cluster3.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while not ({"[0] tick-3", "[2] tick-3"} <= set(lines)) and time.monotonic() < deadline:
        lines.append(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert {"[0] tick-3", "[2] tick-3"} <= set(lines)
    assert not any(ln.startswith("[1]") for ln in lines)
    assert proc.returncode == 130


def test_broken_plugins_are_named_with_exit_code_5(venv: Env) -> None:
    site = fake_dist(venv.root / "a", "brokenplug", "raise RuntimeError('boom at import')\n")
    r = venv.cli("--list", extra_env={"PYTHONPATH": f"{site}:{venv.env['PYTHONPATH']}"})
    assert r.returncode == 5 and "plugin 'brokenplug'" in r.stderr and "boom at import" in r.stderr
    assert "Traceback" not in r.stderr
    site = fake_dist(venv.root / "b", "typoplug", "from vtool import hookimpl\n\n@hookimpl\ndef vtool_aftre_launch(node):\n    pass\n")
    r = venv.cli("launch", "1", extra_env={"PYTHONPATH": f"{site}:{venv.env['PYTHONPATH']}"})
    assert r.returncode == 5 and "typoplug" in r.stderr and "vtool_aftre_launch" in r.stderr
    assert not (venv.vhome / "clusters").exists()


def test_sigterm_stops_logs_follow_and_its_remote_tail(cluster3: Env) -> None:
    pkg = make_package(cluster3.root, "ticker", "#!/bin/sh\nwhile true; do echo tick; sleep 0.2; done\n")
    cluster3.ok("inject", str(pkg), "--nodes", "0")
    proc = subprocess.Popen([sys.executable, "-m", "vtool", "logs", "-f", "--nodes", "0"], cwd=cluster3.work,
                            env=cluster3.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "[0] tick"

    def tails() -> list[int]:
        from vtool.providers.local import _proc_cmdline, node_processes

        meta = cluster3.node_meta(0)
        return [p for p in node_processes(int(meta["pid"]), str(meta["token"])) if "tail" in " ".join(_proc_cmdline(p))]

    assert tails()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "vtool: interrupted" in err
    wait_for(lambda: not tails())


def _sleepers(env: Env, marker: str) -> list[int]:
    from vtool.providers.local import _proc_cmdline, node_processes

    found = []
    for i in range(3):
        meta = env.node_meta(i)
        found += [p for p in node_processes(int(meta["pid"]), str(meta["token"])) if " ".join(_proc_cmdline(p)) == marker]
    return found


def test_timeout_and_ctrl_c_stop_the_remote_command(cluster3: Env) -> None:
    r = cluster3.cli("run", "sleep 77; echo never", extra_env={"VTOOL_TIMEOUT_COMMAND": "1"})
    assert r.returncode == 1 and "timed out after 1s" in r.stderr and "never" not in r.stdout
    wait_for(lambda: not _sleepers(cluster3, "sleep 77"))

    proc = subprocess.Popen([sys.executable, "-m", "vtool", "run", "echo started; sleep 78"], cwd=cluster3.work,
                            env=cluster3.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    for _ in range(3):
        assert "started" in proc.stdout.readline()
    wait_for(lambda: len(_sleepers(cluster3, "sleep 78")) == 3)  # "started" is printed just before the sleep
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    wait_for(lambda: not _sleepers(cluster3, "sleep 78"))


def _guards(env: Env) -> int:
    """vtool's guard sessions on the nodes (ssh._Watch): shells whose command is the guard's."""
    from vtool.providers.local import _proc_cmdline, node_processes

    n = 0
    for i in range(3):
        meta = env.node_meta(i)
        for pid in node_processes(int(meta["pid"]), str(meta["token"])):
            if any(w.startswith("while read -r _; do :; done; kill -0 ") for w in _proc_cmdline(pid)):
                n += 1
    return n


def test_a_long_command_is_stopped_when_vtool_is_killed(cluster3: Env) -> None:
    """vtool killed outright (no Ctrl-C handling): a command that has run for GUARD_AFTER
    seconds has a guard on its node, whose stdin ends with vtool's side of the connection,
    and which then stops it. The wrapper's own line never reaches the output."""
    from vtool.ssh import GUARD_AFTER

    proc = subprocess.Popen([sys.executable, "-m", "vtool", "run", "echo note >&2; echo started; sleep 79"],
                            cwd=cluster3.work, env=cluster3.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    for _ in range(3):
        assert "started" in proc.stdout.readline()
    wait_for(lambda: len(_sleepers(cluster3, "sleep 79")) == 3)
    assert _guards(cluster3) == 0  # none yet: a short command never needs one
    time.sleep(GUARD_AFTER)
    wait_for(lambda: _guards(cluster3) == 3)
    proc.kill()
    _, err = proc.communicate(timeout=30)
    assert err.count("note") == 3 and "vtool-pgid" not in err and "\x1e" not in err, err
    wait_for(lambda: not _sleepers(cluster3, "sleep 79"))
    wait_for(lambda: _guards(cluster3) == 0)
    # A command that ends by itself takes its guard with it, and leaves what it started in
    # the background alone.
    r = cluster3.cli("run", "sleep 80 </dev/null >/dev/null 2>&1 & sleep 1.5; echo done", "--nodes", "0")
    assert r.returncode == 0 and "done" in r.stdout and "vtool-pgid" not in r.stdout + r.stderr, r.stderr
    wait_for(lambda: _guards(cluster3) == 0)
    left = _sleepers(cluster3, "sleep 80")
    assert len(left) == 1
    os.kill(left[0], signal.SIGKILL)



def test_a_closed_terminal_stops_the_command_as_ctrl_c_does(cluster3: Env) -> None:
    """SIGHUP (the terminal vtool ran in was closed) is Ctrl-C: the command stops on the
    nodes, in its first second too (no guard yet), and vtool exits 130."""
    proc = subprocess.Popen([sys.executable, "-m", "vtool", "run", "echo started; sleep 81"], cwd=cluster3.work,
                            env=cluster3.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    for _ in range(3):
        assert "started" in proc.stdout.readline()
    wait_for(lambda: len(_sleepers(cluster3, "sleep 81")) == 3)
    proc.send_signal(signal.SIGHUP)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    wait_for(lambda: not _sleepers(cluster3, "sleep 81"))

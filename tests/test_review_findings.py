"""Regression tests for what a review found: each failed before its fix."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from conftest import Env, close_shared_connections, make_package, wait_for


def test_a_remote_exit_255_is_the_commands_own_and_never_retried(cluster3: Env) -> None:
    cmd = 'echo x >> count; echo "ssh: connect to host h port 22: Connection refused" >&2; exit 255'
    r = cluster3.cli("run", cmd, "--nodes", "0")
    assert r.returncode == 1 and "exited 255" in r.stderr
    assert (cluster3.node_home(0) / "count").read_text() == "x\n"  # ran once
    r = cluster3.cli("run", 'echo "Host key verification failed." >&2; exit 255', "--nodes", "1")
    assert "does not match" not in r.stderr and "exited 255" in r.stderr


def test_run_into_a_closed_pipe_ends_quietly(cluster3: Env) -> None:
    r = cluster3.run_cmd(["sh", "-c", f"{sys.executable} -m vtool run 'seq 1 200000' | head -1"], timeout=60)
    assert r.returncode == 0
    assert r.stdout.startswith("[") and "Traceback" not in r.stderr


def test_concurrent_launches_get_distinct_indices(venv: Env) -> None:
    results: list[subprocess.CompletedProcess[str]] = []

    def one() -> None:
        results.append(venv.cli("launch", "1", "-c", "race"))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    doc = json.loads(venv.ok("status", "--json", "-c", "race").stdout)
    assert [n["index"] for n in doc[0]["nodes"]] == [0, 1, 2, 3]


def test_a_gitignored_launch_script_is_refused(cluster3: Env) -> None:
    pkg = make_package(cluster3.root, "gi", "#!/bin/sh\n", {".gitignore": "*\n!.gitignore\n"})
    r = cluster3.cli("inject", str(pkg))
    assert r.returncode == 2 and "excluded by a .gitignore" in r.stderr


def test_a_project_file_may_not_choose_programs(venv: Env) -> None:
    (venv.work / "vtool.yaml").write_text("ssh:\n  program: ./evil\n")
    r = venv.cli("status")
    assert r.returncode == 2 and "ssh.program names a program to run" in r.stderr
    (venv.work / "vtool.yaml").write_text("profiles:\n  x:\n    local:\n      sshd: ./evil\n")
    r = venv.cli("status")
    assert r.returncode == 2 and "profiles.x.local.sshd" in r.stderr


def test_local_nodes_are_repinned_from_their_own_key_never_trusted_on_first_use(cluster3: Env) -> None:
    kh = cluster3.vhome / "clusters" / "default" / "known_hosts"
    before = sorted(kh.read_text().splitlines())
    kh.write_text("")
    close_shared_connections()
    # Node 1 now presents another key: it must be refused, not pinned.
    key = cluster3.vhome / "clusters" / "default" / "nodes" / "1" / "ssh_host_ecdsa_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(cluster3.root / "k")], check=True)
    key.write_bytes((cluster3.root / "k").read_bytes())
    pkg = make_package(cluster3.root, "p", "#!/bin/sh\n")
    r = cluster3.cli("inject", str(pkg))
    assert r.returncode == 1 and "node 1: FAILED" in r.stderr and "does not match" in r.stderr
    assert sorted(kh.read_text().splitlines()) == before  # re-pinned from vtool's own files


def test_fetching_a_tree_wider_than_the_open_file_limit(cluster3: Env) -> None:
    cluster3.ok("run", "mkdir -p tree && cd tree && for i in $(seq 1100); do mkdir d$i; echo $i > d$i/f; done",
                "--nodes", "0")
    r = cluster3.run_cmd(["sh", "-c", f"ulimit -n 256 && exec {sys.executable} -m vtool scpget -r tree out"],
                         timeout=120)
    assert r.returncode == 0, r.stderr
    assert (cluster3.work / "out" / "d1100" / "f").read_text() == "1100\n"


def test_a_stuck_fetch_times_out_and_the_others_finish(cluster3: Env) -> None:
    from vtool.providers.local import _proc_cmdline, node_processes

    cluster3.ok("run", "head -c 200000000 /dev/zero > big.bin")
    proc = subprocess.Popen([sys.executable, "-m", "vtool", "scpgetall", "big.bin", "got"], cwd=cluster3.work,
                            env=dict(cluster3.env, VTOOL_TIMEOUT_TRANSFER="5"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    meta = cluster3.node_meta(1)

    def tar_of_node_1() -> list[int]:
        return [p for p in node_processes(int(meta["pid"]), str(meta["token"]))  # type: ignore[arg-type]
                if (_proc_cmdline(p) or [""])[0] == "tar"]

    import os
    import signal

    stopped = wait_for(tar_of_node_1, timeout=30)
    for p in stopped:
        os.kill(p, signal.SIGSTOP)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        for p in stopped:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert proc.returncode == 1 and "node 1: FAILED: timed out after 5s" in err
    assert Path(cluster3.work / "got.0").stat().st_size == 200000000


def test_put_follows_a_top_level_symlink_and_names_starting_with_a_dash(cluster3: Env) -> None:
    (cluster3.work / "real.txt").write_text("content\n")
    (cluster3.work / "link.txt").symlink_to("real.txt")
    from vtool import Cluster

    cluster3.ok("put", "link.txt", "plain.txt", "--nodes", "0")
    assert (cluster3.node_home(0) / "plain.txt").read_text() == "content\n"
    assert Cluster().put("link.txt", "-odd/remote.txt", nodes="0").ok  # the CLI reads "-odd" as an option
    got = cluster3.node_home(0) / "-odd" / "remote.txt"
    assert not got.is_symlink() and got.read_text() == "content\n"


def test_fetch_paths_with_tilde_dot_and_trailing_slash(cluster3: Env) -> None:
    cluster3.ok("run", "mkdir -p weird && echo w > weird/f.txt && ln -sfn weird link", "--nodes", "0")
    cluster3.ok("scpget", "~/weird/f.txt", "a.txt")
    assert (cluster3.work / "a.txt").read_text() == "w\n"
    cluster3.ok("scpget", "-r", "weird/.", "b")
    assert (cluster3.work / "b" / "f.txt").read_text() == "w\n"
    cluster3.ok("scpget", "-r", "link/", "c")
    assert (cluster3.work / "c" / "f.txt").read_text() == "w\n"

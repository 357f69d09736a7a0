"""The acceptance flow and every verb through the CLI, on real sshd nodes."""

from __future__ import annotations

import json
import os

from conftest import Env


def test_acceptance_flow_with_inv(venv: Env) -> None:
    """inv launch 2 && inv launch 1 && inv inject pkg-examples/hello && inv scpgetall ... out/r"""
    out = venv.work / "out"
    for args in (["launch", "2"], ["launch", "1"], ["inject", "pkg-examples/hello"]):
        r = venv.inv(*args)
        assert r.returncode == 0, r.stderr
    from conftest import wait_for

    wait_for(lambda: all((venv.node_home(i) / "hello-result.txt").exists() for i in range(3)))
    r = venv.inv("scpgetall", "hello-result.txt", str(out / "r"))
    assert r.returncode == 0, r.stderr
    for i in range(3):
        text = (out / f"r.{i}").read_text()
        assert f"node_index={i}\n" in text
        assert "node_count=3\n" in text
    status = json.loads(venv.ok("status", "--json").stdout)
    assert [n["index"] for n in status[0]["nodes"]] == [0, 1, 2]


def test_run_prefixes_output_and_summarises_exit_codes(cluster3: Env) -> None:
    r = cluster3.cli("run", "echo out-$VTOOL_NODE_INDEX; echo err-$VTOOL_NODE_INDEX >&2; exit $VTOOL_NODE_INDEX")
    assert r.returncode == 1
    assert sorted(ln for ln in r.stdout.splitlines() if ln.startswith("[")) == ["[0] out-0", "[1] out-1", "[2] out-2"]
    assert "[1] err-1" in r.stderr
    assert "1 ok, 2 failed" in r.stderr
    assert "failed on 2 of 3 node(s): 1, 2" in r.stderr
    ok = cluster3.ok("run", "true", "--nodes", "0,2")
    assert "2 ok, 0 failed" in ok.stderr


def test_put_scpget_and_folders(cluster3: Env) -> None:
    src = cluster3.work / "data"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("alpha\n")
    (src / "b.txt").write_text("beta\n")
    cluster3.ok("put", str(src), "inputs")
    cluster3.ok("put", str(src / "b.txt"), "single.txt", "--nodes", "1")
    r = cluster3.ok("run", "cat inputs/sub/a.txt inputs/b.txt")
    assert r.stdout.count("alpha") == 3 and r.stdout.count("beta") == 3
    assert (cluster3.node_home(1) / "single.txt").read_text() == "beta\n"
    assert not (cluster3.node_home(0) / "single.txt").exists()

    cluster3.ok("run", "echo node-$VTOOL_NODE_INDEX > mine.txt")
    cluster3.ok("scpget", "mine.txt")  # node 0, into the current folder
    assert (cluster3.work / "mine.txt").read_text() == "node-0\n"
    cluster3.ok("scpget", "mine.txt", "got2.txt", "--node", "2")
    assert (cluster3.work / "got2.txt").read_text() == "node-2\n"
    r = cluster3.cli("scpget", "inputs", "x")
    assert r.returncode != 0 and "use -r" in r.stderr
    cluster3.ok("scpgetall", "inputs", "back", "-r")
    for i in range(3):
        assert (cluster3.work / f"back.{i}" / "sub" / "a.txt").read_text() == "alpha\n"
    r = cluster3.cli("scpgetall", "no-such-file", "zz")
    assert r.returncode == 1 and "no such file" in r.stderr
    assert not list(cluster3.work.glob("zz*"))


def test_status_logs_and_mkpkg_archive(cluster3: Env) -> None:
    from conftest import make_package, wait_for

    pkg = make_package(cluster3.root, "chatty", "#!/bin/sh\necho line-one\necho line-two >&2\nexit 3\n")
    archive = cluster3.work / "chatty.tar.gz"
    r = cluster3.ok("mkpkg", str(pkg), "--output", str(archive))
    assert archive.exists() and str(archive) in r.stdout
    cluster3.ok("inject", str(archive))

    def exited() -> list[dict[str, object]] | None:
        doc = json.loads(cluster3.ok("status", "--json").stdout)
        nodes = doc[0]["nodes"]
        return nodes if all(n["launch"] == "exited" for n in nodes) else None

    nodes = wait_for(exited)
    assert all(n["exit_code"] == 3 and str(n["release"]).startswith("chatty-") for n in nodes)
    assert all(n["state"] == "running" and n["reachable"] for n in nodes)
    text = cluster3.ok("status").stdout
    assert "exited 3" in text and "cluster default (local)" in text
    logs = cluster3.ok("logs").stdout.splitlines()
    for i in range(3):
        assert f"[{i}] line-one" in logs and f"[{i}] line-two" in logs


def test_ssh_config_works_with_openssh_and_pinned_keys(cluster3: Env) -> None:
    cfg = cluster3.work / "cluster.ssh"
    cluster3.ok("ssh-config", "--output", str(cfg))
    r = cluster3.run_cmd(["ssh", "-F", str(cfg), "-o", "BatchMode=yes", "default-2", "echo $HOME"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(cluster3.node_home(2))
    assert not (cluster3.home / ".ssh" / "known_hosts").exists()  # the user's own file is never touched


def test_connect_gives_an_interactive_shell_on_the_node(cluster3: Env) -> None:
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vtool", "connect", "1"], stdin=slave, stdout=slave, stderr=slave,
        env=cluster3.env, cwd=cluster3.work, start_new_session=True,
    )
    os.close(slave)
    os.write(master, b"echo tty=$(tty) idx=$(cat .vtool/cluster.env 2>/dev/null | grep -c .) home=$HOME; exit\n")
    seen = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    proc.wait(10)
    text = seen.decode(errors="replace")
    assert "tty=/dev/pts/" in text
    assert f"home={cluster3.node_home(1)}" in text
    assert proc.returncode == 0


def test_terminate_asks_then_is_idempotent(cluster3: Env) -> None:
    r = cluster3.cli("terminate")
    assert r.returncode == 2 and "--yes" in r.stderr
    assert len(json.loads(cluster3.ok("status", "--json").stdout)[0]["nodes"]) == 3
    pids = [int(cluster3.node_meta(i)["pid"]) for i in range(3)]
    cluster3.ok("terminate", "--yes")
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    again = cluster3.ok("terminate", "--yes")
    assert "nothing to terminate" in again.stdout
    assert json.loads(cluster3.ok("status", "--json").stdout) == []


def test_named_clusters_side_by_side(venv: Env) -> None:
    venv.ok("launch", "1", "--cluster", "alpha")
    venv.ok("launch", "2", extra_env={"VTOOL_CLUSTER": "beta"})
    both = json.loads(venv.ok("status", "--json").stdout)
    assert {c["cluster"]: len(c["nodes"]) for c in both} == {"alpha": 1, "beta": 2}
    only = json.loads(venv.ok("status", "--json", extra_env={"VTOOL_CLUSTER": "beta"}).stdout)
    assert [c["cluster"] for c in only] == ["beta"]
    r = venv.ok("run", "echo $VTOOL_CLUSTER-$VTOOL_NODE_INDEX", "-c", "beta")
    assert sorted(ln for ln in r.stdout.splitlines() if ln.startswith("[")) == ["[0] beta-0", "[1] beta-1"]
    venv.ok("terminate", "--yes", "-c", "alpha")
    assert [c["cluster"] for c in json.loads(venv.ok("status", "--json").stdout)] == ["beta"]

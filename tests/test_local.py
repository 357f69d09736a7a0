"""The local provider's promises: 127.0.0.1 only, private keys, PID checks, the Python API."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

from conftest import Env, close_shared_connections, wait_for


def test_missing_sshd_is_one_line_saying_how_to_install(venv: Env) -> None:
    r = venv.cli("launch", "2", extra_env={"VTOOL_LOCAL_SSHD": "/nonexistent/sshd"})
    assert r.returncode == 3
    assert r.stderr.strip().splitlines() == [
        "vtool: sshd not found: the local provider runs each node as an OpenSSH server; install it "
        "(Debian/Ubuntu: sudo apt-get install openssh-server) or set local.sshd in vtool.yaml"
    ]
    assert not (venv.vhome / "clusters").exists()


def test_nodes_listen_on_loopback_only(cluster3: Env) -> None:
    ports = {int(cluster3.node_meta(i)["port"]) for i in range(3)}
    listening = {}
    for line in open("/proc/net/tcp").read().splitlines()[1:] + open("/proc/net/tcp6").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, port = local.rsplit(":", 1)
        if state == "0A" and int(port, 16) in ports:
            listening.setdefault(int(port, 16), set()).add(addr)
    assert set(listening) == ports
    assert all(addrs == {"0100007F"} for addrs in listening.values()), listening


def test_keys_are_private_even_under_umask_000(venv: Env) -> None:
    r = venv.run_cmd(["sh", "-c", f"umask 000 && exec {sys.executable} -m vtool launch 1"])
    assert r.returncode == 0, r.stderr
    c = venv.vhome / "clusters" / "default"
    for path, mode in ((venv.vhome, 0o700), (c, 0o700), (c / "id_ed25519", 0o600), (c / "known_hosts", 0o600),
                       (c / "nodes" / "0" / "ssh_host_ecdsa_key", 0o600)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    os.chmod(c / "id_ed25519", 0o644)
    r = venv.cli("launch", "1")
    assert r.returncode == 2 and "is readable by other users" in r.stderr and "chmod 600" in r.stderr


def test_terminate_never_signals_a_reused_pid(venv: Env) -> None:
    venv.ok("launch", "1")
    meta_file = venv.vhome / "clusters" / "default" / "nodes" / "0" / "node.json"
    meta = json.loads(meta_file.read_text())
    real = int(meta["pid"])
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        meta["pid"] = bystander.pid  # as if the sshd died and its PID went to another program
        meta_file.write_text(json.dumps(meta))
        status = json.loads(venv.ok("status", "--json").stdout)
        assert status[0]["nodes"][0]["state"] == "dead"
        venv.ok("terminate", "--yes")
        assert bystander.poll() is None, "terminate signalled a process that is not the node's sshd"
    finally:
        bystander.kill()
        bystander.wait()
        os.kill(real, 9)


def test_python_api_and_fabric_connection(venv: Env) -> None:
    from vtool import Cluster

    c = Cluster("api-demo")
    launched = c.launch(2)
    assert [n.index for n in launched.new] == [0, 1] and launched.ready.ok
    result = c.run("echo $VTOOL_NODE_NAME")
    assert [r.value.stdout.strip() for r in result] == ["api-demo-0", "api-demo-1"]
    conn = c.connection(1)
    try:
        out = conn.run("echo $HOME", hide=True, in_stream=False)
        assert out.stdout.strip() == str(venv.node_home(1, "api-demo"))
    finally:
        conn.close()
    (venv.work / "in.txt").write_text("data\n")
    assert c.put("in.txt", "in.txt").ok
    fetched = c.get_all("in.txt", "copies/in")
    assert fetched.ok and (venv.work / "copies" / "in.1").read_text() == "data\n"
    st = c.status()
    assert st is not None and [ns.node.index for ns in st.nodes] == [0, 1]
    assert c.terminate().ok
    assert c.nodes() == ()


def test_fabric_connection_refuses_an_unpinned_host_key(venv: Env) -> None:
    import paramiko
    import pytest

    from vtool import Cluster

    c = Cluster()
    c.launch(1)
    kh = venv.vhome / "clusters" / "default" / "known_hosts"
    kh.write_text("")  # the node's key is no longer pinned
    conn = c.connection(0)
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        conn.run("true", hide=True, in_stream=False)
    conn.close()
    assert kh.read_text() == ""


def _negotiated_kex(argv: list[str]) -> str:
    """Run vtool's ssh command line as a connection of its own (no shared one), verbosely, and
    return the key exchange it agreed on."""
    shared = ("ControlMaster=", "ControlPath=", "ControlPersist=", "LogLevel=")
    own: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "-o" and argv[i + 1].startswith(shared):
            i += 2
            continue
        if argv[i] != "-tt":
            own.append(argv[i])
        i += 1
    own.insert(1, "-v")
    r = subprocess.run(own, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    for line in r.stderr.splitlines():
        if "kex: algorithm:" in line:
            return line.split("kex: algorithm:", 1)[1].strip()
    raise AssertionError(f"ssh -v named no key exchange:\n{r.stderr[-2000:]}")


def test_connections_take_the_first_key_exchange_a_node_offers(venv: Env) -> None:
    """The default ``ssh.kex`` puts the cheapest first (OpenSSL's P-256); a node that does not
    offer it is still reached, with the next one (curve25519)."""
    from vtool import Cluster
    from vtool.api import ssh_argv
    from vtool.config import VTOOL_DEFAULTS

    first, second = VTOOL_DEFAULTS["ssh"]["kex"].split(",")[:2]
    assert (first, second) == ("ecdh-sha2-nistp256", "curve25519-sha256")
    c = Cluster()
    c.launch(2)
    assert _negotiated_kex(ssh_argv(0, settings=c.settings, command="true")) == first
    # (node 1's command line is made while its sshd runs: while it starts again, nothing
    # listens on its port, and vtool calls such a node dead)
    argv = ssh_argv(1, settings=c.settings, command="true")
    # node 1's sshd now offers curve25519 only (SIGHUP: sshd starts again with its config)
    node = venv.vhome / "clusters" / "default" / "nodes" / "1"
    with open(node / "sshd_config", "a") as f:
        f.write(f"KexAlgorithms {second}\n")
    os.kill(int((node / "sshd.pid").read_text()), signal.SIGHUP)

    def agreed_on_second() -> bool:
        # (until sshd has started again: the old one still offers P-256, or nothing listens)
        try:
            return _negotiated_kex(argv) == second
        except AssertionError:
            return False

    wait_for(agreed_on_second)
    close_shared_connections()  # vtool's own: opened again, to node 1 too
    r = venv.cli("run", "--nodes", "1", "echo reached")
    assert r.returncode == 0 and "reached" in r.stdout, r.stderr
    assert c.terminate().ok


def test_a_first_contact_pins_the_preferred_host_key_of_those_a_node_offers(venv: Env) -> None:
    """A cloud node's first contact (trust on first use) pins its ECDSA P-256 key when it offers
    ed25519 too (``ssh.hostkeys``); with ``ssh.hostkeys: ""``, OpenSSH's own order (ed25519)."""
    import dataclasses

    from vtool import Cluster
    from vtool.api import Session
    from vtool.config import VTOOL_DEFAULTS

    c = Cluster()
    c.launch(1)
    node = venv.vhome / "clusters" / "default" / "nodes" / "0"
    ed25519 = node / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ed25519)], check=True)
    with open(node / "sshd_config", "a") as f:
        f.write(f"HostKey {ed25519}\n")
    os.kill(int((node / "sshd.pid").read_text()), signal.SIGHUP)
    ecdsa_pub = " ".join((node / "ssh_host_ecdsa_key.pub").read_text().split()[:2])
    ed25519_pub = " ".join((node / "ssh_host_ed25519_key.pub").read_text().split()[:2])
    port = str(venv.node_meta(0)["port"])

    def offers_both() -> bool:  # (once sshd has started again with the second key)
        r = subprocess.run(["ssh-keyscan", "-p", port, "-t", "ecdsa,ed25519", "127.0.0.1"],
                           capture_output=True, text=True, timeout=30)
        return ecdsa_pub in r.stdout and ed25519_pub in r.stdout

    wait_for(offers_both)

    def first_contact(hostkeys: str) -> list[str]:
        settings = c.settings.replace(ssh=dataclasses.replace(c.settings.ssh, hostkeys=hostkeys))
        s = Session(settings)
        return s.client(s.existing().nodes[0]).first_contact(timeout=10)

    assert c.settings.ssh.hostkeys == VTOOL_DEFAULTS["ssh"]["hostkeys"]
    assert VTOOL_DEFAULTS["ssh"]["hostkeys"].startswith("ecdsa-sha2-nistp256,ssh-ed25519,")
    assert first_contact(c.settings.ssh.hostkeys) == [ecdsa_pub]
    assert first_contact("") == [ed25519_pub]
    assert c.terminate().ok


def test_new_nodes_have_an_ecdsa_host_key_and_older_ed25519_nodes_still_start(venv: Env) -> None:
    """ECDSA (P-256) host keys for the nodes launched now; a node made by an older vtool keeps
    its ed25519 key: it starts with it, and vtool pins and checks that one."""
    venv.ok("launch", "2")
    nodes = venv.vhome / "clusters" / "default" / "nodes"
    kh = venv.vhome / "clusters" / "default" / "known_hosts"
    assert (nodes / "0" / "ssh_host_ecdsa_key.pub").read_text().startswith("ecdsa-sha2-nistp256 ")
    assert "vtool-default-0 ecdsa-sha2-nistp256 " in kh.read_text()
    venv.ok("stop", "--nodes", "1")
    # node 1 as an older vtool made it: an ed25519 key, pinned
    for name in ("ssh_host_ecdsa_key", "ssh_host_ecdsa_key.pub"):
        (nodes / "1" / name).unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(nodes / "1" / "ssh_host_ed25519_key")],
                   check=True)
    old = " ".join((nodes / "1" / "ssh_host_ed25519_key.pub").read_text().split()[:2])
    kh.write_text("".join(line + "\n" for line in kh.read_text().splitlines() if not line.startswith("vtool-default-1 "))
                  + f"vtool-default-1 {old}\n")
    venv.ok("start", "--nodes", "1")
    r = venv.ok("run", "echo up")
    assert r.stdout.count("up") == 2
    venv.ok("stop", "--nodes", "1")
    kh.write_text("")  # started again, it is pinned from its own (ed25519) key file
    venv.ok("start", "--nodes", "1")
    assert f"vtool-default-1 {old}\n" in kh.read_text()
    r = venv.ok("run", "--nodes", "1", "echo again")
    assert "again" in r.stdout
    venv.ok("terminate", "--yes")

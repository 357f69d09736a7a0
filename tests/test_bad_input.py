"""Bad input: one line on stderr, a non-zero exit, no traceback, nothing launched or changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import Env, make_package, pids_whose_cmdline_has


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "cm"]  # shared-connection sockets come and go
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _sshd_count(vhome: Path) -> int:
    """sshd processes serving nodes under this test's VTOOL_HOME."""
    return len(pids_whose_cmdline_has("sshd", str(vhome)))


def refused(env: Env, *args: str, code: int, says: str, extra_env: dict[str, str] | None = None) -> str:
    before_files, before_sshd = _snapshot(env.vhome), _sshd_count(env.vhome)
    r = env.cli(*args, extra_env=extra_env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert says in lines[0], lines[0]
    assert _snapshot(env.vhome) == before_files, "bad input changed vtool's state"
    assert _sshd_count(env.vhome) == before_sshd, "bad input started or stopped a node"
    return lines[0]


@pytest.mark.parametrize(
    ("count", "says"),
    [("0", "between 1 and 1000 nodes, not 0"), ("-1", "between 1 and 1000 nodes, not -1"),
     ("abc", "whole number of nodes, not 'abc'"), ("1001", "not 1001")],
)
def test_bad_launch_counts(venv: Env, count: str, says: str) -> None:
    refused(venv, "launch", count, code=2, says=says)
    assert not (venv.vhome / "clusters").exists()


@pytest.mark.parametrize(
    ("yaml_text", "says"),
    [
        ("cluster: [unclosed\n", "not valid YAML"),
        ("clustr: demo\n", "unknown setting 'clustr'"),
        ("timeout:\n  ready: soon\n", "timeout.ready must be a whole number"),
        ("concurrency: -3\n", "concurrency must not be negative"),
        ("- a\n- b\n", "must hold a mapping"),
        ("profiles:\n  big:\n    home: /x\n", "unknown setting 'profiles.big.home'"),
        ("cluster: Bad_Name\n", "invalid cluster name"),
    ],
)
def test_bad_config_file(venv: Env, yaml_text: str, says: str) -> None:
    (venv.work / "vtool.yaml").write_text(yaml_text)
    line = refused(venv, "launch", "2", code=2, says=says)
    if "cluster name" not in line:
        assert "vtool.yaml" in line
    assert not (venv.vhome / "clusters").exists()


@pytest.mark.parametrize(
    ("yaml_text", "says"),
    [
        ("ssh:\n  kex: curve25519-sha256,curve-typo\n", "ssh.kex: this OpenSSH client does not know 'curve-typo'"),
        ("ssh:\n  ciphers: aes999-gcm\n", "ssh.ciphers: this OpenSSH client does not know 'aes999-gcm'"),
        ("ssh:\n  hostkeys: '+ssh-ed2559'\n", "ssh.hostkeys: this OpenSSH client does not know 'ssh-ed2559'"),
    ],
)
def test_an_algorithm_ssh_does_not_know_is_refused_before_launching(venv: Env, yaml_text: str, says: str) -> None:
    """A typo in an algorithm list would otherwise fail on every node after it was made (on
    EC2: instances paid for, then terminated)."""
    (venv.work / "vtool.yaml").write_text(yaml_text)
    line = refused(venv, "launch", "2", code=2, says=says)
    assert "-Q" in line
    assert not (venv.vhome / "clusters").exists()


def test_config_file_not_utf8(venv: Env) -> None:
    (venv.work / "vtool.yaml").write_bytes(b"cluster: caf\xe9\n")  # Latin-1, as an old editor saves it
    line = refused(venv, "launch", "2", code=2, says="not valid YAML (not UTF-8 text)")
    assert "vtool.yaml" in line
    assert not (venv.vhome / "clusters").exists()


def test_bad_environment_and_flags(venv: Env) -> None:
    refused(venv, "launch", "1", code=2, says="VTOOL_CONCURRENCY must be a whole number", extra_env={"VTOOL_CONCURRENCY": "lots"})
    refused(venv, "launch", "1", code=2, says="VTOOL_DEBUG must be true or false", extra_env={"VTOOL_DEBUG": "maybe"})
    refused(venv, "launch", "1", "--cluster", "Bad_Name", code=2, says="invalid cluster name 'Bad_Name'")
    refused(venv, "launch", "1", "--profile", "nope", code=2, says="unknown profile 'nope'")
    refused(venv, "launch", "1", code=2, says="unknown provider 'cloud9'", extra_env={"VTOOL_PROVIDER": "cloud9"})
    refused(venv, "launch", "1", "--ready-timeout", "x", code=2, says="--ready-timeout needs a number")
    assert not (venv.vhome / "clusters").exists()


def test_bad_packages(cluster3: Env) -> None:
    node_files = _snapshot(cluster3.node_home(0))
    refused(cluster3, "inject", "no/such/folder", code=2, says="no/such/folder: no such folder or file")
    empty = cluster3.root / "empty"
    empty.mkdir()
    refused(cluster3, "inject", str(empty), code=2, says="has no launch script")
    noexec = make_package(cluster3.root, "noexec", "#!/bin/sh\n", mode=0o644)
    refused(cluster3, "inject", str(noexec), code=2, says="is not executable: run `chmod +x")
    junk = cluster3.work / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    refused(cluster3, "inject", str(junk), code=2, says="not a readable package archive")
    zipfile = cluster3.work / "pkg.zip"
    zipfile.write_bytes(b"PK")
    refused(cluster3, "inject", str(zipfile), code=2, says="a package is a folder or a .tar.gz")
    refused(cluster3, "inject", code=1, says="did not receive required positional arguments")
    # An archive whose gzip checksum is wrong (tar itself stops reading before it).
    good = make_package(cluster3.root, "crc", "#!/bin/sh\ntrue\n", {"a.txt": "a" * 5000})
    bad = cluster3.work / "crc.tar.gz"
    cluster3.ok("mkpkg", str(good), "--output", str(bad))
    data = bytearray(bad.read_bytes())
    data[-8] ^= 0xFF  # (the CRC32 of gzip's trailer)
    bad.write_bytes(bytes(data))
    refused(cluster3, "inject", str(bad), code=2, says="the package archive is damaged")
    assert _snapshot(cluster3.node_home(0)) == node_files


def test_unknown_nodes_and_clusters(cluster3: Env) -> None:
    refused(cluster3, "connect", "7", code=4, says="no node 7 in this cluster (nodes: 0,1,2)")
    refused(cluster3, "scpget", "x", "--node", "9", code=4, says="no node 9")
    refused(cluster3, "run", "true", "--nodes", "1,5-6", code=4, says="no node 5 in this cluster")
    refused(cluster3, "run", "true", "--nodes", "0-999999999999", code=4, says="no node 999999999999")
    refused(cluster3, "scpget", "x", "--node", "1-2", code=2, says="give one node index")
    refused(cluster3, "run", "true", "--nodes", "a-b", code=2, says="invalid node list 'a-b'")
    refused(cluster3, "terminate", "--nodes", "8", "--yes", code=4, says="no node 8")
    refused(cluster3, "run", "true", "--cluster", "nope", code=4, says="no cluster named 'nope' (clusters: default)")
    refused(cluster3, "status", "--cluster", "nope", code=4, says="no cluster named 'nope'")
    refused(cluster3, "scpgetall", "x", "--cluster", "nope", code=4, says="no cluster named 'nope'")
    pkg = make_package(cluster3.root, "fine", "#!/bin/sh\n")
    refused(cluster3, "inject", str(pkg), "--cluster", "nope", code=4, says="no cluster named 'nope'")
    refused(cluster3, "run", "  ", code=2, says="run needs a command")
    refused(cluster3, "scpget", "..", code=2, says="cannot name a local file after '..'")


def test_bad_numbers_in_flags(cluster3: Env) -> None:
    refused(cluster3, "scpget", "x", "--node", "abc", code=2, says="give one node index, not 'abc'")
    refused(cluster3, "logs", "--lines", "many", code=2, says="--lines needs a number")


def test_invoke_runner_options_are_not_vtool_options(venv: Env) -> None:
    for opt in ("--dry", "--echo", "--pty", "-f"):
        r = venv.cli(opt, "launch", "1")
        assert r.returncode != 0 and "No idea what" in r.stderr and "Traceback" not in r.stderr
    assert not (venv.vhome / "clusters").exists()


def test_local_nodes_refuse_another_login_user(venv: Env) -> None:
    refused(venv, "launch", "1", code=3, says="local nodes run as you", extra_env={"VTOOL_SSH_USER": "nobody"})
    assert not (venv.vhome / "clusters").exists()


def test_mkpkg_output_names(venv: Env) -> None:
    pkg = make_package(venv.root, "tool", "#!/bin/sh\n")
    refused(venv, "mkpkg", str(pkg), "--output", "x.zip", code=2, says="name it NAME.tar.gz")
    r = venv.ok("mkpkg", str(pkg), "--output", "dist/")
    assert (venv.work / "dist" / "tool.tar.gz").is_file() and "dist/tool.tar.gz" in r.stdout
    venv.ok("mkpkg", str(pkg), "--output", "deep/er/t.tgz")
    assert (venv.work / "deep" / "er" / "t.tgz").is_file()

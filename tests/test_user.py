"""The local provider works for an ordinary (non-root) user too."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stop_all_nodes

USER = "vtool-test-user"


def _readable_copy(dest: Path) -> Path:
    """vtool and its pure-Python dependencies copied where any user can read them (the
    repository or its venv may sit in a folder private to root)."""
    import importlib.util

    lib = dest / "pylib"
    for name in ("vtool", "invoke", "pluggy", "yaml"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations
        shutil.copytree(list(spec.submodule_search_locations)[0], lib / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, dirnames, filenames in os.walk(dest):
        for n in dirnames:
            os.chmod(os.path.join(dirpath, n), 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    return lib


def _python_for(user: str, env: dict[str, str], lib: Path) -> str | None:
    for py in (sys.executable, "/usr/bin/python3"):
        r = subprocess.run(["runuser", "-u", user, "--", py, "-c", "import vtool.main"],
                           env=dict(env, PYTHONPATH=str(lib)), capture_output=True, text=True, check=False)
        if r.returncode == 0:
            return py
    return None


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a test user (as a user, every other test covers it)")
def test_ordinary_user_launch_run_fetch_terminate() -> None:
    if shutil.which("runuser") is None or shutil.which("useradd") is None:
        pytest.skip("runuser/useradd not available")
    created = False
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True)
        pw = pwd.getpwnam(USER)
        created = True
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="vtool-user-test-", dir="/tmp"))  # pytest's tmp is private to root
    os.chmod(base, 0o755)
    for d in ("vh", "work"):
        (base / d).mkdir()
    for p in (base, base / "vh", base / "work"):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": pw.pw_dir, "VTOOL_HOME": str(base / "vh"),
           "LANG": "C.UTF-8"}
    lib = _readable_copy(base / "code")
    py = _python_for(USER, env, lib)
    if py is None:
        pytest.skip(f"no Python interpreter that {USER} may run")
    env["PYTHONPATH"] = str(lib)

    def vtool(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", USER, "--", py, "-m", "vtool", *args], env=env, cwd=base / "work",
                              capture_output=True, text=True, timeout=120, check=False)

    try:
        r = vtool("launch", "2")
        assert r.returncode == 0, r.stderr
        r = vtool("run", "id -un; echo $HOME")
        assert r.returncode == 0, r.stderr
        assert r.stdout.count(f"] {USER}") == 2
        assert f"[1] {base}/vh/clusters/default/nodes/1/home" in r.stdout
        for meta in (base / "vh").glob("clusters/default/nodes/*/node.json"):
            pid = json.loads(meta.read_text())["pid"]
            assert os.stat(f"/proc/{pid}").st_uid == pw.pw_uid  # the node's sshd runs as the user
        key = base / "vh" / "clusters" / "default" / "id_ed25519"
        assert key.stat().st_uid == pw.pw_uid and (key.stat().st_mode & 0o777) == 0o600
        r = vtool("run", "echo hi-$VTOOL_NODE_INDEX > r.txt")
        r = vtool("scpgetall", "r.txt", "out/r")
        assert r.returncode == 0, r.stderr
        assert (base / "work" / "out" / "r.1").read_text() == "hi-1\n"
        r = vtool("terminate", "--yes")
        assert r.returncode == 0, r.stderr
        assert not list((base / "vh").glob("clusters/default/nodes/*"))
    finally:
        survivors = stop_all_nodes(base / "vh")
        shutil.rmtree(base, ignore_errors=True)
        if created:  # leave the machine's users as they were
            subprocess.run(["userdel", "--remove", USER], capture_output=True, check=False)
        assert not survivors

"""The acceptance flow and every verb through the CLI, on real sshd nodes."""

from __future__ import annotations

import json

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

"""The provider contract, run against the local provider and against EC2 (moto + real sshd)."""

from __future__ import annotations

import json

import pytest
from conftest import Env


@pytest.fixture(params=["local", "ec2"])
def env(request: pytest.FixtureRequest) -> Env:
    if request.param == "local":
        return request.getfixturevalue("venv")  # type: ignore[no-any-return]
    return request.getfixturevalue("backed").env  # type: ignore[no-any-return]


def _indices(env: Env) -> list[int]:
    doc = json.loads(env.ok("status", "--json", "-c", "default").stdout)
    return [n["index"] for n in doc[0]["nodes"]]


def test_provider_contract(env: Env) -> None:
    env.ok("launch", "2")
    env.ok("launch", "1")
    assert _indices(env) == [0, 1, 2]
    env.ok("terminate", "--nodes", "1", "--yes")
    assert _indices(env) == [0, 2]
    env.ok("launch", "1")
    assert _indices(env) == [0, 2, 3]
    r = env.ok("run", "echo idx=$VTOOL_NODE_INDEX count=$VTOOL_NODE_COUNT")
    assert sorted(ln for ln in r.stdout.splitlines() if ln.startswith("[")) == [
        "[0] idx=0 count=3", "[2] idx=2 count=3", "[3] idx=3 count=3"]

    env.ok("run", "echo kept > kept.txt")
    env.ok("stop", "--nodes", "2")
    doc = json.loads(env.ok("status", "--json", "-c", "default").stdout)
    assert {n["index"]: n["state"] for n in doc[0]["nodes"]}[2] == "stopped"
    env.ok("start", "--nodes", "2")
    r = env.ok("run", "cat kept.txt", "--nodes", "2")
    assert "[2] kept" in r.stdout  # the disk survived

    env.ok("terminate", "--yes")
    assert json.loads(env.ok("status", "--json").stdout) == []
    again = env.ok("terminate", "--yes")
    assert "nothing to terminate" in again.stdout

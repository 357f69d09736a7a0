"""A test plugin for EC2 instances made on the moto server, through ``vtool_node_address``.

moto's instance addresses (54.x, 10.x) must never be contacted from the tests: with
``VTOOL_TEST_BACKING=refuse`` every instance maps to a closed port on 127.0.0.1 (SSH fails at
once, on loopback); with ``VTOOL_TEST_BACKING=sshd`` every instance is backed by a real local
sshd node, so the whole flow (launch on the EC2 API, inject, run, scpgetall, terminate) runs
for real over SSH, with first-contact host-key pinning, while moto plays EC2."""

from __future__ import annotations

import fcntl
import os
from typing import Any

from vtool import hookimpl

CLOSED_PORT = 9  # discard: nothing listens there on the test machines


@hookimpl
def vtool_node_address(node: Any, settings: Any) -> tuple[str, int] | None:
    if node.provider != "ec2":
        return None
    if os.environ.get("VTOOL_TEST_BACKING", "refuse") != "sshd":
        return ("127.0.0.1", CLOSED_PORT)
    from vtool.providers.local import LocalProvider
    from vtool.state import ClusterPaths, ensure_private_dir

    backing = f"bk-{node.cluster}"
    paths = ClusterPaths(settings.home, backing)
    ensure_private_dir(settings.home)
    with open(settings.home / ".backing.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        local = LocalProvider(settings)
        have = {n.index: n for n in local.nodes(backing) if n.state == "running"}
        back = have.get(node.index) or local.launch(backing, [node.index], lambda _m: None)[0]
        # The backing sshd accepts the EC2 cluster's key, as the instance would.
        pub = ClusterPaths(settings.home, node.cluster).pubkey.read_text()
        (paths.nodes / str(node.index) / "authorized_keys").write_text(pub)
    return ("127.0.0.1", back.port)


@hookimpl
def vtool_peer_address(node: Any, settings: Any) -> tuple[str, int] | None:
    """The nodes reach each other at the backing sshd too (never at moto's 10.x addresses)."""
    return vtool_node_address(node, settings)

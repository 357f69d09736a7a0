"""A vtool plugin for the benchmark's byte counts (workload 6): route vtool's own SSH
connections to the nodes through the bench's byte-counting TCP forwarders.

bench.py copies this module, with a ``*.dist-info/entry_points.txt`` naming it in the
``vtool`` group, into a folder of its temp directory and puts that folder on PYTHONPATH only
for the vtool commands whose bytes it counts. Even then it does nothing unless
``VTOOL_BENCH_PROXY_PORTS`` names a JSON file ``{"cluster": NAME, "ports": {INDEX: PORT}}``.

Only the client's connections move (``vtool_node_address``): host keys are still checked
through ``HostKeyAlias``, and the nodes still reach each other at their real ports
(``vtool_peer_address`` is not implemented), so node-to-node relay traffic is not counted
as the client's.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vtool import hookimpl


@hookimpl
def vtool_node_address(node: Any, settings: Any) -> tuple[str, int] | None:
    path = os.environ.get("VTOOL_BENCH_PROXY_PORTS")
    if not path:
        return None
    with open(path) as f:
        table = json.load(f)
    port = table["ports"].get(str(node.index))
    if node.cluster != table["cluster"] or port is None:
        return None
    return ("127.0.0.1", int(port))

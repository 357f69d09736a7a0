"""The Python peers of the benchmark, one small function each, run as a child process of
bench.py so that their wall time, CPU time and memory are measured like a command's:

    python bench/peers.py TOOL ACTION CLUSTER_JSON [ARG]

TOOL is ``pssh`` (parallel-ssh's ParallelSSHClient), ``fabric`` (Fabric's ThreadingGroup,
used directly) or ``vtool-api`` (vtool's own Python API, for the in-process rows). ACTION is
``run`` (``hostname`` once), ``run2`` (``hostname`` twice on the same client; the second
command's wall time is printed as ``SECOND <seconds>``), ``get`` (fetch ARG from every node
into the folder given as the 4th argument), ``put`` (upload the tarball ARG to every node as
``DIR.tar.gz`` in its home and unpack it into ``~/DIR``, DIR being the 4th argument: what
these tools do instead of ``vtool inject``) or ``exit`` (run the command ARG once and print
its exit code, for ``run true`` on many nodes).

CLUSTER_JSON is written by bench.py: the nodes' aliases and ports, the cluster key, a
known_hosts file translated to ``[127.0.0.1]:PORT`` names, and the pinned host keys.

Every tool prints one line per node that answered, ``<alias> <output>``, and bench.py checks
that all N are there. Failures are printed as ``FAIL <alias> <reason>`` and never hidden.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def _nodes(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return list(cluster["nodes"])


# -- parallel-ssh -----------------------------------------------------------------------


def _pssh_client(cluster: dict[str, Any]) -> Any:
    from pssh.clients import ParallelSSHClient
    from pssh.config import HostConfig

    nodes = _nodes(cluster)
    return ParallelSSHClient(
        ["127.0.0.1"] * len(nodes),
        host_config=[HostConfig(port=n["port"], alias=n["alias"]) for n in nodes],
        user=cluster["user"],
        pkey=cluster["key"],
        allow_agent=False,
        pool_size=len(nodes),
        num_retries=1,
        timeout=60,
    )


def _pssh_check_host_keys(client: Any, cluster: dict[str, Any]) -> None:
    """parallel-ssh has no known_hosts option: it accepts any host key. The least we can do
    is compare each key it saw with the pinned one after connecting, and fail the node."""
    import base64

    for i, node in enumerate(_nodes(cluster)):
        host_client = client._host_clients.get((i, "127.0.0.1"))
        if host_client is None or host_client.session is None:
            continue  # never connected: already reported
        key, _ = host_client.session.hostkey()
        if base64.b64encode(key).decode() != node["hostkey"]:
            print(f"FAIL {node['alias']} host key differs from the pinned one", flush=True)


def pssh_run(cluster: dict[str, Any], times: int) -> None:
    client = _pssh_client(cluster)
    for i in range(times):
        t0 = time.perf_counter()
        output = client.run_command("hostname", stop_on_errors=False, read_timeout=60)
        client.join(output, timeout=60)
        seconds = time.perf_counter() - t0
        for host_out in output:
            if host_out.exception is not None:
                print(f"FAIL {host_out.alias} {type(host_out.exception).__name__}: {host_out.exception}", flush=True)
            elif i == times - 1:
                lines = list(host_out.stdout or [])
                print(f"{host_out.alias} {' '.join(lines)}", flush=True)
        if i == 1:
            print(f"SECOND {seconds:.6f}", flush=True)
    _pssh_check_host_keys(client, cluster)


def pssh_get(cluster: dict[str, Any], remote: str, dest: str) -> None:
    from gevent import joinall

    client = _pssh_client(cluster)
    nodes = _nodes(cluster)
    greenlets = client.copy_remote_file(
        remote, os.path.join(dest, "r.%(index)s"), copy_args=[{"index": n["index"]} for n in nodes]
    )
    joinall(greenlets, timeout=300)
    for node, g in zip(nodes, greenlets, strict=True):
        if g.exception is not None or not g.ready():
            print(f"FAIL {node['alias']} {g.exception!r}", flush=True)
        else:
            print(f"{node['alias']} fetched", flush=True)
    _pssh_check_host_keys(client, cluster)


def _unpack(folder: str) -> str:
    """The node command after an upload: unpack ``folder.tar.gz`` into ``folder`` and delete it."""
    return f"mkdir -p {folder} && tar -xzf {folder}.tar.gz -C {folder} && rm -f {folder}.tar.gz"


def pssh_put(cluster: dict[str, Any], tarball: str, folder: str) -> None:
    """Upload with SCP (``scp_send``; ``copy_file`` would use SFTP), then unpack with
    ``run_command``; a node whose upload failed is reported once, as that failure."""
    from gevent import joinall

    client = _pssh_client(cluster)
    nodes = _nodes(cluster)
    greenlets = client.scp_send(tarball, f"{folder}.tar.gz")
    joinall(greenlets, timeout=600)
    failed = set()
    for node, g in zip(nodes, greenlets, strict=True):
        if g.exception is not None or not g.ready():
            print(f"FAIL {node['alias']} upload: {g.exception!r}", flush=True)
            failed.add(node["alias"])
    output = client.run_command(_unpack(folder), stop_on_errors=False, read_timeout=600)
    client.join(output, timeout=600)
    for host_out in output:
        if host_out.alias in failed:
            continue
        if host_out.exception is not None:
            print(f"FAIL {host_out.alias} {type(host_out.exception).__name__}: {host_out.exception}", flush=True)
        elif host_out.exit_code != 0:
            err = " ".join(host_out.stderr or [])[:200]
            print(f"FAIL {host_out.alias} unpacking: exit {host_out.exit_code}: {err}", flush=True)
        else:
            print(f"{host_out.alias} unpacked", flush=True)
    _pssh_check_host_keys(client, cluster)


def pssh_exit(cluster: dict[str, Any], command: str) -> None:
    client = _pssh_client(cluster)
    output = client.run_command(command, stop_on_errors=False, read_timeout=300)
    client.join(output, timeout=300)
    for host_out in output:
        if host_out.exception is not None:
            print(f"FAIL {host_out.alias} {type(host_out.exception).__name__}: {host_out.exception}", flush=True)
        else:
            print(f"{host_out.alias} exit {host_out.exit_code}", flush=True)
    _pssh_check_host_keys(client, cluster)


# -- Fabric -----------------------------------------------------------------------------


def _fabric_group(cluster: dict[str, Any]) -> Any:
    import paramiko
    from fabric import Config, Connection, ThreadingGroup

    config = Config(overrides={"load_ssh_configs": False})
    conns = []
    for n in _nodes(cluster):
        c = Connection(
            "127.0.0.1",
            user=cluster["user"],
            port=n["port"],
            config=config,
            connect_timeout=30,
            connect_kwargs={"key_filename": cluster["key"], "look_for_keys": False, "allow_agent": False},
        )
        # Fabric accepts unknown host keys by default; check them against the pinned file.
        c.client.load_host_keys(cluster["known_hosts_ip"])
        c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        conns.append(c)
    return ThreadingGroup.from_connections(conns)


def _fabric_results(cluster: dict[str, Any], results: Any, describe: Any) -> None:
    by_port = {n["port"]: n for n in _nodes(cluster)}
    for conn, value in results.items():
        node = by_port[conn.port]
        if isinstance(value, BaseException):
            print(f"FAIL {node['alias']} {type(value).__name__}: {value}", flush=True)
        else:
            print(f"{node['alias']} {describe(value)}", flush=True)


def fabric_run(cluster: dict[str, Any], times: int) -> None:
    from fabric.exceptions import GroupException

    group = _fabric_group(cluster)
    for i in range(times):
        t0 = time.perf_counter()
        try:
            results = group.run("hostname", hide=True, warn=True, timeout=60)
        except GroupException as e:
            results = e.result
        seconds = time.perf_counter() - t0
        if i == times - 1:
            _fabric_results(cluster, results, lambda r: r.stdout.strip() if r.ok else f"exit {r.exited}")
        if i == 1:
            print(f"SECOND {seconds:.6f}", flush=True)
    group.close()


def fabric_get(cluster: dict[str, Any], remote: str, dest: str) -> None:
    from fabric.exceptions import GroupException

    group = _fabric_group(cluster)
    try:
        results = group.get(remote, local=os.path.join(dest, "r.{port}"))
    except GroupException as e:
        results = e.result
    _fabric_results(cluster, results, lambda r: "fetched")
    group.close()


def fabric_put(cluster: dict[str, Any], tarball: str, folder: str) -> None:
    """``ThreadingGroup.put`` (SFTP), then ``ThreadingGroup.run`` to unpack, on every node
    whose upload succeeded."""
    from fabric import ThreadingGroup
    from fabric.exceptions import GroupException

    group = _fabric_group(cluster)
    try:
        uploaded = group.put(tarball, remote=f"{folder}.tar.gz")
    except GroupException as e:
        uploaded = e.result
    by_port = {n["port"]: n for n in _nodes(cluster)}
    good = []
    for conn, value in uploaded.items():
        if isinstance(value, BaseException):
            print(f"FAIL {by_port[conn.port]['alias']} upload: {type(value).__name__}: {value}", flush=True)
        else:
            good.append(conn)
    if good:
        try:
            results = ThreadingGroup.from_connections(good).run(_unpack(folder), hide=True, warn=True, timeout=600)
        except GroupException as e:
            results = e.result
        for conn, value in results.items():
            alias = by_port[conn.port]["alias"]
            if isinstance(value, BaseException):
                print(f"FAIL {alias} {type(value).__name__}: {value}", flush=True)
            elif not value.ok:
                print(f"FAIL {alias} unpacking: exit {value.exited}: {value.stderr.strip()[:200]}", flush=True)
            else:
                print(f"{alias} unpacked", flush=True)
    group.close()


# -- vtool's Python API (for the in-process rows) --------------------------------------


def vtool_api_run(cluster: dict[str, Any], times: int) -> None:
    from vtool import Cluster

    c = Cluster(cluster["name"])
    selection = f"0-{len(cluster['nodes']) - 1}"
    for i in range(times):
        t0 = time.perf_counter()
        result = c.run("hostname", nodes=selection)
        seconds = time.perf_counter() - t0
        if i == times - 1:
            for r in result:
                alias = f"{cluster['name']}-{r.index}"
                if r.ok and r.value.exit_code == 0:
                    print(f"{alias} {r.value.stdout.strip()}", flush=True)
                else:
                    print(f"FAIL {alias} {r.error or r.value.exit_code}", flush=True)
        if i == 1:
            print(f"SECOND {seconds:.6f}", flush=True)


def main(argv: list[str]) -> None:
    tool, action, cluster_file = argv[:3]
    with open(cluster_file) as f:
        cluster = json.load(f)
    runs = {"pssh": pssh_run, "fabric": fabric_run, "vtool-api": vtool_api_run}
    gets = {"pssh": pssh_get, "fabric": fabric_get}
    puts = {"pssh": pssh_put, "fabric": fabric_put}
    if action in ("run", "run2"):
        runs[tool](cluster, 1 if action == "run" else 2)
    elif action == "get":
        gets[tool](cluster, argv[3], argv[4])
    elif action == "put":
        puts[tool](cluster, argv[3], argv[4])
    elif action == "exit" and tool == "pssh":
        pssh_exit(cluster, argv[3])
    else:
        raise SystemExit(f"unknown action {action!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

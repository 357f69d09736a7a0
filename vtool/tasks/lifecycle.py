"""launch, status, terminate."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from ..errors import Interrupted, UsageError
from ._common import Output, api, duration, number, table, vtool_task


def settings_from(cluster: str | None, profile: str | None, **overrides: Any) -> Any:
    return api.settings(
        cluster=cluster, profile=profile, overrides={k: v for k, v in overrides.items() if v is not None} or None
    )


def node_table(nodes: Any) -> str:
    now = time.time()
    rows = [
        [str(n.index), n.id, f"{n.address}:{n.port}", n.state, duration(now - n.launched_at) if n.launched_at else "-"]
        for n in nodes
    ]
    return table(rows, ["index", "id", "address", "state", "uptime"])


@vtool_task(
    optional_positional=("n",),
    help={
        "n": "how many nodes to add (default 1); launching again adds more",
        "no_inject": "do not send the cluster's current release to the new nodes",
        "ready_timeout": "seconds to wait for each new node to accept SSH (default: timeout.ready)",
        "no_wait": "return once the nodes exist, without waiting for SSH (inject waits for them)",
        "keep_unready": "keep nodes that never accept SSH (default: terminate them)",
        "spot": "EC2: ask for spot instances (see ec2.spot_max_price)",
    },
)
def launch(
    c,
    n=None,
    cluster=None,
    profile=None,
    no_inject=False,
    ready_timeout=None,
    no_wait=False,
    keep_unready=False,
    spot=False,
):
    """Add N nodes to the cluster (default 1) and wait until they accept SSH."""
    count = api.check_count(1 if n is None else n)
    overrides: dict[str, Any] = {}
    if ready_timeout is not None:
        overrides["timeout"] = {"ready": int(number(ready_timeout, "--ready-timeout", minimum=1))}
    if spot:
        overrides["ec2"] = {"spot": True}
    settings = settings_from(cluster, profile, **overrides)
    out = Output()
    try:
        result = api.launch(
            count,
            settings=settings,
            inject=False if no_inject else None,
            progress=out.progress,
            wait=not no_wait,
            keep_unready=keep_unready,
        )
    except KeyboardInterrupt:
        out.done()
        name = settings.cluster
        raise Interrupted(
            f"interrupted: nodes being created were stopped; nodes already up stay in cluster {name!r} "
            f"(see `vtool status -c {name}`, remove them with `vtool terminate -c {name} --yes`)"
        ) from None
    out.done()
    out.line(f"cluster {result.cluster.name!r}: {len(result.cluster.nodes)} node(s)")
    out.line(node_table(result.cluster.nodes))
    for r in result.ready.failed:
        out.line(f"node {r.index}: {r.error}", err=True)
    if result.injected is not None:
        for r in result.injected.failed:
            out.line(f"node {r.index}: inject failed: {r.error}", err=True)
        api.raise_for_failures(result.injected, "sending the release to new nodes")
    if result.informed is not None:
        for r in result.informed.failed:
            out.line(f"node {r.index}: could not write the cluster files: {r.error}", err=True)
        api.raise_for_failures(result.informed, "telling the nodes about the cluster")
    api.raise_for_failures(result.ready, "launch")


@vtool_task(help={"json": "print machine-readable JSON instead of tables"})
def status(c, cluster=None, profile=None, json_=False):
    """Show every cluster and node: state, uptime, release, launch script."""
    settings = settings_from(cluster, profile)
    # Every cluster, unless one was chosen (--cluster, VTOOL_CLUSTER, `cluster:` or a profile).
    clusters = api.status(settings=settings, all_clusters=cluster is None and settings.cluster == "default")
    now = time.time()
    if json_:
        doc = [
            {
                "cluster": cs.name,
                "provider": cs.provider,
                "release": cs.release,
                "nodes": [
                    {
                        "index": ns.node.index,
                        "id": ns.node.id,
                        "address": ns.node.address,
                        "port": ns.node.port,
                        "state": ns.node.state,
                        "reachable": ns.reachable,
                        "uptime": round(now - ns.node.launched_at, 1) if ns.node.launched_at else None,
                        "release": ns.release,
                        "launch": ns.launch_state,
                        "exit_code": ns.launch_exit,
                        "error": ns.error,
                        **{k: v for k, v in ns.node.extra if k != "pid"},
                    }
                    for ns in cs.nodes
                ],
            }
            for cs in clusters
        ]
        print(json.dumps(doc, indent=2))
        return
    if not clusters:
        print("no clusters; start one with `vtool launch N`")
        return
    for cs in clusters:
        print(f"cluster {cs.name} ({cs.provider}), release: {cs.release or 'none injected'}")
        rows = []
        # Provider facts worth a column (EC2: instance type, zone, spot or on-demand).
        extra_cols = [
            k for k in ("instance_type", "zone", "lifecycle") if any(dict(ns.node.extra).get(k) for ns in cs.nodes)
        ]
        for ns in cs.nodes:
            n = ns.node
            launch_col = ns.launch_state if ns.launch_exit is None else f"{ns.launch_state} {ns.launch_exit}"
            rows.append(
                [
                    str(n.index),
                    n.id,
                    f"{n.address}:{n.port}",
                    *[dict(n.extra).get(k, "-") for k in extra_cols],
                    n.state if ns.reachable else f"{n.state} (unreachable)",
                    duration(now - n.launched_at) if n.launched_at else "-",
                    ns.release or "-",
                    launch_col if ns.reachable else "-",
                ]
            )
        header = ["index", "id", "address", *[c.replace("_", " ") for c in extra_cols], "state", "uptime"]
        print(table(rows, [*header, "release", "launch script"]))
        print()


@vtool_task(
    help={
        "nodes": "only these nodes, e.g. 0,2,5-7 (default: all)",
        "yes": "do not ask for confirmation",
    },
)
def terminate(c, cluster=None, profile=None, nodes=None, yes=False):
    """Destroy the cluster's nodes (all, or --nodes) and everything they run."""
    settings = settings_from(cluster, profile)
    session = api.Session(settings)
    info = session.info()
    if not info.nodes:
        if nodes is not None:
            session.existing()
        print(f"cluster {settings.cluster!r} has no nodes: nothing to terminate")
        return
    targets = session.select(info, nodes)
    if not yes:
        what = f"{len(targets)} node(s) ({', '.join(str(t.index) for t in targets)}) of cluster {settings.cluster!r}"
        if not sys.stdin.isatty():
            raise UsageError(f"not on a terminal: add --yes to terminate {what}")
        try:
            answer = input(f"Terminate {what}? [y/N] ").strip().lower()
        except EOFError:
            answer = ""
        if answer not in ("y", "yes"):
            print("nothing terminated")
            return
    out = Output()
    result = api.terminate(settings=settings, nodes=nodes, progress=out.progress)
    out.done()
    for r in result.failed:
        out.line(f"node {r.index}: {r.error}", err=True)
    api.raise_for_failures(result, "terminate")
    out.line(f"terminated {len(result.succeeded)} node(s) of cluster {settings.cluster!r}")


def _power(cluster: Any, profile: Any, nodes: Any, action: Any, verb: str, done: str, hint: str = "") -> None:
    settings = settings_from(cluster, profile)
    out = Output()
    result = action(settings=settings, nodes=nodes, progress=out.progress)
    out.done()
    for r in result.failed:
        out.line(f"node {r.index}: {r.error}", err=True)
    api.raise_for_failures(result, verb)
    out.line(f"{done} {len(result.succeeded)} node(s) of cluster {settings.cluster!r}{hint}")


@vtool_task(help={"nodes": "only these nodes, e.g. 0,2,5-7 (default: all)"})
def stop(c, cluster=None, profile=None, nodes=None):
    """Stop the nodes but keep their disks (start brings them back)."""
    _power(cluster, profile, nodes, api.stop, "stop", "stopped", "; `vtool start` brings them back")


@vtool_task(help={"nodes": "only these nodes, e.g. 0,2,5-7 (default: all)"})
def start(c, cluster=None, profile=None, nodes=None):
    """Start stopped nodes again and wait until they accept SSH."""
    _power(cluster, profile, nodes, api.start, "start", "started")

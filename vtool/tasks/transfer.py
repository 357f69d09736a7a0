"""scpget, scpgetall, put."""

from __future__ import annotations

from ._common import Output, api, vtool_task
from .lifecycle import settings_from

REMOTE_HELP = "path on the node, relative to its home folder"


def _warn_skipped(out: Output, index: object, report) -> None:  # type: ignore[no-untyped-def]
    for s in report.skipped:
        out.line(f"node {index}: skipped {s}", err=True)


@vtool_task(
    optional_positional=("local",),
    shortflags={"recursive": "r"},
    help={
        "remote": REMOTE_HELP,
        "local": "local file or folder (default: the remote name, in this folder)",
        "node": "node index (default 0)",
        "recursive": "fetch a folder",
    },
)
def scpget(c, remote, local=None, cluster=None, profile=None, node="0", recursive=False):
    """Fetch a file (or folder with -r) from one node (node 0 by default)."""
    settings = settings_from(cluster, profile)
    out = Output()
    report = api.get(remote, local, settings=settings, node=node, recursive=recursive)
    _warn_skipped(out, node, report)
    out.line(f"{report.path} ({report.files} file(s), {report.bytes} bytes)")


@vtool_task(
    optional_positional=("local",),
    shortflags={"recursive": "r"},
    help={
        "remote": REMOTE_HELP,
        "local": "local name: files are written as LOCAL.0, LOCAL.1 ... by node index",
        "nodes": "only these nodes, e.g. 0,2,5-7 (default: all)",
        "recursive": "fetch folders",
        "only_failed": "only the nodes that failed the last time this command ran on the cluster",
    },
)
def scpgetall(c, remote, local=None, cluster=None, profile=None, nodes=None, recursive=False, only_failed=False):
    """Fetch a file (or folder with -r) from every node as LOCAL.0, LOCAL.1 ..."""
    settings = settings_from(cluster, profile)
    out = Output()
    result = api.get_all(remote, local, settings=settings, nodes=nodes, recursive=recursive, only_failed=only_failed)
    for r in result.results:
        if r.ok:
            _warn_skipped(out, r.index, r.value)
            out.line(f"{r.value.path} ({r.value.files} file(s), {r.value.bytes} bytes)")
        else:
            out.line(f"node {r.index}: FAILED: {r.error}", err=True)
    api.raise_for_failures(result, "scpgetall")


@vtool_task(
    help={
        "local": "local file or folder",
        "remote": REMOTE_HELP,
        "nodes": "only these nodes, e.g. 0,2,5-7 (default: all)",
    }
)
def put(c, local, remote, cluster=None, profile=None, nodes=None):
    """Copy a local file or folder to the nodes."""
    settings = settings_from(cluster, profile)
    out = Output()
    result = api.put(local, remote, settings=settings, nodes=nodes)
    for r in result.results:
        if r.ok:
            out.line(f"node {r.index}: {r.value}")
        else:
            out.line(f"node {r.index}: FAILED: {r.error}", err=True)
    api.raise_for_failures(result, "put")

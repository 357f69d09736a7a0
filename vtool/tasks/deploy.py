"""inject, mkpkg."""

from __future__ import annotations

from ._common import Output, api, vtool_task
from .lifecycle import settings_from


@vtool_task(
    help={
        "path": "package folder (holding an executable vtool-launch) or a .tar.gz/.tgz/.tar.bz2 of one",
        "nodes": "only these nodes, e.g. 0,2,5-7 (default: all)",
        "only_failed": "only the nodes that failed the last time this command ran on the cluster",
    }
)
def inject(c, path, cluster=None, profile=None, nodes=None, only_failed=False):
    """Send a package to every node and start its vtool-launch there."""
    settings = settings_from(cluster, profile)
    out = Output()
    result = api.inject(path, settings=settings, nodes=nodes, progress=out.progress, only_failed=only_failed)
    out.done()
    for r in result.results:
        if r.ok:
            how = "in screen" if r.value.get("mode") == "screen" else "detached"
            sent = {
                "there": "already there",
                "direct": "sent",
                "relay": "from another node",
                "delta direct": "changes sent",
                "delta relay": "changes from another node",
            }.get(r.value.get("how", ""), "sent" if r.value.get("sent") else "already there")
            out.line(f"node {r.index}: started ({how}; package {sent})")
        else:
            out.line(f"node {r.index}: FAILED: {r.error}", err=True)
    api.raise_for_failures(result, "inject")


@vtool_task(
    help={
        "folder": "the package folder to pack",
        "output": "where to write the archive (default: ./NAME.tar.gz)",
    }
)
def mkpkg(c, folder, output=None):
    """Build the package archive that inject would send (NAME.tar.gz)."""
    path = api.mkpkg(folder, output)
    print(path)

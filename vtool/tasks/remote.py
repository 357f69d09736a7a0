"""run, logs, connect, ssh-config."""

from __future__ import annotations

import subprocess

from invoke import Exit

from ..errors import UsageError
from ._common import Output, api, number, table, vtool_task
from .lifecycle import settings_from

NODES_HELP = "only these nodes, e.g. 0,2,5-7 (default: all)"


def summary(result, out: Output) -> None:  # type: ignore[no-untyped-def]
    rows = []
    for r in result.results:
        code = "-" if r.exit_code is None else str(r.exit_code)
        note = "" if r.ok else (r.error or "")
        rows.append([str(r.index), code, f"{r.seconds:.2f}s", note])
    out.line(table(rows, ["node", "exit", "time", "error"]), err=True)
    out.line(f"{len(result.succeeded)} ok, {len(result.failed)} failed", err=True)


@vtool_task(
    help={
        "command": "shell command to run on each node (quote it)",
        "nodes": NODES_HELP,
        "only_failed": "only the nodes that failed the last time this command ran on the cluster",
    }
)
def run(c, command, cluster=None, profile=None, nodes=None, only_failed=False):
    """Run a shell command on all nodes in parallel; output prefixed by node index."""
    settings = settings_from(cluster, profile)
    out = Output()
    result = api.run(command, settings=settings, nodes=nodes, on_line=out.node_line, only_failed=only_failed)
    summary(result, out)
    api.raise_for_failures(result, "the command")


@vtool_task(
    help={
        "nodes": NODES_HELP,
        "follow": "keep printing new output until Ctrl-C",
        "lines": "only the last N lines of each node's log",
    }
)
def logs(c, cluster=None, profile=None, nodes=None, follow=False, lines=None):
    """Show the launch scripts' output from every node, prefixed by index."""
    settings = settings_from(cluster, profile)
    out = Output()
    result = api.logs(
        settings=settings,
        nodes=nodes,
        follow=follow,
        lines=int(number(lines, "--lines", minimum=1)) if lines else None,
        on_line=out.node_line,
    )
    for r in result.failed:
        out.line(f"[{r.index}] {r.error}", err=True)
    api.raise_for_failures(result, "logs")


@vtool_task(optional_positional=("i",), help={"i": "node index (default 0)"})
def connect(c, i=None, cluster=None, profile=None):
    """Open an interactive shell on node I (default 0)."""
    settings = settings_from(cluster, profile)
    argv = api.ssh_argv(0 if i is None else i, settings=settings)
    code = subprocess.call(argv)
    if code:
        raise Exit(code=code)


@vtool_task(name="ssh-config", help={"output": "write to this file instead of printing"})
def ssh_config(c, cluster=None, profile=None, output=None):
    """Print an OpenSSH config for the nodes: ssh -F FILE CLUSTER-INDEX."""
    settings = settings_from(cluster, profile)
    text = api.ssh_config(settings=settings)
    if output:
        try:
            with open(output, "w") as f:
                f.write(text)
        except OSError as e:
            raise UsageError(f"cannot write {output}: {e.strerror}") from None
    else:
        print(text, end="")

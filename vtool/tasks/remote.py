"""run, logs, connect, ssh-config."""

from __future__ import annotations

import subprocess

from invoke import Exit

from ..errors import UsageError
from ._common import Output, api, number, vtool_task
from .lifecycle import settings_from

NODES_HELP = "only these nodes, e.g. 0,2,5-7 (default: all)"


@vtool_task(
    help={
        "command": "shell command to run on each node (quote it)",
        "nodes": NODES_HELP,
        "only_failed": "only the nodes that failed the last time this command ran on the cluster",
    }
)
def run(c, command, cluster=None, profile=None, nodes=None, only_failed=False):
    """Run a shell command on all nodes in parallel; output prefixed by node index."""
    from .. import early, lean, plugin_manager

    settings = settings_from(cluster, profile)
    if early.remembering():  # (vtool's own command line: the next one may take the lean path)
        early.keep_settings(lean.settings_entry(settings, plugin_manager.get()))
    lean.run_command(command, settings, nodes, only_failed)


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

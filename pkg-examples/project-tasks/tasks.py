"""A project's own tasks.py: every vtool verb (`inv launch 2`, `inv inject DIR`,
`inv terminate --yes` ...) plus a task of the project's own, `inv sweep`, which uses
vtool's Python API."""

from invoke import Exit, task

from vtool.tasks import collection


@task(
    help={
        "command": "shell command to run on every node (VTOOL_* variables are set)",
        "cluster": "cluster name (default: the `cluster` setting, VTOOL_CLUSTER, or 'default')",
    }
)
def sweep(c, command="echo rank $VTOOL_NODE_RANK of $VTOOL_NODE_COUNT on $(hostname)", cluster=None):
    """Run a command on every node through the Python API; one line per node."""
    from vtool import Cluster, VtoolError  # imported here: `inv --list` stays fast

    try:
        result = Cluster(cluster).run(command)
    except VtoolError as e:  # e.g. no cluster yet: one line and vtool's exit code, not a traceback
        raise Exit(f"sweep: {e}", code=e.exit_code) from None
    for r in result.results:
        if r.ok:
            print(f"node {r.index}: {r.value.stdout.strip()}")
        else:
            print(f"node {r.index}: FAILED ({r.error})")
    if result.failed:
        raise Exit(f"sweep: failed on {len(result.failed)} of {len(result.results)} node(s)", code=1)


ns = collection()  # every vtool verb, plugins' tasks included
ns.add_task(sweep)

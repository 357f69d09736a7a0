"""Every hook vtool calls. Built-in providers and plugins implement these exactly as
third-party plugins do (entry-point group ``vtool``). docs/plugins.md documents each one;
tests/test_docs.py checks that it does.

Arguments are frozen dataclasses from ``vtool.models`` and the effective
``vtool.config.Settings``; a plugin reads its own section with ``settings.section("name")``
and stays inert unless that section enables it.

``remote`` arguments are callables ``remote(command: str, input: bytes | None = None) ->
CommandResult`` that run a shell command on that node over vtool's verified SSH
connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("vtool")
hookimpl = pluggy.HookimplMarker("vtool")


@hookspec
def vtool_config_defaults() -> dict[str, Any]:  # type: ignore[empty-body]
    """Contribute typed defaults for a plugin's own settings.

    Called each time settings are loaded, before any config file is read, so the plugin's
    keys are known (unknown keys in a file are refused) and typed (a value of another type
    is refused).

    Return a mapping of top-level section name to defaults, e.g.
    ``{"docker": {"enabled": False, "image": ""}}``. All plugins' answers are merged.
    """


@hookspec
def vtool_register_providers(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register node providers.

    Called whenever vtool looks up a provider. Call ``register(name, factory)`` for each
    provider; ``factory(settings)`` returns an object implementing
    ``vtool.providers.base.Provider``. The setting ``provider: NAME`` selects it. Two
    providers with one name are refused (exit code 5).
    """


@hookspec
def vtool_register_tasks(register: Callable[[Any], None]) -> None:
    """Add Invoke tasks (or sub-collections) to the ``vtool`` collection.

    Called when the collection is built (``vtool --list``, ``inv --list``). Call
    ``register(task_or_collection)`` for each. Keep imports inside the tasks' bodies:
    this runs at every start-up.
    """


@hookspec(firstresult=True)
def vtool_gateway(node: Any, settings: Any) -> str | None:  # type: ignore[empty-body]
    """Choose how SSH reaches ``node`` (a ``Node``): a ProxyJump spec such as
    ``"ubuntu@203.0.113.5:22"``, used with the cluster's key and pinned host keys.

    firstresult: the first non-None answer wins; return None to decline (direct connection).
    """


@hookspec(firstresult=True)
def vtool_node_address(node: Any, settings: Any) -> tuple[str, int] | None:  # type: ignore[empty-body]
    """Choose the address and port vtool's SSH connects to for ``node`` (by default the
    provider's: the public address on EC2, 127.0.0.1 and the node's port locally).

    firstresult: return ``(host, port)``, or None to decline. Used by plugins that reach
    nodes another way (a VPN, a port forward) and by tests that back cloud nodes with
    local sshd processes.
    """


@hookspec(firstresult=True)
def vtool_peer_address(node: Any, settings: Any) -> tuple[str, int] | None:  # type: ignore[empty-body]
    """Choose the address and port the *other nodes* use to reach ``node`` over SSH (relayed
    injects, ``~/.vtool/ssh_config`` on the nodes); by default its private address and port.

    firstresult: return ``(host, port)``, or None to decline. For overlay networks, and for
    tests that back cloud nodes with local sshd processes.
    """


@hookspec
def vtool_after_launch(cluster: Any, node: Any, settings: Any, remote: Any) -> None:
    """Called once per new node after ``launch``, when that node accepts SSH and before
    the cluster's release (if any) is injected into it.

    ``cluster`` is the ``ClusterInfo`` including the new nodes; ``remote`` runs commands
    on ``node``. Raise ``vtool.VtoolError`` to mark the node as failed (it is reported,
    the others go on). Runs in parallel for the new nodes.
    """


@hookspec
def vtool_before_inject(cluster: Any, nodes: Any, release: Any, settings: Any) -> None:
    """Called once before a release is sent (by ``inject``, and by ``launch`` sending the
    cluster's release to new nodes), with the target nodes (a tuple of ``Node``) and the
    ``Release`` (name, content hash, local archive). Raise ``VtoolError`` to refuse the
    inject before anything is sent.
    """


@hookspec
def vtool_node_env(cluster: Any, node: Any, settings: Any) -> dict[str, str]:  # type: ignore[empty-body]
    """Extra environment variables for ``node``: written to ``~/.vtool/cluster.env`` with
    the VTOOL_* variables, so the launch script and ``vtool run`` commands see them.

    Called for every node each time vtool writes that file (inject, launch). All answers
    are merged; names must be valid shell identifiers. A plugin enabled on a running
    cluster takes effect at the next inject or launch.
    """


@hookspec(firstresult=True)
def vtool_launch_command(cluster: Any, node: Any, release: Any, settings: Any) -> str | None:  # type: ignore[empty-body]
    """The shell command that starts the release on ``node``, run in the release folder
    with the cluster environment loaded (e.g. the Docker plugin's ``docker run``).

    firstresult: return None to decline; the default runs ``./vtool-launch``.
    """


@hookspec
def vtool_after_inject(cluster: Any, nodes: Any, release: Any, results: Any, settings: Any) -> None:
    """Called once after an inject, with the ``GroupResult`` of every target node."""


@hookspec
def vtool_before_terminate(cluster: Any, nodes: Any, settings: Any, remote: Any) -> None:
    """Called once before nodes are destroyed (e.g. to unmount a shared volume or ship
    the last logs). ``remote(index, command)`` runs a command on one of those nodes.
    Exceptions are reported and do not stop the terminate.
    """

"""The provider contract: what vtool needs from anything that makes nodes.

A provider creates, lists and destroys nodes and says how to reach them over SSH. It
never runs the package or prints; ``api`` does that for every provider the same way.
Frozen dataclasses (``vtool.models``) go in and out; no cloud SDK object leaves a provider.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from ..models import Node, NodeResult, SshTarget

Progress = Callable[[str], None]


@runtime_checkable
class Provider(Protocol):
    """Implemented by ``providers/local.py``, ``providers/ec2.py`` and plugins' providers."""

    name: str

    def check(self) -> None:
        """Raise ProviderError (one actionable line) if this provider cannot work here.

        Called before anything is created or changed."""

    def clusters(self) -> list[str]:
        """Names of every cluster this provider has nodes for."""

    def nodes(self, cluster: str) -> list[Node]:
        """The cluster's nodes, in index order, with their current state."""

    def launch(self, cluster: str, indices: Sequence[int], progress: Progress, wait: bool = True) -> list[Node]:
        """Create one node per index; return them once they exist (SSH may not be up yet).
        With ``wait=False``, return as soon as the provider has accepted the request.

        Nodes that could not be created are destroyed again before raising; nodes that were
        created stay findable (``nodes()``) whatever happens after."""

    def ssh_target(self, node: Node) -> SshTarget:
        """How to reach ``node`` directly (the gateway hook may add a ProxyJump)."""

    def terminate(self, cluster: str, nodes: Sequence[Node], progress: Progress) -> list[NodeResult]:
        """Destroy these nodes and everything running on them; one result per node."""

    def stop(self, cluster: str, nodes: Sequence[Node], progress: Progress) -> list[NodeResult]:
        """Stop these nodes but keep their disks (and index, tags, release); one result each."""

    def start(self, cluster: str, nodes: Sequence[Node], progress: Progress) -> list[NodeResult]:
        """Start stopped nodes again (their addresses may change); one result each."""

    def forget(self, cluster: str) -> None:
        """Called when the cluster has no nodes left: remove provider-side leftovers."""

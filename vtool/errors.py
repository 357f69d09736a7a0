"""Errors a user can act on. Each class carries the exit code the CLI uses.

This module imports nothing from vtool, so every other module may raise these.
"""

from __future__ import annotations


class VtoolError(Exception):
    """Base class: a problem the user can fix, shown as one line on stderr."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(VtoolError):
    """A bad setting, config file, flag value or argument."""

    exit_code = 2


class UsageError(ConfigError):
    """A bad command-line argument (same exit code as a bad setting)."""


class ProviderError(VtoolError):
    """The provider (local sshd, EC2) could not do what was asked."""

    exit_code = 3


class NodeNotFound(VtoolError):
    """A cluster or node index that does not exist."""

    exit_code = 4


class PluginError(VtoolError):
    """A plugin failed to load or broke the hook contract."""

    exit_code = 5


class PartialFailure(VtoolError):
    """Some nodes failed; the per-node results were already reported."""

    exit_code = 1

    def __init__(self, message: str, results: object = None) -> None:
        super().__init__(message)
        self.results = results


class Interrupted(VtoolError):
    """The user pressed Ctrl-C; what was done so far is consistent."""

    exit_code = 130


class NodeError(VtoolError):
    """One node could not be reached or did not do what was asked (reported per node)."""

    exit_code = 1


class NodeUnreachable(NodeError):
    """The SSH connection could not be made (refused, timed out ...): worth retrying."""


class HostKeyMismatch(NodeError):
    """A node presented a host key other than the one pinned for it."""

"""vtool: N machines, your code on all of them, results back, everything torn down.

The Python API mirrors the command-line verbs::

    from vtool import Cluster
    c = Cluster("demo")        # settings from vtool.yaml, VTOOL_* and these arguments
    c.launch(3)
    c.inject("pkg-examples/hello")
    c.get_all("hello-result.txt", "out/r")
    c.terminate()

Heavy modules load on first use, so ``import vtool`` (and ``vtool --help``) stays fast.
"""

from __future__ import annotations

from .errors import ConfigError, NodeError, NodeNotFound, PartialFailure, PluginError, ProviderError, VtoolError

# typing for type checkers only, as in vtool.early
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_API = (
    "Cluster",
    "settings",
    "launch",
    "inject",
    "run",
    "get",
    "get_all",
    "put",
    "logs",
    "status",
    "terminate",
    "stop",
    "start",
    "mkpkg",
    "ssh_argv",
    "ssh_config",
    "connection",
)
_MODELS = ("Node", "NodeResult", "GroupResult", "ClusterInfo", "Release", "NodeStatus", "FetchReport", "CommandResult")

__all__ = [
    "__version__",
    "hookimpl",
    "VtoolError",
    "ConfigError",
    "NodeError",
    "NodeNotFound",
    "PartialFailure",
    "PluginError",
    "ProviderError",
    *_API,
    *_MODELS,
]


def __getattr__(name: str) -> Any:
    if name == "hookimpl":  # (pluggy is imported on first use: `vtool run` starts sooner)
        from .hookspecs import hookimpl

        return hookimpl
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in _MODELS:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'vtool' has no attribute {name!r}")

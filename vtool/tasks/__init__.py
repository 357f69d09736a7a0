"""vtool's Invoke tasks. ``collection()`` returns a fresh collection of every verb (plus
plugins' tasks); a project's own tasks.py takes it in and adds tasks of its own::

    from vtool.tasks import collection
    ns = collection()
    ns.add_task(my_task)

``vtool_task`` is ``@task`` plus vtool's error handling (a ``VtoolError`` becomes one line
on stderr and its exit code, under ``inv`` as under ``vtool``): use it for your own tasks.
"""

from __future__ import annotations

from typing import Any

from invoke import Collection

from ._common import VtoolParserContext, vtool_task

__all__ = ["collection", "vtool_task", "VtoolCollection"]


class VtoolCollection(Collection):
    """A Collection whose tasks may have optional positional arguments (``launch [N]``)."""

    def to_contexts(self, ignore_unknown_help: bool | None = None) -> list[Any]:
        contexts = []
        for primary, aliases in self.task_names.items():
            task = self[primary]
            ctx = VtoolParserContext(
                name=primary, aliases=aliases, args=task.get_arguments(ignore_unknown_help=ignore_unknown_help)
            )
            ctx.optional = tuple(getattr(task, "optional_positional", ()))
            contexts.append(ctx)
        return contexts


def collection() -> VtoolCollection:
    """A new collection with every vtool verb and every plugin's tasks."""
    from .. import plugin_manager
    from . import deploy, lifecycle, remote, transfer

    ns = VtoolCollection()
    for t in (
        lifecycle.launch,
        deploy.inject,
        remote.connect,
        transfer.scpget,
        transfer.scpgetall,
        lifecycle.terminate,
        remote.run,
        transfer.put,
        remote.logs,
        lifecycle.status,
        remote.ssh_config,
        deploy.mkpkg,
        lifecycle.stop,
        lifecycle.start,
    ):
        ns.add_task(t)
    for extra in plugin_manager.extra_tasks(plugin_manager.get()):
        if isinstance(extra, Collection):
            ns.add_collection(extra)
        else:
            ns.add_task(extra)
    return ns

"""A third-party vtool plugin in one module (entry point ``example`` in group ``vtool``).

- ``vtool example-hello`` prints a line with the plugin's settings (always there).
- The setting section ``example:`` (``enabled: false``, ``greeting: hi``) is declared, so
  vtool.yaml may set it and checks its types.
- With ``example: {enabled: true}``, every node gets ``EXAMPLE_GREETING`` in its
  environment and each newly launched node a file ``~/example-plugin-was-here``.
  Disabled (the default), the plugin changes nothing on the nodes.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

from vtool import VtoolError, hookimpl

SECTION = "example"


def _enabled(settings: Any) -> bool:
    return bool(settings.section(SECTION)["enabled"])


@hookimpl
def vtool_config_defaults() -> dict[str, Any]:
    return {SECTION: {"enabled": False, "greeting": "hi"}}


@hookimpl
def vtool_register_tasks(register: Callable[[Any], None]) -> None:
    from invoke import Exit, task  # Invoke is loaded anyway when tasks are built

    @task(name="example-hello")
    def example_hello(c):  # type: ignore[no-untyped-def]
        """Print a line from the example plugin (and its settings)."""
        import vtool  # only when the task runs: start-up stays fast

        try:
            section = vtool.settings().section(SECTION)
        except vtool.VtoolError as e:  # e.g. a bad vtool.yaml: one line, not a traceback (also under `inv`)
            raise Exit(f"vtool: {e}", code=e.exit_code) from None
        state = "enabled" if section["enabled"] else "disabled"
        print(f"hello from vtool-plugin-example (greeting {section['greeting']!r}, {state})")

    register(example_hello)


@hookimpl
def vtool_node_env(cluster: Any, node: Any, settings: Any) -> dict[str, str]:
    if not _enabled(settings):
        return {}
    return {"EXAMPLE_GREETING": str(settings.section(SECTION)["greeting"])}


@hookimpl
def vtool_after_launch(cluster: Any, node: Any, settings: Any, remote: Any) -> None:
    if not _enabled(settings):
        return
    greeting = str(settings.section(SECTION)["greeting"])
    r = remote(f"echo {shlex.quote(greeting)} > ~/example-plugin-was-here")
    if r.exit_code != 0:  # marks this node as failed; the other nodes go on
        raise VtoolError(f"example plugin: could not write ~/example-plugin-was-here ({r.stderr.strip()})")

"""``vtool run`` without Invoke, when an earlier ``vtool run`` in the same context already
worked out everything Invoke would: the lean path.

A cold ``vtool run`` on a few nodes waits for vtool's own start-up, not for its connections
(vtool.early opens those meanwhile): importing Invoke, building the task collection, parsing
the command line against it, and reading the settings with Invoke's config machinery was
about a third of the Python work before the first command went out. ``run`` (below) does the
command itself the same way the ``run`` task does (``run_command``: the same api.run, the same
output and summary, the same exit codes and one-line errors), but only when nothing it skips
could make a difference:

- the command line is ``run COMMAND`` with at most ``-c/--cluster``, ``-p/--profile``,
  ``-n/--nodes`` and ``-o/--only-failed`` (as vtool.early reads them); anything else, such as
  ``--help``, another flag or a second word, goes to Invoke;
- vtool.early accepted its record for this context (the same folder, VTOOL_* variables,
  config files with the same times and sizes, and the same --cluster and --profile), and
  that record holds the settings a ``vtool run`` read there, with the same setting names and
  defaults as this vtool's (``settings_entry``);
- the installed plugins declare the same settings now (the plugins are loaded as always:
  their hooks take part in the command);
- VTOOL_DEBUG and VTOOL_LEAN=0 are not set.

Otherwise ``run`` returns False before doing anything, and vtool.main goes on as before.
"""

from __future__ import annotations

import json
import os
from typing import Any

from . import early
from .output import Output, guarded, run_summary

FLAGS = {"-c": "cluster", "--cluster": "cluster", "-p": "profile", "--profile": "profile"}
FLAGS |= {"-n": "nodes", "--nodes": "nodes"}
SWITCHES = {"-o": "only_failed", "--only-failed": "only_failed"}


def parse(args: list[str]) -> dict[str, Any] | None:
    """``run``'s arguments (after the verb) when they are only what the lean path reads:
    one command and the flags above, each at most once. None for anything else."""
    found: dict[str, Any] = {}
    command = None
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, value = a.partition("=")
        if a in SWITCHES and SWITCHES[a] not in found:
            found[SWITCHES[a]] = True
        elif name in FLAGS and FLAGS[name] not in found and (eq or i + 1 < len(args)):
            if not eq:
                i += 1
                value = args[i]
            if (name in ("-c", "-p", "-n") and eq) or value.startswith("-"):
                return None  # (-c=NAME, or a flag for a value: Invoke's reading is its own)
            found[FLAGS[name]] = value
        elif a.startswith("-") or command is not None:
            return None
        else:
            command = a
        i += 1
    if command is None:
        return None
    found["command"] = command
    return found


def _plugin_settings(pm: Any) -> Any:
    from . import plugin_manager

    return json.loads(json.dumps(plugin_manager.config_defaults(pm), sort_keys=True))


def settings_entry(settings: Any, pm: Any) -> Any:
    """What the record keeps of ``settings`` (read by a ``vtool run`` with only --cluster and
    --profile): its tree as JSON, when reading that back gives the very same settings; else
    None (then the next ``vtool run`` takes the full path)."""
    from .config import settings_from_tree

    try:
        tree = json.loads(json.dumps(dict(settings.tree), sort_keys=True))
        sources = list(settings.sources)
        if settings_from_tree(tree, tuple(sources)) != settings:
            return None
        return {"schema": _schema(), "plugins": _plugin_settings(pm), "tree": tree, "sources": sources}
    except (TypeError, ValueError):  # (a value JSON cannot hold: a date in a YAML file)
        return None


def _schema() -> str:
    """vtool's own settings and their defaults (another vtool may have others), as a checksum
    (binascii's: hashlib would load OpenSSL into every ``run``)."""
    import binascii

    from .config import VTOOL_DEFAULTS

    return f"{binascii.crc32(json.dumps(VTOOL_DEFAULTS, sort_keys=True).encode()):08x}"


def _saved_settings(saved: Any, pm: Any) -> Any:
    """The Settings ``saved`` (a record's ``settings_entry``) holds, if they still apply."""
    if not isinstance(saved, dict) or saved.get("schema") != _schema():
        return None
    if saved.get("plugins") != _plugin_settings(pm):
        return None
    from .config import settings_from_tree

    return settings_from_tree(saved["tree"], tuple(saved["sources"]))


def run_command(command: str, settings: Any, nodes: str | None, only_failed: bool) -> None:
    """``vtool run``'s work, for the task and the lean path alike: the command on the nodes,
    each line of output as ``[INDEX] LINE``, the table of exit codes, and a PartialFailure
    when a node failed."""
    from . import api

    out = Output()
    result = api.run(command, settings=settings, nodes=nodes, on_line=out.node_line, only_failed=only_failed)
    run_summary(result, out)
    api.raise_for_failures(result, "the command")


def run(args: list[str], before: Any = None) -> bool:
    """``vtool run ARGS`` on the lean path: True when it ran it (successfully: a failure is
    vtool.output.Stop, with the message and exit code), False when it cannot take it (nothing
    was done then). ``before`` is called once the command is about to start."""
    if os.environ.get("VTOOL_LEAN", "1").lower() in ("0", "no", "false", "off"):
        return False
    if os.environ.get("VTOOL_DEBUG", "").lower() in ("1", "true", "yes", "on"):
        return False
    parsed = parse(args)
    saved = early.saved_settings()
    if parsed is None or saved is None:
        return False
    try:
        from . import plugin_manager

        pm = plugin_manager.get()
        settings = _saved_settings(saved, pm)
    except Exception:  # (a broken plugin, say: the full path says what is wrong)
        return False
    if settings is None:
        return False
    from . import api  # noqa: F401  (the command's code, loaded before ``before``: see vtool.main)

    if before is not None:
        before()
    with guarded():
        early.keep_settings(saved)
        run_command(parsed["command"], settings, parsed.get("nodes"), bool(parsed.get("only_failed")))
    return True

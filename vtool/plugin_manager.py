"""Builds vtool's PluginManager: built-in modules first, then third-party plugins from
the entry-point group ``vtool``. Built-ins use exactly the hooks third parties use."""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError

# Modules registered before any third-party plugin (each is inert unless configured).
BUILTINS: tuple[str, ...] = ("vtool.providers.builtin",)


class EntryPoint:
    """One ``name = module[:attr]`` line of an ``entry_points.txt``."""

    def __init__(self, name: str, value: str) -> None:
        self.name, self.value = name, value

    def load(self) -> Any:
        module, _, attr = self.value.partition(":")
        obj: Any = importlib.import_module(module.strip())
        for part in filter(None, attr.strip().split(".")):
            obj = getattr(obj, part)
        return obj


def _dist_name(folder: str) -> str:
    return re.sub(r"[-_.]+", "_", folder.rsplit(".", 1)[0].split("-", 1)[0]).lower()


def entry_points(group: str) -> list[EntryPoint]:
    """The installed distributions' entry points in ``group``, as importlib.metadata finds
    them (the first distribution of a name on sys.path wins), read directly from the
    ``*.dist-info``/``*.egg-info`` folders: importing importlib.metadata cost a tenth of
    vtool's start-up, which every command pays."""
    seen: set[str] = set()
    found: list[EntryPoint] = []
    for base in sys.path:
        try:
            folders = sorted(os.listdir(base or "."))
        except OSError:
            continue
        for folder in folders:
            if not folder.endswith((".dist-info", ".egg-info")):
                continue
            dist = _dist_name(folder)
            if dist in seen:
                continue
            seen.add(dist)
            try:
                with open(os.path.join(base or ".", folder, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            section = None
            for raw in text.splitlines():
                line = raw.strip()
                if not line or line.startswith(("#", ";")):
                    continue
                if line.startswith("[") and line.endswith("]"):
                    section = line[1:-1].strip()
                elif section == group and "=" in line:
                    name, _, value = line.partition("=")
                    found.append(EntryPoint(name.strip(), value.strip()))
    return found


def build() -> pluggy.PluginManager:
    """A fresh plugin manager with every hook checked (a misspelled hook fails, named)."""
    pm = pluggy.PluginManager("vtool")
    pm.add_hookspecs(hookspecs)
    for name in BUILTINS:
        pm.register(importlib.import_module(name), name=name)
    for ep in sorted(entry_points(group="vtool"), key=lambda e: e.name):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as e:  # a broken third-party plugin must not look like a vtool bug
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}") from None
        try:
            pm.register(plugin, name=ep.name)
        except ValueError as e:
            raise PluginError(f"plugin {ep.name!r} could not be registered: {e}") from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        name = pm.get_name(e.plugin) or repr(e.plugin)
        raise PluginError(f"plugin {name!r}: {str(e).split(' in plugin ')[0]}") from None
    return pm


@lru_cache(maxsize=1)
def get() -> pluggy.PluginManager:
    """The process-wide plugin manager (built on first use)."""
    return build()


def third_party_loaded() -> bool:
    """Whether the process-wide plugin manager, if built, holds a plugin other than the
    built-ins (vtool.main.leave)."""
    if not get.cache_info().currsize:
        return False
    return any(plugin is not None and name not in BUILTINS for name, plugin in get().list_name_plugin())


def providers(pm: pluggy.PluginManager) -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {}

    def register(name: str, factory: Callable[..., Any]) -> None:
        if name in found:
            raise PluginError(f"two plugins register a provider named {name!r}")
        found[name] = factory

    pm.hook.vtool_register_providers(register=register)
    return found


def config_defaults(pm: pluggy.PluginManager) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for contribution in pm.hook.vtool_config_defaults():
        if not isinstance(contribution, dict):
            raise PluginError(f"vtool_config_defaults must return a mapping, not {type(contribution).__name__}")
        for key, value in contribution.items():
            if key in merged:
                raise PluginError(f"two plugins declare the setting {key!r}")
            merged[key] = value
    return merged


def extra_tasks(pm: pluggy.PluginManager) -> list[Any]:
    found: list[Any] = []
    pm.hook.vtool_register_tasks(register=found.append)
    return found

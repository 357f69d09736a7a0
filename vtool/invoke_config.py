"""vtool's settings as Invoke reads them: ``VtoolConfig``, an ``invoke.Config`` whose prefix
is ``vtool`` (files vtool.yaml, variables VTOOL_*), for vtool.config.load_settings and
vtool's Program.

It subclasses ``invoke.Config`` rather than ``fabric.Config``: importing fabric pulls in
paramiko and cryptography (~100 ms), and ``vtool --help`` must start fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import invoke
from invoke.env import Environment

from .config import VTOOL_DEFAULTS, _merge, _type_name
from .errors import ConfigError


class _CheckedEnvironment(Environment):
    """Invoke's env loader, with strict casts: VTOOL_DEBUG=false means False, and
    VTOOL_CONCURRENCY=abc is a clear error naming the variable."""

    def _path_set(self, key_path: Any, value: str) -> None:  # type: ignore[override]
        old = self._path_get(key_path)
        var = self._to_env_var(key_path)
        name = f"{self._prefix}{var}" if hasattr(self, "_prefix") else var
        if isinstance(old, bool):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                new: Any = True
            elif low in ("0", "false", "no", "off", ""):
                new = False
            else:
                raise ConfigError(f"environment variable {name} must be true or false, not {value!r}")
        elif isinstance(old, (int, float)) and not isinstance(old, bool):
            try:
                new = int(value) if isinstance(old, int) else float(value)
            except ValueError:
                raise ConfigError(f"environment variable {name} must be {_type_name(old)}, not {value!r}") from None
        elif isinstance(old, list):
            new = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(old, Mapping):
            raise ConfigError(f"environment variable {name} names a group of settings, not one setting")
        else:
            new = value
        obj = self.data
        for key in key_path[:-1]:
            obj = obj.setdefault(key, {})
        obj[key_path[-1]] = new


class VtoolConfig(invoke.Config):
    """An ``invoke.Config`` whose prefix is ``vtool``: files vtool.yaml, env VTOOL_*."""

    prefix = "vtool"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # YAML only: a vtool.py next to a project must never be executed as config.
        self._set(_file_suffixes=("yaml", "yml"))

    @staticmethod
    def global_defaults() -> dict[str, Any]:
        return _merge(invoke.Config.global_defaults(), VTOOL_DEFAULTS)

    def _load_yaml(self, path: Any) -> Any:
        # Invoke calls this for every place a file may be; PyYAML is imported only once a file
        # is there (~3 ms of start-up for most commands).
        try:
            with open(path, encoding="utf-8") as fd:
                text = fd.read()
        except FileNotFoundError:
            raise  # (Invoke's own "no file there")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid YAML (not UTF-8 text)") from None
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}:{at}: not valid YAML ({problem})") from None

    _load_yml = _load_yaml

    def load_shell_env(self) -> None:
        self.merge()
        loader = _CheckedEnvironment(config=self._config, prefix=self._env_prefix)
        self._set(_env=loader.load())
        self.merge()

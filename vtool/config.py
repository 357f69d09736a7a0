"""vtool's configuration: Invoke's config layering with the prefix ``vtool``.

Levels, lowest first: typed defaults (vtool's, then plugins'), ``/etc/vtool.yaml``,
``~/.vtool.yaml``, ``./vtool.yaml``, the selected profile, ``VTOOL_*`` environment
variables, command-line flags. Every file is checked: an unknown key or a value of the
wrong type is refused with the file and the key path named.

Files and variables are read with Invoke's config machinery (``vtool.invoke_config``,
imported only by ``load_settings``: ``vtool run`` from vtool.lean does without Invoke).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import ConfigError
from .models import check_cluster_name

# Every vtool setting with its typed default. Documented in README.md ("Config reference");
# tests/test_docs.py keeps the two in step.
VTOOL_DEFAULTS: dict[str, Any] = {
    "cluster": "default",  # cluster name used when --cluster is not given
    "profile": "",  # profile (a group of settings under `profiles:`) to apply
    "provider": "local",  # local | ec2 | a plugin's provider
    "home": "~/.vtool",  # where all local state lives (VTOOL_HOME)
    "debug": False,  # show full tracebacks of unexpected errors on nodes (VTOOL_DEBUG=1: of every error)
    "concurrency": 64,  # at most this many nodes are worked on at once (as clush's fanout)
    "timeout": {
        "connect": 10,  # seconds to open an SSH connection to a node
        "ready": 60,  # seconds launch waits for new nodes to accept SSH
        "command": 0,  # seconds a `run` command may take per node (0: no limit)
        "transfer": 0,  # seconds an inject/put/get may take per node (0: no limit)
    },
    "ssh": {
        "user": "",  # login user on the nodes ("" = the provider's default)
        "persist": 300,  # seconds a shared SSH connection stays open after the last command
        # ECDH on NIST P-256 first: OpenSSL's code, where OpenSSH's curve25519 is its own portable C.
        # Measured per new connection here (OpenSSH 9.2, OpenSSL 3.0): 9.0 ms of the client's CPU
        # and 19.0 ms of the node's against 11.4 and 21.9 with curve25519 (sntrup761x25519,
        # OpenSSH's default: 74 ms). Servers without it agree on the next one.
        "kex": "ecdh-sha2-nistp256,curve25519-sha256,curve25519-sha256@libssh.org,sntrup761x25519-sha512@openssh.com",
        # The host key a node's first contact pins, by preference: ECDSA P-256 first, which the
        # client verifies with OpenSSL's code (ed25519: OpenSSH's own portable C), 1.2 ms less of
        # its CPU per new connection here. "" = OpenSSH's own order (ed25519 first).
        "hostkeys": "ecdsa-sha2-nistp256,ssh-ed25519,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,rsa-sha2-512,rsa-sha2-256",
        "program": "ssh",  # the OpenSSH client to run
        "nodelay": True,  # open connections through vtool-connect (TCP_NODELAY; built once with cc if there is one)
        "ciphers": "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr",  # AES-GCM first: the fastest where the CPU has AES instructions
    },
    "inject": {
        "auto": True,  # nodes added by a later launch receive the cluster's current release
        "screen": True,  # start the launch script inside screen when the node has it
        "relay": 4,  # from this many nodes up, the client sends a package once and the nodes pass it on (0: never)
        "zstd": True,  # send packages compressed with zstd when this machine and the nodes have it
    },
    "local": {
        "sshd": "",  # path of the sshd binary ("" = look in PATH, /usr/sbin, /usr/local/sbin)
    },
    "profiles": {},  # name -> settings applied when that profile is selected
}

# Keys whose values are free-form mappings (checked elsewhere or not at all).
_FREEFORM = {"profiles"}
# Settings a profile may not change (they choose the profile or locate the state).
_NOT_IN_PROFILE = {"profile", "profiles", "home"}


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``top`` onto a copy of ``base``."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _type_name(value: Any) -> str:
    if isinstance(value, list):
        return "a list of strings"
    return {bool: "true/false", int: "a whole number", float: "a number", str: "a string"}.get(
        type(value), "a mapping" if isinstance(value, Mapping) else type(value).__name__
    )


def _check_value(path: str, default: Any, value: Any, where: str) -> None:
    ok = True
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, Mapping):
        ok = isinstance(value, Mapping)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        raise ConfigError(f"{where}: {path} must be {_type_name(default)}, not {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool) and value < 0:
        raise ConfigError(f"{where}: {path} must not be negative, not {value!r}")


def check_tree(
    data: Any, schema: Mapping[str, Any], where: str, prefix: str = "", allow: frozenset[str] = frozenset()
) -> None:
    """Refuse unknown keys and wrong types in ``data`` (one config level) against ``schema``."""
    if data is None:
        return
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: the file must hold a mapping of settings, not {type(data).__name__}")
    for key, value in data.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str) or key not in schema:
            if not prefix and key in allow:
                continue
            known = ", ".join(sorted(k for k in schema))
            raise ConfigError(f"{where}: unknown setting {path!r} (known here: {known})")
        default = schema[key]
        _check_value(path, default, value, where)
        if isinstance(default, Mapping) and key not in _FREEFORM and default:
            check_tree(value, default, where, prefix=f"{path}.")
        elif key == "profiles" and not prefix:
            for name, body in value.items():
                if not isinstance(body, Mapping):
                    raise ConfigError(f"{where}: profiles.{name} must be a mapping of settings")
                sub = {k: v for k, v in schema.items() if k not in _NOT_IN_PROFILE}
                check_tree(body, sub, where, prefix=f"profiles.{name}.")


@dataclass(frozen=True)
class Timeouts:
    connect: float
    ready: float
    command: float
    transfer: float


@dataclass(frozen=True)
class SshSettings:
    user: str
    persist: int
    kex: str
    program: str
    ciphers: str = ""
    nodelay: bool = True
    hostkeys: str = ""


@dataclass(frozen=True)
class Settings:
    """The effective settings of one command: typed, validated, immutable."""

    cluster: str
    profile: str
    provider: str
    home: Path
    debug: bool
    concurrency: int
    timeout: Timeouts
    ssh: SshSettings
    inject_auto: bool
    inject_screen: bool
    inject_relay: int
    inject_zstd: bool
    local_sshd: str
    tree: Mapping[str, Any]  # the whole merged tree, plugin sections included
    sources: tuple[str, ...] = ()  # config files that were read

    def section(self, name: str) -> Mapping[str, Any]:
        """A plugin's own settings (``docker:``, ``nfs:`` ...) as a read-only mapping."""
        value = self.tree.get(name, {})
        return MappingProxyType(dict(value)) if isinstance(value, Mapping) else MappingProxyType({})

    def replace(self, **changes: Any) -> Settings:
        from dataclasses import replace

        return replace(self, **changes)


def settings_from_tree(tree: dict[str, Any], sources: tuple[str, ...]) -> Settings:
    """The Settings of a merged and checked ``tree`` (``Settings.tree``) read from ``sources``."""
    return _from_tree(tree, sources)


def _from_tree(tree: dict[str, Any], sources: tuple[str, ...]) -> Settings:
    t = tree["timeout"]
    s = tree["ssh"]
    if tree["concurrency"] < 1:
        raise ConfigError(f"concurrency must be at least 1, not {tree['concurrency']}")
    if tree["inject"]["relay"] < 0:
        raise ConfigError(f"inject.relay must be 0 (never relay) or more, not {tree['inject']['relay']}")
    return Settings(
        cluster=check_cluster_name(tree["cluster"]),
        profile=tree["profile"],
        provider=tree["provider"],
        home=Path(os.path.expanduser(tree["home"])).absolute(),
        debug=tree["debug"],
        concurrency=tree["concurrency"],
        timeout=Timeouts(
            connect=float(t["connect"]),
            ready=float(t["ready"]),
            command=float(t["command"]),
            transfer=float(t["transfer"]),
        ),
        ssh=SshSettings(
            user=s["user"],
            persist=int(s["persist"]),
            kex=s["kex"],
            program=s["program"],
            ciphers=s["ciphers"],
            nodelay=s["nodelay"],
            hostkeys=s["hostkeys"],
        ),
        inject_auto=tree["inject"]["auto"],
        inject_screen=tree["inject"]["screen"],
        inject_relay=tree["inject"]["relay"],
        local_sshd=tree["local"]["sshd"],
        inject_zstd=tree["inject"]["zstd"],
        tree=MappingProxyType(tree),
        sources=sources,
    )


# Settings naming a program vtool runs: a project's ./vtool.yaml (which arrives with a
# downloaded project) may not set them; ~/.vtool.yaml, /etc/vtool.yaml and VTOOL_* may.
_PROGRAMS = (("ssh", "program"), ("local", "sshd"))


def _refuse_programs(data: Mapping[str, Any], where: str) -> None:
    trees = [("", data)] + [(f"profiles.{k}.", v) for k, v in (data.get("profiles") or {}).items()]
    for prefix, tree in trees:
        for section, key in _PROGRAMS:
            if isinstance(tree.get(section), Mapping) and key in tree[section]:
                raise ConfigError(
                    f"{where}: {prefix}{section}.{key} names a program to run; a project's vtool.yaml may not set "
                    f"it (use ~/.vtool.yaml or VTOOL_{section.upper()}_{key.upper()})"
                )


def load_settings(
    *,
    cluster: str | None = None,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    plugin_defaults: Mapping[str, Any] | None = None,
    project_dir: str | None = None,
    system_prefix: str | None = None,
    user_prefix: str | None = None,
) -> Settings:
    """Read every config level and return the effective, validated settings.

    ``cluster``/``profile`` are the command-line flags; ``overrides`` are other flags as a
    nested mapping (``{"timeout": {"ready": 5}}``).
    """
    import invoke

    from .invoke_config import VtoolConfig

    schema = _merge(VTOOL_DEFAULTS, plugin_defaults or {})
    cfg = VtoolConfig(
        defaults=_merge(invoke.Config.global_defaults(), schema),
        lazy=True,
        system_prefix=system_prefix,
        user_prefix=user_prefix,
    )
    cfg.set_project_location(project_dir if project_dir is not None else os.getcwd())
    invoke_keys = frozenset(invoke.Config.global_defaults())
    levels: list[tuple[str, dict[str, Any]]] = []
    for level in ("system", "user", "project"):
        getattr(cfg, f"load_{level}")(merge=False)
        data = getattr(cfg, f"_{level}") or {}
        path = getattr(cfg, f"_{level}_path")
        if path:
            check_tree(data, schema, str(path), allow=invoke_keys)
            if level == "project":
                _refuse_programs(data, str(path))
            levels.append((str(path), data))
    cfg.merge()
    cfg.load_shell_env()
    env = cfg._env or {}

    tree: dict[str, Any] = copy.deepcopy(schema)
    for _path, data in levels:
        tree = _merge(tree, {k: v for k, v in data.items() if k not in invoke_keys})
    # The profile's name can come from a file, the environment or the flag.
    chosen = profile if profile is not None else env.get("profile", tree.get("profile", ""))
    if chosen:
        profiles = tree.get("profiles") or {}
        if chosen not in profiles:
            names = ", ".join(sorted(profiles)) or "none defined"
            raise ConfigError(
                f"unknown profile {chosen!r} (profiles: {names}); define it under `profiles:` in vtool.yaml"
            )
        tree = _merge(tree, profiles[chosen])
    env_tree = {k: v for k, v in env.items() if k not in invoke_keys}
    check_tree(env_tree, schema, "environment (VTOOL_*)")  # e.g. a negative timeout
    tree = _merge(tree, env_tree)
    if overrides:
        check_tree(overrides, schema, "command line")
        tree = _merge(tree, overrides)
    tree["profile"] = chosen or ""
    if cluster is not None:
        tree["cluster"] = cluster
    return _from_tree(tree, tuple(p for p, _ in levels))

"""Config layering: defaults < /etc < ~ < ./vtool.yaml < profile < VTOOL_* < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtool.config import VTOOL_DEFAULTS, load_settings
from vtool.errors import ConfigError


def _layers(tmp_path: Path) -> dict[str, Path]:
    d = {k: tmp_path / k for k in ("etc", "user", "project")}
    for p in d.values():
        p.mkdir()
    return d


def _load(d: dict[str, Path], **kw):  # type: ignore[no-untyped-def]
    return load_settings(system_prefix=f"{d['etc']}/", user_prefix=f"{d['user']}/.", project_dir=str(d["project"]), **kw)


def test_every_level_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in __import__("os").environ if k.startswith("VTOOL_")]:
        monkeypatch.delenv(k)
    d = _layers(tmp_path)
    s = _load(d)
    assert (s.cluster, s.provider, s.concurrency, s.timeout.ready) == ("default", "local", 64, 60.0)
    (d["etc"] / "vtool.yaml").write_text("concurrency: 4\ntimeout:\n  ready: 11\n  connect: 3\ncluster: from-etc\n")
    (d["user"] / ".vtool.yaml").write_text("concurrency: 5\ncluster: from-user\n")
    (d["project"] / "vtool.yaml").write_text(
        "cluster: from-project\nprofiles:\n  big:\n    concurrency: 64\n    timeout:\n      ready: 99\n"
    )
    s = _load(d)
    assert (s.cluster, s.concurrency, s.timeout.ready, s.timeout.connect) == ("from-project", 5, 11.0, 3.0)
    assert [Path(p).parent.name for p in s.sources] == ["etc", "user", "project"]
    s = _load(d, profile="big")
    assert (s.concurrency, s.timeout.ready, s.timeout.connect, s.profile) == (64, 99.0, 3.0, "big")
    monkeypatch.setenv("VTOOL_CONCURRENCY", "7")
    monkeypatch.setenv("VTOOL_PROFILE", "big")
    monkeypatch.setenv("VTOOL_CLUSTER", "from-env")
    monkeypatch.setenv("VTOOL_INJECT_AUTO", "false")
    s = _load(d)
    assert (s.cluster, s.concurrency, s.timeout.ready, s.inject_auto) == ("from-env", 7, 99.0, False)
    s = _load(d, cluster="from-flag", overrides={"timeout": {"ready": 5}})
    assert (s.cluster, s.timeout.ready) == ("from-flag", 5.0)


def test_home_and_plugin_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _layers(tmp_path)
    monkeypatch.setenv("VTOOL_HOME", str(tmp_path / "state"))
    (d["project"] / "vtool.yaml").write_text("docker:\n  enabled: true\n")
    with pytest.raises(ConfigError, match="unknown setting 'docker'"):
        _load(d)
    s = _load(d, plugin_defaults={"docker": {"enabled": False, "image": "ubuntu"}})
    assert s.home == tmp_path / "state"
    assert dict(s.section("docker")) == {"enabled": True, "image": "ubuntu"}
    with pytest.raises(TypeError):
        s.section("docker")["enabled"] = False  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ssh:\n  persist: yes\n", "ssh.persist must be a whole number, not True"),
        ("inject:\n  auto: 1\n", "inject.auto must be true/false"),
        ("timeout:\n  nope: 1\n", "unknown setting 'timeout.nope'"),
        ("timeout: 5\n", "timeout must be a mapping"),
        ("profiles:\n  p: 3\n", "profiles.p must be a mapping"),
    ],
)
def test_wrong_types_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    d = _layers(tmp_path)
    (d["user"] / ".vtool.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        _load(d)
    assert message in str(e.value) and str(d["user"] / ".vtool.yaml") in str(e.value)


def test_every_default_is_typed() -> None:
    def walk(tree: dict, prefix: str = "") -> None:  # type: ignore[type-arg]
        for k, v in tree.items():
            assert v is not None, f"{prefix}{k} has no typed default"
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")

    walk(VTOOL_DEFAULTS)

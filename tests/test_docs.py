"""Docs that tests keep honest: every setting in the README, every hook in docs/plugins.md,
and the README's two commands are the ones .ci/run and the scripts use."""

from __future__ import annotations

import re

from conftest import REPO

from vtool import hookspecs
from vtool.config import VTOOL_DEFAULTS


def _keys(tree: dict, prefix: str = "") -> list[str]:  # type: ignore[type-arg]
    out = []
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out += _keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def test_every_setting_is_in_the_config_reference() -> None:
    from vtool import plugin_manager

    readme = (REPO / "README.md").read_text()
    builtin = plugin_manager.config_defaults(plugin_manager.build())  # the built-in providers' sections
    missing = [k for k in _keys({**VTOOL_DEFAULTS, **builtin}) if f"`{k}`" not in readme]
    assert not missing, f"settings missing from README.md's config reference: {missing}"


def test_every_hook_is_documented() -> None:
    doc = (REPO / "docs" / "plugins.md").read_text()
    hooks = [n for n in dir(hookspecs) if n.startswith("vtool_")]
    assert len(hooks) >= 10
    missing = [h for h in hooks if not re.search(rf"^#+ `{h}`", doc, re.M)]
    assert not missing, f"hooks without a section in docs/plugins.md: {missing}"
    for h in hooks:
        assert (getattr(hookspecs, h).__doc__ or "").strip(), f"{h} has no docstring"


def test_readme_two_commands_match_ci() -> None:
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1] == "bash scripts/test.sh"


def test_every_verb_has_help_text() -> None:
    from vtool.tasks import collection

    ns = collection()
    for name in ns.task_names:
        task = ns[name]
        assert (task.__doc__ or task.body.__doc__ or "").strip(), f"{name} has no docstring"
        params = [p for p in task.get_arguments()]
        for arg in params:
            assert arg.help, f"{name} --{arg.name} has no help text"

"""The layering of STYLE.md, checked on the imports themselves, and a fast start-up."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PKG = REPO / "vtool"
# Lowest first; a module may import only from its own layer or below (errors/models at the bottom).
LAYERS = [
    {"errors", "models", "early", "mux", "keeper"},
    {"hookspecs", "config", "invoke_config", "output"},
    {"state", "ssh", "package", "fetch", "remote"},
    {"providers", "plugins"},
    {"plugin_manager", "fanout", "distribute"},
    {"api"},
    {"tasks", "lean"},
    {"main", "program", "__main__", "__init__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"vtool.{module} is not placed in a layer: add it to LAYERS")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PKG).with_suffix("")
    package = list(rel.parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
                if not mod and node.names:  # `from . import x`: a module, or a name of vtool/__init__
                    found.update(
                        n.name if (PKG / f"{n.name}.py").exists() or (PKG / n.name).is_dir() else "__init__"
                        for n in node.names
                    )
                elif mod:
                    found.add(mod)
            elif node.module and node.module.startswith("vtool."):
                found.add(node.module[len("vtool."):])
        elif isinstance(node, ast.Import):
            found.update(a.name[len("vtool."):] for a in node.names if a.name.startswith("vtool."))
    return found


def test_imports_only_go_down() -> None:
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        me = ".".join(rel.parts)
        mine = _layer(me if rel.parts[0] not in ("__init__",) else "__init__")
        for target in _imports(path):
            if target.split(".")[0] == me.split(".")[0]:
                continue
            if _layer(target) > mine:
                bad.append(f"vtool/{rel}.py imports vtool.{target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_plugins_and_providers_do_not_import_each_other_or_api() -> None:
    for folder in ("plugins", "providers"):
        for path in (PKG / folder).glob("*.py"):
            for target in _imports(path):
                top = target.split(".")[0]
                assert top not in ("api", "tasks", "plugin_manager"), f"{path} imports {target}"
                if folder == "plugins":
                    assert not target.startswith("plugins."), f"{path} imports another plugin: {target}"


def test_only_tasks_print() -> None:
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] in ("tasks", "main.py", "program.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                raise AssertionError(f"vtool/{rel}:{node.lineno} prints; only tasks/*, main and program print")


def test_help_and_list_load_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from vtool.main import make_program\n"
        "p = make_program()\n"
        "try:\n    p.run(['vtool', '--list'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('boto3', 'botocore', 'paramiko', 'fabric', 'cryptography') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert r.stdout.strip().splitlines()[-1] == "HEAVY=", f"heavy modules loaded by --list: {r.stdout}"
    assert "launch" in r.stdout


def test_start_up_puts_off_invokes_mock_and_yaml_and_both_still_work() -> None:
    """vtool's console entry does not import unittest.mock (asyncio, ssl) or any YAML for a
    command that reads no YAML file; Invoke's MockContext and its YAML config still work after
    it, with the real modules."""
    code = (
        "import sys, os, tempfile\n"
        "sys.argv = ['vtool', '--list']\n"
        "import vtool.main\n"
        "from vtool.main import main\n"
        "make = vtool.main.make_program\n"
        "def checked(*args):  # plugins load in make_program: no stand-in may be left by then\n"
        "    assert 'unittest.mock' not in sys.modules and 'invoke.vendor.yaml' not in sys.modules\n"
        "    return make(*args)\n"
        "vtool.main.make_program = checked\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "loaded = [m for m in ('unittest.mock', 'asyncio', 'ssl', 'yaml', 'invoke.vendor.yaml') if m in sys.modules]\n"
        "print('LOADED=' + ','.join(loaded))\n"
        "from invoke import Config, MockContext, Result\n"
        "c = MockContext(run={'true': Result('yes')})\n"
        "assert c.run('true').stdout == 'yes'\n"
        "c.run.assert_called_once_with('true')\n"
        "import unittest.mock\n"
        "assert isinstance(c.run, unittest.mock.Mock) and callable(unittest.mock.patch)\n"
        "f = os.path.join(tempfile.mkdtemp(), 'x.yaml')\n"
        "open(f, 'w').write('a: {b: 7}\\n')\n"
        "cfg = Config(runtime_path=f)\n"
        "cfg.load_runtime()\n"
        "import invoke.vendor.yaml as y\n"
        "print('B=%s REAL=%s' % (cfg.a.b, hasattr(y, 'safe_load')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    lines = r.stdout.strip().splitlines()
    assert "LOADED=" in lines, r.stdout  # none of them
    assert lines[-1] == "B=7 REAL=True", r.stdout


def test_start_up_pauses_the_garbage_collector_and_the_task_runs_with_it() -> None:
    """vtool.main pauses Python's cyclic garbage collector while it starts (nothing it makes
    is garbage), and the command's task runs with the collector on again, start-up's objects
    frozen; a command that stops before any task (--list) turns it back on too."""
    code = (
        "import gc, sys\n"
        "import vtool.main, vtool.program\n"
        "seen = []\n"
        "make = vtool.main.make_program\n"
        "def checked(*args):\n"
        "    seen.append(('start', gc.isenabled()))\n"
        "    return make(*args)\n"
        "vtool.main.make_program = checked\n"
        "def task(self):\n"
        "    seen.append(('task', gc.isenabled(), gc.get_freeze_count() > 1000))\n"
        "vtool.program.Program.execute = task\n"
        "for argv in (['vtool', 'status'], ['vtool', '--list']):\n"
        "    sys.argv = argv\n"
        "    try:\n        vtool.main.main()\n    except SystemExit:\n        pass\n"
        "    seen.append(('after', gc.isenabled()))\n"
        "    gc.unfreeze()\n"
        "print(seen)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert r.stdout.strip().splitlines()[-1] == str(
        [("start", False), ("task", True, True), ("after", True), ("start", False), ("after", True)]
    ), r.stdout


def test_a_command_line_is_parsed_against_the_tasks_it_names() -> None:
    """(VtoolProgram._make_parser) Help for a task either way round, a task's options, an
    unknown word and shell completion of every task, as Invoke gives them."""

    def vtool(*args: str) -> subprocess.CompletedProcess[str]:
        script = Path(sys.executable).with_name("vtool")  # (as installed: completion reads its name)
        return subprocess.run([str(script), *args], capture_output=True, text=True, cwd=REPO)

    for args in (("--help", "scpget"), ("scpget", "--help")):
        r = vtool(*args)
        assert r.returncode == 0 and "Usage: vtool [--core-opts] scpget" in r.stdout and "--node" in r.stdout, r
    r = vtool("nosuch", "run")
    assert r.returncode != 0 and "No idea what 'nosuch' is!" in r.stderr, r
    r = vtool("--complete", "--", "vtool", "s")
    assert {"scpget", "scpgetall", "status", "ssh-config", "terminate"} <= set(r.stdout.split()), r
    r = vtool("--complete", "--", "vtool", "run", "--")
    assert "--only-failed" in r.stdout.split(), r

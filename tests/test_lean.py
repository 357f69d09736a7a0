"""vtool.lean: a repeated ``vtool run`` without Invoke, and only when nothing it skips could
make a difference. Which path a command took is seen from Python's own import log
(``-X importtime``): the lean path never imports Invoke."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, Env, fake_dist


def _run(
    env: Env, *args: str, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], bool]:
    """``vtool run ARGS``; the result without the import log, and whether it took the lean path."""
    r = env.run_cmd([sys.executable, "-X", "importtime", "-m", "vtool", "run", *args], extra_env=extra_env)
    log = [ln for ln in r.stderr.splitlines() if ln.startswith("import time:")]
    assert log, "no import log: is -X importtime still Python's?"
    lean = not any(ln.rsplit("|", 1)[-1].strip() == "invoke" for ln in log)
    err = "\n".join(ln for ln in r.stderr.splitlines() if not ln.startswith("import time:"))
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout, err), lean


def _imported(env: Env, *args: str) -> set[str]:
    """The modules ``vtool run ARGS`` imported (its exit code must be 0)."""
    r = env.run_cmd([sys.executable, "-X", "importtime", "-m", "vtool", "run", *args])
    assert r.returncode == 0, r.stderr[-2000:]
    return {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}


def _rows(stderr: str) -> list[tuple[str, ...]]:
    """The summary table's rows without the time column, and the lines after it."""
    out = []
    for ln in stderr.splitlines():
        words = ln.split()
        if words and words[0].isdigit() and len(words) >= 3 and words[2].endswith("s"):
            out.append((words[0], words[1], *words[3:]))
        elif ln and not ln.startswith("node "):
            out.append((ln,))
    return out


def test_a_repeated_run_goes_without_invoke_and_says_the_same(venv: Env) -> None:
    venv.ok("launch", "3")
    command = "echo out-$VTOOL_NODE_INDEX; echo err-$VTOOL_NODE_INDEX >&2; exit $VTOOL_NODE_INDEX"
    full, lean = _run(venv, command)
    assert not lean  # (the first: its settings are not on record yet)
    again, lean = _run(venv, command)
    assert lean
    assert (again.returncode, sorted(again.stdout.splitlines())) == (full.returncode, sorted(full.stdout.splitlines()))
    assert full.returncode == 1 and "[2] out-2" in full.stdout
    assert sorted(_rows(again.stderr)) == sorted(_rows(full.stderr)), (again.stderr, full.stderr)
    assert "vtool: the command failed on 2 of 3 node(s): 1, 2" in again.stderr
    r, lean = _run(venv, "echo again-$VTOOL_NODE_INDEX", "--only-failed")
    assert lean and r.returncode == 0 and sorted(r.stdout.splitlines()) == ["[1] again-1", "[2] again-2"]
    r, lean = _run(venv, "-c", "default", "--nodes", "0", "hostname")
    assert not lean  # (another --cluster flag: another context, its record written by this one)
    r, lean = _run(venv, "-c", "default", "--nodes=0", "true")
    assert lean and r.returncode == 0
    bad, lean = _run(venv, "true", "--nodes", "7")
    assert lean
    off = venv.cli("run", "true", "--nodes", "7", extra_env={"VTOOL_LEAN": "0"})
    want = (4, "vtool: no node 7 in this cluster (nodes: 0,1,2)")
    assert (bad.returncode, bad.stderr.strip()) == (off.returncode, off.stderr.strip()) == want


def test_settings_on_record_are_the_ones_read_and_a_change_is_read_again(venv: Env) -> None:
    """The lean path uses the settings the last full one read; a changed vtool.yaml is a new
    context (vtool.early), so the full path reads it first."""
    venv.ok("launch", "2")
    (venv.work / "vtool.yaml").write_text("timeout:\n  command: 1\n")
    for lean_expected in (False, True):
        r, lean = _run(venv, "sleep 30")
        assert lean == lean_expected
        assert r.returncode == 1 and "timed out" in r.stderr, r.stderr
    (venv.work / "vtool.yaml").write_text("timeout:\n  command: 0\n")
    r, lean = _run(venv, "sleep 1; echo slept")
    assert not lean and r.returncode == 0 and r.stdout.count("slept") == 2


def test_anything_it_does_not_read_goes_to_invoke(venv: Env) -> None:
    venv.ok("launch", "2")
    _run(venv, "true")
    assert _run(venv, "true")[1]  # (the settings are on record)
    r, lean = _run(venv, "--help")
    assert not lean and r.returncode == 0 and "--only-failed" in r.stdout
    r, lean = _run(venv, "true", "--bogus")
    assert not lean and r.returncode != 0 and "--bogus" in r.stderr
    r, lean = _run(venv, "echo", "hi")  # (Invoke: a second word is another task)
    assert not lean and r.returncode != 0 and "'hi'" in r.stderr
    r, lean = _run(venv, "true", extra_env={"VTOOL_DEBUG": "1"})
    assert not lean and r.returncode == 0


def test_a_plugin_that_came_or_broke_since_is_seen(venv: Env) -> None:
    """A plugin installed since (PYTHONPATH is not part of vtool.early's context) with settings
    of its own takes the full path; a broken one is reported as always."""
    venv.ok("launch", "2")
    _run(venv, "true")
    assert _run(venv, "true")[1]
    code = "from vtool import hookimpl\n\n@hookimpl\ndef vtool_config_defaults():\n    return {'leanplug': {'x': 1}}\n"
    site = fake_dist(venv.root / "p", "leanplug", code)
    path = {"PYTHONPATH": f"{site}:{venv.env['PYTHONPATH']}"}
    r, lean = _run(venv, "true", extra_env=path)
    assert not lean and r.returncode == 0
    assert _run(venv, "true", extra_env=path)[1]  # (now on record, with the plugin's settings)
    assert not _run(venv, "true")[1]  # (and without it: not the same settings)
    broken = fake_dist(venv.root / "b", "brokenplug", "raise RuntimeError('boom at import')\n")
    r, lean = _run(venv, "true", extra_env={"PYTHONPATH": f"{broken}:{venv.env['PYTHONPATH']}"})
    assert not lean and r.returncode == 5 and "boom at import" in r.stderr


def test_the_lean_path_ends_as_python_would_with_what_must_run_at_exit(venv: Env) -> None:
    """vtool.main.leave ends a lean run without the interpreter's tear-down, unless a
    third-party plugin was loaded. Without one: the exit code and every line of a long output
    come through, and the tear-down is skipped (seen by a file that ``sitecustomize`` opened
    and never closed: only the tear-down flushes it). With one: the usual exit, so the
    plugin's exit handler runs, a thread it left running that is not a daemon is waited for,
    and a file it never closed is flushed."""
    venv.ok("launch", "2")
    marks = venv.root / "marks"
    marks.mkdir()
    probe = venv.root / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(
        f"import os\n_f = open(os.path.join({str(marks)!r}, f'site-{{os.getpid()}}'), 'w')\n_f.write('flushed')\n"
    )
    code = (
        "import atexit, os, pathlib, threading, time\n"
        f"marks = pathlib.Path({str(marks)!r})\n"
        "n = os.getpid()\n"
        "atexit.register(lambda: (marks / f'exit-{n}').write_text('ran'))\n"
        "_log = open(marks / f'log-{n}', 'w')\n"
        "_log.write('flushed')\n"
        "def late():\n"
        "    time.sleep(0.5)\n"
        "    (marks / f'thread-{n}').write_text('ran')\n"
        "if os.environ.get('LATE'):\n"
        "    threading.Thread(target=late).start()\n"
    )
    site = fake_dist(venv.root / "p", "exitplug", code)
    command = "seq 3000; exit $VTOOL_NODE_INDEX"

    def run(path: str, late: str = "") -> tuple[bool, list[tuple[str, str]]]:
        for p in marks.iterdir():
            p.unlink()
        r, lean = _run(venv, command, extra_env={"PYTHONPATH": f"{path}:{venv.env['PYTHONPATH']}", "LATE": late})
        assert r.returncode == 1 and "failed on 1 of 2 node(s): 1" in r.stderr
        assert len(r.stdout.splitlines()) == 6000 and r.stdout.endswith("3000\n")
        return lean, sorted((p.name.split("-")[0], p.read_text()) for p in marks.iterdir())

    assert run(str(probe)) == (False, [("site", "flushed")])  # (the first: Invoke's path, the usual exit)
    assert run(str(probe)) == (True, [("site", "")])  # (no tear-down)
    path = f"{probe}:{site}"
    everything = [("exit", "ran"), ("log", "flushed"), ("site", "flushed"), ("thread", "ran")]
    assert run(path, late="1") == (True, everything)
    assert run(path) == (True, everything[:3])


def test_the_lean_path_imports_no_more_than_it_uses(venv: Env) -> None:
    """A repeated ``vtool run`` (its connections open: the keeper's, then OpenSSH masters as
    ``inject`` leaves them): no Invoke, and none of the modules whose import was measured as
    a share of its start-up while it did not use them."""
    venv.ok("launch", "2", "--no-inject")
    _run(venv, "true")
    loaded = _imported(venv, "true")
    assert "vtool.api" in loaded and "pluggy" in loaded  # (the log is the command's)
    unused = {"invoke", "subprocess", "concurrent.futures", "logging", "traceback", "vtool.keeper"}
    assert not loaded & unused, sorted(loaded & unused)
    venv.ok("inject", str(REPO / "pkg-examples" / "hello"))
    _run(venv, "true")
    loaded = _imported(venv, "true")
    assert "vtool.api" in loaded and "pluggy" in loaded  # (the log is the command's)
    unused = {"invoke", "subprocess", "concurrent.futures", "logging", "traceback", "vtool.keeper"}
    assert not loaded & unused, sorted(loaded & unused)


@pytest.mark.parametrize(
    "args, parsed",
    [
        (["hostname"], {"command": "hostname"}),
        (
            ["-c", "x", "ls -l", "--nodes=1-2", "-o"],
            {"cluster": "x", "command": "ls -l", "nodes": "1-2", "only_failed": True},
        ),
        (["--profile", "p", "-n", "0", "true"], {"profile": "p", "nodes": "0", "command": "true"}),
        ([], None),
        (["-c", "x"], None),
        (["a", "b"], None),
        (["true", "--help"], None),
        (["true", "-h"], None),
        (["true", "-c=x"], None),
        (["true", "--nodes", "--only-failed"], None),
        (["true", "--cluster=-x"], None),
        (["true", "-c"], None),
        (["true", "-c", "a", "-c", "b"], None),
        (["true", "--command", "x"], None),
        (["--", "true"], None),
    ],
)
def test_what_the_lean_path_reads(args: list[str], parsed: dict[str, object] | None) -> None:
    from vtool import lean

    assert lean.parse(args) == parsed

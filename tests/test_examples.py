"""The packages in pkg-examples/ do what their READMEs say, on real sshd nodes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from conftest import BIN, EXAMPLES, Env, wait_for


def test_compile_builds_on_the_node_and_the_fetched_binary_runs_locally(venv: Env) -> None:
    # A copy with a local build in it: .gitignore must keep build/ out of the package.
    pkg = shutil.copytree(EXAMPLES / "compile", venv.root / "pkgs" / "compile")
    subprocess.run(["make", "-s"], cwd=pkg, check=True, capture_output=True)
    assert (pkg / "build" / "bin" / "prime").exists()
    venv.ok("launch", "1")
    venv.ok("inject", str(pkg))
    wait_for(lambda: "prime number 1000 is 7919" in venv.ok("logs").stdout, timeout=60)
    logs = venv.ok("logs").stdout
    assert "cc -O2 -Wall -Wextra -o " in logs and "node 0: built " in logs  # make's commands are logged
    assert (venv.node_home(0) / "compile" / "Makefile").exists()
    assert not (venv.node_home(0) / "compile" / "build").exists()

    venv.ok("scpget", "compile-out/bin/prime", ".")
    r = subprocess.run([str(venv.work / "prime"), "10000"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "prime number 10000 is 104729\n"


def _samples_per_node() -> int:
    m = re.search(r"^SAMPLES = ([\d_]+)", (EXAMPLES / "monte-carlo" / "mc.py").read_text(), re.M)
    assert m, "mc.py has no SAMPLES = N line"
    return int(m.group(1))


def test_monte_carlo_shards_combine_to_pi(venv: Env) -> None:
    venv.ok("launch", "3")
    venv.ok("inject", str(EXAMPLES / "monte-carlo"))
    wait_for(lambda: all((venv.node_home(i) / "mc-shard.json").exists() for i in range(3)), timeout=60)
    venv.ok("scpgetall", "mc-shard.json", "out/shard")
    r = venv.run_cmd([sys.executable, str(EXAMPLES / "monte-carlo" / "combine.py"), "out/shard"])
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no warning about missing shards
    total = int(re.search(r"^total samples: (\d+)$", r.stdout, re.M).group(1))  # type: ignore[union-attr]
    estimate = float(re.search(r"^pi ~ ([\d.]+)", r.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert total == 3 * _samples_per_node()
    assert abs(estimate - 3.141592653589793) < 0.1
    seeds = {json.loads((venv.work / "out" / f"shard.{i}").read_text())["inside"] for i in range(3)}
    assert len(seeds) == 3  # each node drew its own points

    # After a partial terminate the indices have a gap; ranks stay dense (as the README says).
    venv.ok("terminate", "--nodes", "1", "--yes")
    venv.ok("inject", str(EXAMPLES / "monte-carlo"))
    shard2 = venv.node_home(2) / "mc-shard.json"
    wait_for(lambda: json.loads(shard2.read_text())["count"] == 2, timeout=60)
    assert json.loads(shard2.read_text())["rank"] == 1


def test_project_tasks_file_has_every_verb_and_its_own_task(venv: Env) -> None:
    folder = EXAMPLES / "project-tasks"
    inv = str(BIN / "inv")
    listing = venv.run_cmd([inv, "--list"], cwd=folder)
    assert listing.returncode == 0, listing.stderr
    for name in ("launch", "inject", "run", "scpgetall", "terminate", "sweep"):
        assert re.search(rf"^\s+{name}\s", listing.stdout, re.M), f"{name} missing from:\n{listing.stdout}"
    assert "dev." not in listing.stdout  # that folder's tasks.py, not the repository's

    none = venv.run_cmd([inv, "sweep"], cwd=folder)
    assert none.returncode == 4
    assert "no cluster named 'default'" in none.stderr and "Traceback" not in none.stderr

    assert venv.run_cmd([inv, "launch", "2"], cwd=folder).returncode == 0
    r = venv.run_cmd([inv, "sweep"], cwd=folder)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^node 0: rank 0 of 2 on \S+$", r.stdout, re.M), r.stdout
    assert re.search(r"^node 1: rank 1 of 2 on \S+$", r.stdout, re.M), r.stdout
    failing = venv.run_cmd([inv, "sweep", "--command", "exit 3"], cwd=folder)
    assert failing.returncode == 1
    assert "node 0: FAILED (exited 3)" in failing.stdout
    assert venv.run_cmd([inv, "terminate", "--yes"], cwd=folder).returncode == 0


def test_third_party_plugin_installed_with_pip(venv: Env) -> None:
    # Built from a copy: pip leaves build/ and *.egg-info next to the sources.
    src = shutil.copytree(EXAMPLES / "vtool-plugin-example", venv.root / "plugin-src")
    site = venv.root / "plugin-site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    with_plugin = {"PYTHONPATH": f"{site}{os.pathsep}{venv.env['PYTHONPATH']}"}

    def vtool(*args: str) -> subprocess.CompletedProcess[str]:
        return venv.cli(*args, extra_env=with_plugin)

    assert "example-hello" in vtool("--list").stdout
    assert "example-hello" not in venv.cli("--list").stdout  # not installed: not there
    r = vtool("example-hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from vtool-plugin-example (greeting 'hi', disabled)\n"

    # Disabled (the default): nothing on the nodes.
    assert vtool("launch", "1").returncode == 0
    assert not (venv.node_home(0) / "example-plugin-was-here").exists()
    r = vtool("run", 'echo "[${EXAMPLE_GREETING-unset}]"')
    assert "[0] [unset]" in r.stdout, r.stdout + r.stderr
    assert vtool("terminate", "--yes").returncode == 0

    config = venv.work / "vtool.yaml"
    config.write_text("example:\n  enabled: maybe\n")
    r = vtool("example-hello")
    assert r.returncode == 2
    assert "example.enabled must be true/false" in r.stderr

    config.write_text("example:\n  enabled: true\n  greeting: hello-from-plugin\n")
    r = vtool("launch", "2")
    assert r.returncode == 0, r.stderr
    r = vtool("run", "echo $EXAMPLE_GREETING; cat ~/example-plugin-was-here")
    assert r.returncode == 0, r.stderr
    for i in range(2):
        assert r.stdout.count(f"[{i}] hello-from-plugin\n") == 2, r.stdout
    assert vtool("terminate", "--yes").returncode == 0

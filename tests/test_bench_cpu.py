"""The bench's CPU count (bench/bench.py ``CpuGroup``): what the kernel counts in a control
group is what the processes started in it used, including one that outlives its parent (an
OpenSSH ControlPersist master), and nothing of what this process does outside it."""

from __future__ import annotations

import importlib.util
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import REPO

BURN = "import time\nwhile time.process_time() < {s}: pass\n"


@pytest.fixture(scope="module")
def bench() -> Iterator[Any]:
    spec = importlib.util.spec_from_file_location("vtool_bench", REPO / "bench" / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture
def group(bench: Any) -> Iterator[Any]:
    g = bench.CpuGroup.make(f"vtool-test-{os.getpid()}-{time.monotonic_ns()}")
    if g is None:
        pytest.skip("no control group this process can make, join and leave here")
    try:
        yield g
    finally:
        g.remove()


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_the_group_counts_its_processes_and_not_this_one(group: Any) -> None:
    before = group.seconds()
    with group.inside():
        child = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.3)])
    _burn(0.3)  # this process, outside the group again
    _, _, ru = os.wait4(child.pid, 0)
    used = group.seconds() - before
    child_cpu = ru.ru_utime + ru.ru_stime
    assert child_cpu >= 0.29
    # the child's CPU (rusage comes in ticks: a little slack), and not this process's 0.3 s
    assert child_cpu - 0.02 <= used <= child_cpu + 0.1, (used, child_cpu)


def test_a_process_that_outlives_its_parent_is_counted(group: Any, tmp_path: Any) -> None:
    """As a ControlPersist master: started by the command, running after it has exited."""
    done = tmp_path / "done"
    script = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    while time.process_time() < 0.3: pass\n"
        f"    open({str(done)!r}, 'w').close()\n"
        "    os._exit(0)\n"
    )
    before = group.seconds()
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    with group.inside():
        parent = subprocess.Popen([sys.executable, "-c", script])
    parent.wait()  # the parent is gone; its child burns on
    deadline = time.monotonic() + 30
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done.exists(), "the orphan never finished"
    time.sleep(0.05)  # (it exits right after writing the file)
    used = group.seconds() - before
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    waited = (self_after.ru_utime - self_before.ru_utime) + (self_after.ru_stime - self_before.ru_stime)
    assert used >= 0.3, used  # the orphan's 0.3 s, which no wait4 of ours reports
    assert used < 0.3 + 0.5, used  # two short Python starts at most besides
    assert waited < 0.2  # (this process only waited)

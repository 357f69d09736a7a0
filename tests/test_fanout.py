"""vtool.fanout: worker threads are kept from one call to the next, and an operation that
fans out itself gets workers of its own (never a deadlock on its caller's slots)."""

from __future__ import annotations

import threading

from vtool import fanout
from vtool.errors import NodeError
from vtool.models import Node


def _nodes(n: int) -> list[Node]:
    return [Node("t", i, f"id{i}", "local", "127.0.0.1", 22, "u", "127.0.0.1") for i in range(n)]


def _one_call(concurrency: int) -> tuple[set[int], int]:
    """The threads that ran 12 operations, and the most that ran at once."""
    idents: set[int] = set()
    lock = threading.Lock()
    busy = {"now": 0, "most": 0}

    def op(node: Node) -> int:
        with lock:
            idents.add(threading.get_ident())
            busy["now"] += 1
            busy["most"] = max(busy["most"], busy["now"])
        threading.Event().wait(0.01)
        with lock:
            busy["now"] -= 1
        return node.index

    r = fanout.fan_out(_nodes(12), op, concurrency=concurrency)
    assert [x.value for x in r.results] == list(range(12)) and r.ok
    return idents, busy["most"]


def test_workers_are_kept_for_the_next_call_and_bounded() -> None:
    calls = [_one_call(3) for _ in range(3)]
    assert all(most <= 3 for _, most in calls)
    first = calls[0][0]
    assert calls[1][0] <= first and calls[2][0] <= first  # the same threads, not new ones


def test_an_operation_that_fans_out_itself_finishes_with_one_slot() -> None:
    def inner(node: Node) -> int:
        return node.index * 10

    def outer(node: Node) -> int:
        r = fanout.fan_out(_nodes(3), inner, concurrency=1)
        return sum(x.value for x in r.results)

    before = {t.ident for t in threading.enumerate()}
    r = fanout.fan_out(_nodes(2), outer, concurrency=1)
    assert [x.value for x in r.results] == [30, 30]
    # the inner calls' own workers end once their call returned; the outer call's are kept
    deadline = threading.Event()
    for _ in range(200):
        new = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if len(new) <= 1:
            break
        deadline.wait(0.01)
    assert len(new) <= 1, new


def test_what_an_operation_raises_past_vtool_errors_reaches_the_caller() -> None:
    """Not an Exception (SystemExit, say): the caller gets it, as from a future's result."""
    import pytest

    def op(node: Node) -> int:
        if node.index == 2:
            raise SystemExit(7)
        return node.index

    with pytest.raises(SystemExit):
        fanout.fan_out(_nodes(4), op, concurrency=2)
    assert [x.value for x in fanout.fan_out(_nodes(2), lambda node: node.index, concurrency=2).results] == [0, 1]


def test_a_failing_node_is_its_own_result() -> None:
    def op(node: Node) -> int:
        if node.index == 1:
            raise NodeError("boom")
        return node.index

    r = fanout.fan_out(_nodes(3), op, concurrency=2)
    assert [x.ok for x in r.results] == [True, False, True] and r.results[1].error == "boom"


def test_ctrl_c_returns_once_every_started_operation_ended_and_starts_no_more() -> None:
    """Ctrl-C (here raised by on_done after the first result): the operations under way are
    stopped (``stopping``, which vtool's SSH checks) and waited for; the queued ones never
    start. The kept workers then serve the next call."""
    import pytest

    from vtool.ssh import stopping

    started: list[int] = []
    ended: list[int] = []
    lock = threading.Lock()

    def op(node: Node) -> int:
        with lock:
            started.append(node.index)
        if node.index > 0:
            stopping.wait(30)  # as a node command does until vtool's SSH is stopped
        with lock:
            ended.append(node.index)
        return node.index

    def on_done(r: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fanout.fan_out(_nodes(20), op, concurrency=4, on_done=on_done)
    assert sorted(ended) == sorted(started) and len(started) <= 5  # (the first, and the 4 it overlapped)
    r = fanout.fan_out(_nodes(3), lambda node: node.index, concurrency=4)
    assert [x.value for x in r.results] == [0, 1, 2]
    assert not stopping.is_set()
